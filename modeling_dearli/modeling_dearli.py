"""DEARLi as a transformers model: frozen OpenCLIP ConvNeXt + Mask2Former decoder with M2F-Lang recognition and a
zero-shot CLIP mask-pooling branch (paper Sec. 3.1-3.2).

The pixel decoder, transformer decoder, Hungarian matcher and loss are transformers' Mask2Former modules; this file
adds what they lack: the frozen CLIP backbone, the language-based classifier and the mask-pooling branch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerMLPPredictionHead,
    Mask2FormerPreTrainedModel,
)

from .clip_backbone import ClipTextEncoder, FrozenClipBackbone, build_open_clip_model, load_open_clip_weights, mask_pool
from .configuration_dearli import DearliConfig, split_synonyms, validate_vocabulary
from .initialization import init_pixel_decoder
from .mask_loss import FactoredMaskLogits, FactoredMaskLoss, pixel_rows_of
from .pipeline_dearli import DearliImageSegmentationPipeline  # noqa: F401  (saved beside the model: custom_pipelines)
from .pixel_decoder import DearliPixelDecoder
from .transformer_decoder import DearliTransformerModule

logger = logging.getLogger(__name__)

AUTO_MAP = {
    "AutoConfig": "configuration_dearli.DearliConfig",
    "AutoModel": "modeling_dearli.DearliForPanopticSegmentation",
    "AutoModelForImageSegmentation": "modeling_dearli.DearliForPanopticSegmentation",
    "AutoModelForUniversalSegmentation": "modeling_dearli.DearliForPanopticSegmentation",
}


@dataclass
class DearliPanopticOutput(ModelOutput):
    """
    Output of [`DearliForPanopticSegmentation`], with transformers' Mask2Former field names.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Weighted Mask2Former loss (cross-entropy + BCE + dice, with auxiliary losses), when labels are given.
        loss_dict (`dict[str, torch.Tensor]`, *optional*): The weighted loss terms.
        class_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_labels + 1)`):
            M2F-Lang logits: scaled cosine similarity of the query embeddings to the class text embeddings
            (max over synonyms), the last entry being the learned no-object embedding.
        masks_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, height / 4, width / 4)`):
            Mask logits of every query.
        clip_class_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_labels)`, *optional*):
            Zero-shot logits of the frozen CLIP features mask-pooled with each query's binary mask (computed in eval
            mode, or when `output_clip_logits=True`).
        auxiliary_logits (`list[dict[str, torch.Tensor]]`, *optional*):
            `class_queries_logits` / `masks_queries_logits` of the intermediate decoder layers.
        unpadded_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
            Height and width of the valid (not padded) region of each input, from `pixel_mask`.
        encoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*): The four CLIP backbone stages.
        pixel_decoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, mask_feature_size, H/4, W/4)`):
            Per-pixel mask embeddings.
        pixel_decoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*): Multi-scale pixel-decoder features.
        transformer_decoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_queries, hidden_dim)`):
            Final query embeddings.
        transformer_decoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*): Query embeddings per layer.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    class_queries_logits: torch.FloatTensor | None = None
    masks_queries_logits: torch.FloatTensor | None = None
    clip_class_logits: torch.FloatTensor | None = None
    auxiliary_logits: list[dict[str, torch.FloatTensor]] | None = None
    unpadded_sizes: torch.LongTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    pixel_decoder_last_hidden_state: torch.FloatTensor | None = None
    pixel_decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    transformer_decoder_last_hidden_state: torch.FloatTensor | None = None
    transformer_decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None


def synonym_logits_to_class_logits(logits: torch.Tensor, class_index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Max-pool (..., S) synonym logits into (..., C) class logits; `class_index[s]` is the class of synonym s."""
    out = logits.new_full((*logits.shape[:-1], num_classes), torch.finfo(logits.dtype).min)
    index = class_index.expand_as(logits)
    return out.scatter_reduce(-1, index, logits, reduce="amax", include_self=True)


class DearliPreTrainedModel(Mask2FormerPreTrainedModel):
    """Weight initialisation of the decoder: transformers' Mask2Former scheme, with the pixel decoder initialised by
    parameter role as the reference does (:mod:`.initialization`); the CLIP towers keep their own weights."""

    config_class = DearliConfig
    config: DearliConfig
    # No separate base model (as transformers' default): `model.base_model` is the model itself.
    base_model_prefix = ""
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keys_to_ignore_on_load_unexpected = [r"^criterion\."]

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers treats a model defined outside its package as "custom code" and then skips `_init_weights` for
        # every module without parameters of its own -- Mask2Former's attention layers, decoder layers and MLPs,
        # which would keep the generic N(0, 0.02). Our `_init_weights` writes only through
        # `transformers.initialization` (which leaves loaded parameters alone), so the library's path is safe here.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, DearliForPanopticSegmentation):
            init.constant_(module.logit_scale, module.config.logit_scale_init)
            return
        if module is getattr(self, "pixel_decoder", None):
            init_pixel_decoder(module, num_heads=self.config.num_attention_heads)
            return
        super()._init_weights(module)


class DearliForPanopticSegmentation(DearliPreTrainedModel):
    """DEARLi: frozen CLIP ConvNeXt backbone, Mask2Former decoder with language-based recognition (M2F-Lang), and
    zero-shot classification of mask-pooled CLIP features for ensembled recognition."""

    def __init__(self, config: DearliConfig):
        super().__init__(config)
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), **AUTO_MAP}
        clip_model = build_open_clip_model(config.clip_model_config)
        self.backbone = FrozenClipBackbone(clip_model.visual, clip_model.logit_scale)
        self.text_encoder = (
            ClipTextEncoder(clip_model, config.clip_model_config.get("text_cfg", {}))
            if config.keep_text_tower
            else None
        )
        del clip_model

        m2f_config = config.to_mask2former_config()
        # transformers' Mask2Former modules (same parameter names) with faster forwards; see `_decode`.
        self.pixel_decoder = DearliPixelDecoder(m2f_config, feature_channels=self.backbone.channels)
        self.transformer_module = DearliTransformerModule(in_features=config.feature_size, config=m2f_config)

        # M2F-Lang: queries -> CLIP space, cosine against fixed text embeddings + a learned no-object embedding.
        self.class_embed = Mask2FormerMLPPredictionHead(
            config.hidden_dim, config.hidden_dim, config.clip_embed_dim, num_layers=config.class_embed_layers
        )
        self.void_embedding = nn.Embedding(1, config.clip_embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self._register_text_buffers(config)

        self.criterion = self._build_criterion(m2f_config)
        self.post_init()
        self.freeze_clip_towers()

    # ------------------------------------------------------------------ construction helpers
    def _register_text_buffers(self, config: DearliConfig, embeddings: torch.Tensor | None = None) -> None:
        synonyms_per_class = [len(split_synonyms(name)) for name in config.class_names]
        class_index = torch.tensor([i for i, n in enumerate(synonyms_per_class) for _ in range(n)], dtype=torch.long)
        if embeddings is None:
            # Filled by `from_open_clip` / `set_class_names`, or loaded from a checkpoint.
            embeddings = torch.zeros(int(class_index.numel()), config.clip_embed_dim)
        for name in ("text_embeddings", "text_class_index"):
            if name in self._buffers:
                del self._buffers[name]
        self.register_buffer("text_embeddings", embeddings.float(), persistent=True)
        self.register_buffer("text_class_index", class_index.to(embeddings.device), persistent=True)

    def _build_criterion(self, m2f_config) -> FactoredMaskLoss:
        weight_dict = {
            "loss_cross_entropy": m2f_config.class_weight,
            "loss_mask": m2f_config.mask_weight,
            "loss_dice": m2f_config.dice_weight,
        }
        return FactoredMaskLoss(config=m2f_config, weight_dict=weight_dict)

    @classmethod
    def from_open_clip(
        cls,
        model_name: str,
        pretrained: str | None,
        class_names: list[str],
        thing_ids: list[int] | None = None,
        cache_dir: str | None = None,
        **config_kwargs: Any,
    ) -> "DearliForPanopticSegmentation":
        """Build a fresh DEARLi model on real OpenCLIP weights: `pretrained` is an OpenCLIP tag (downloaded by
        OpenCLIP) or a local checkpoint file; `None` keeps random CLIP weights (tests). The decoder is random and
        the class text embeddings are encoded with the CLIP text tower."""
        keep_text_tower = config_kwargs.pop("keep_text_tower", False)
        config = DearliConfig(
            class_names=class_names,
            thing_ids=thing_ids,
            clip_model_name=model_name,
            clip_pretrained=pretrained,
            keep_text_tower=keep_text_tower,
            **config_kwargs,
        )
        clip_model = build_open_clip_model(config.clip_model_config)
        if pretrained:
            load_open_clip_weights(clip_model, model_name, pretrained, cache_dir=cache_dir)
        model = cls(config)
        model.backbone.visual.load_state_dict(clip_model.visual.state_dict())
        model.backbone.logit_scale.data.copy_(clip_model.logit_scale.detach().reshape(()))
        text_encoder = ClipTextEncoder(clip_model, config.clip_model_config.get("text_cfg", {}))
        if model.text_encoder is not None:
            model.text_encoder.load_state_dict(text_encoder.state_dict())
        model._encode_class_names(text_encoder)
        return model

    def _encode_class_names(self, text_encoder: ClipTextEncoder) -> None:
        synonyms = [s for name in self.config.class_names for s in split_synonyms(name)]
        embeddings = text_encoder.encode_synonyms(synonyms, self.config.prompt_templates)
        self._register_text_buffers(self.config, embeddings.to(self.logit_scale.device))

    def set_class_names(self, class_names: list[str], thing_ids: list[int] | None = None) -> None:
        """Switch to a new vocabulary: re-encode the class text embeddings with the kept CLIP text tower. The
        vocabulary is checked (``validate_vocabulary``) and encoded before anything changes: on an error the model
        keeps its classes."""
        if self.text_encoder is None:
            raise RuntimeError(
                "This model was saved without its CLIP text tower (config.keep_text_tower=False), so it cannot encode "
                "new class names. Rebuild it with `DearliForPanopticSegmentation.from_open_clip(..., "
                "keep_text_tower=True)` or load the decoder weights into such a model."
            )
        class_names, thing_ids = validate_vocabulary(class_names, thing_ids)  # before anything changes
        synonyms = [s for name in class_names for s in split_synonyms(name)]
        embeddings = self.text_encoder.encode_synonyms(synonyms, self.config.prompt_templates)
        self.config.set_class_names(class_names, thing_ids)
        self._register_text_buffers(self.config, embeddings.to(self.logit_scale.device))
        self.criterion = self._build_criterion(self.config.to_mask2former_config()).to(self.logit_scale.device)

    def set_localization_only(self, enabled: bool = True) -> None:
        """Toggle the class-agnostic warm-up loss (class weight 0 in the loss and the matcher)."""
        self.config.localization_only = enabled
        self.criterion = self._build_criterion(self.config.to_mask2former_config()).to(self.logit_scale.device)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """transformers' ``from_pretrained``; ``id2label={0: "cat", ...}`` (with ``thing_ids=[...]`` for the thing
        classes; default: the saved ones) switches the vocabulary: the kept CLIP text tower re-encodes the new class
        names, and a model saved without it (``keep_text_tower=False``) is refused with a ``ValueError``."""
        model = super().from_pretrained(*args, **kwargs)
        # transformers materialises loaded parameters with requires_grad=True: re-freeze the CLIP towers.
        loaded = model[0] if isinstance(model, tuple) else model
        loaded.freeze_clip_towers()
        loaded._follow_id2label()
        return model

    def _follow_id2label(self) -> None:
        """Make the class names and text embeddings follow ``config.id2label`` when ``from_pretrained`` set it."""
        id2label = {int(k): str(v) for k, v in (self.config.id2label or {}).items()}
        labels = [id2label.get(i) for i in range(len(id2label))]
        if labels == [split_synonyms(name)[0] for name in self.config.class_names]:
            return
        if None in labels:
            raise ValueError(f"id2label must map the ids 0..{len(id2label) - 1} to class names, got {sorted(id2label)}")
        if self.text_encoder is None:
            raise ValueError(
                f"id2label changes the classes to {labels[:5]}{'...' if len(labels) > 5 else ''}, but this model was "
                "saved without its CLIP text tower (config.keep_text_tower=False), so the new names cannot be encoded "
                "and its classifier would keep the old classes. Load it without id2label, or start from a model saved "
                "with keep_text_tower=True (e.g. DearliForPanopticSegmentation.from_open_clip(..., "
                "keep_text_tower=True))."
            )
        thing_ids = list(self.config.thing_ids)
        if any(i >= len(labels) for i in thing_ids):
            raise ValueError(
                f"thing_ids {thing_ids} do not fit the {len(labels)} classes of id2label: pass "
                "thing_ids=[...] to from_pretrained together with id2label"
            )
        logger.info("Re-encoding %d class names from id2label (thing classes %s)", len(labels), thing_ids)
        self.set_class_names(labels, thing_ids)

    def freeze_clip_towers(self) -> None:
        """Disable gradients of the CLIP image and text towers (they are never trained)."""
        for tower in (self.backbone, self.text_encoder):
            if tower is not None:
                for parameter in tower.parameters():
                    parameter.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should update (the decoder and classifier; never the frozen CLIP towers)."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "DearliForPanopticSegmentation":
        super().train(mode)
        self.backbone.train(False)
        if self.text_encoder is not None:
            self.text_encoder.train(False)
        return self

    # ------------------------------------------------------------------ heads
    def classify_queries(self, query_embeddings: torch.Tensor) -> torch.Tensor:
        """M2F-Lang logits (B, Q, C+1) of query embeddings (B, Q, hidden_dim)."""
        embeddings = F.normalize(self.class_embed(query_embeddings), dim=-1)
        classifier = torch.cat([self.text_embeddings, F.normalize(self.void_embedding.weight, dim=-1)], dim=0)
        scale = self.logit_scale.exp().clamp(max=100.0)
        logits = scale * embeddings @ classifier.to(embeddings.dtype).t()
        class_logits = synonym_logits_to_class_logits(logits[..., :-1], self.text_class_index, self.config.num_classes)
        return torch.cat([class_logits, logits[..., -1:]], dim=-1)

    @torch.no_grad()
    def clip_classify_masks(self, dense_features: torch.Tensor, masks_queries_logits: torch.Tensor) -> torch.Tensor:
        """Zero-shot CLIP logits (B, Q, C) of the dense CLIP features mask-pooled with each query's binary mask
        (sigmoid > threshold after resizing to the feature resolution). Empty masks pool to zeros (no NaN)."""
        masks = F.interpolate(
            masks_queries_logits.float(), size=dense_features.shape[-2:], mode="bilinear", align_corners=False
        )
        binary = (masks.sigmoid() > self.config.mask_pooling_threshold).to(dense_features.dtype)
        pooled = mask_pool(dense_features, binary)
        embeddings = F.normalize(self.backbone.embed_pooled_features(pooled).float(), dim=-1)
        scale = self.backbone.logit_scale.exp().clamp(max=100.0)
        logits = scale.float() * embeddings @ self.text_embeddings.float().t()
        return synonym_logits_to_class_logits(logits, self.text_class_index, self.config.num_classes)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def compute_backbone_features(self, *pixel_values: torch.Tensor) -> list[list[torch.Tensor]]:
        """The frozen backbone's features of several batches from one backbone call.

        The batches ``(B_i, 3, H, W)`` (same height and width) are concatenated, run through the backbone once and
        split again: entry ``i`` is the list of four stage outputs of batch ``i``, to pass as ``backbone_features=``
        to :meth:`forward` (of this model or of another that shares its backbone, e.g. a Mean Teacher's). The
        backbone is frozen and in eval mode, so each image's features do not depend on the others in the call.
        """
        if not pixel_values:
            raise ValueError("compute_backbone_features needs at least one batch of pixel_values")
        for values in pixel_values:
            self._check_pixel_values(values)
        sizes = {tuple(values.shape[-2:]) for values in pixel_values}
        if len(sizes) > 1:
            raise ValueError(f"compute_backbone_features: the batches must have one image size, got {sorted(sizes)}")
        counts = [values.shape[0] for values in pixel_values]
        features = self.backbone(torch.cat(pixel_values) if len(pixel_values) > 1 else pixel_values[0])
        return [list(parts) for parts in zip(*(stage.split(counts) for stage in features))]

    @staticmethod
    def _check_pixel_values(pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape (batch_size, 3, height, width) with RGB channels, got "
                f"{tuple(pixel_values.shape)}. Use DearliImageProcessor to prepare images."
            )

    def _check_backbone_features(self, features: list[torch.Tensor], pixel_values: torch.Tensor | None) -> None:
        channels = [int(f.shape[1]) if f.ndim == 4 else -1 for f in features]
        if len(features) != 4 or channels != list(self.backbone.channels):
            raise ValueError(
                f"backbone_features must be the backbone's four stage outputs (B, C, h, w) with channels "
                f"{list(self.backbone.channels)}, got {[tuple(f.shape) for f in features]}: compute them with "
                "model.compute_backbone_features(pixel_values)"
            )
        if len({int(f.shape[0]) for f in features}) != 1 or (
            pixel_values is not None and int(features[0].shape[0]) != pixel_values.shape[0]
        ):
            raise ValueError("backbone_features must all have the batch size of pixel_values")

    def _check_inputs(self, pixel_values, mask_labels, class_labels, batch_size: int | None = None) -> None:
        if pixel_values is not None:
            self._check_pixel_values(pixel_values)
        batch_size = pixel_values.shape[0] if pixel_values is not None else batch_size
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("mask_labels and class_labels must be given together")
        if mask_labels is None:
            return
        if len(mask_labels) != batch_size or len(class_labels) != batch_size:
            raise ValueError(
                f"Got {len(mask_labels)} mask_labels and {len(class_labels)} class_labels for a batch of "
                f"{batch_size} images"
            )
        num_classes = 1 if self.config.localization_only else self.config.num_classes
        for i, (masks, classes) in enumerate(zip(mask_labels, class_labels)):
            if masks.ndim != 3 or masks.shape[0] != classes.shape[0]:
                raise ValueError(
                    f"Image {i}: mask_labels must be (num_segments, height, width) matching class_labels "
                    f"({classes.shape[0]} labels), got {tuple(masks.shape)}"
                )
            if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
                raise ValueError(
                    f"Image {i}: class_labels must lie in [0, {num_classes}) "
                    f"({'localization-only: class 0' if self.config.localization_only else 'contiguous class ids'}), "
                    f"got values in [{int(classes.min())}, {int(classes.max())}]"
                )

    def _decode(
        self, features: list[torch.Tensor], output_hidden_states: bool, output_intermediate_masks: bool,
        output_mask_embeddings: bool = False,
    ):
        """Pixel decoder and transformer decoder on the backbone features, with the forwards chosen by
        ``config.decoder_implementation`` (ours by default; ``"transformers"``: transformers' own forwards, which
        return no mask embeddings)."""
        implementation = self.config.decoder_implementation
        pixel_decoder_output = self.pixel_decoder(features, implementation=implementation)
        decoder_output = self.transformer_module(
            multi_scale_features=pixel_decoder_output.multi_scale_features,
            mask_features=pixel_decoder_output.mask_features,
            output_hidden_states=output_hidden_states,
            output_intermediate_masks=output_intermediate_masks,
            implementation=implementation,
            output_mask_embeddings=output_mask_embeddings,
        )
        return pixel_decoder_output, decoder_output

    @staticmethod
    def _masks_for_loss(pixel_decoder_output, decoder_output) -> list[torch.Tensor | FactoredMaskLogits]:
        """Every layer's mask logits for the loss, in float32: as their factors (mask embeddings and the pixel
        decoder's mask features) from our decoder, as transformers' full tensors from transformers' decoder."""
        embeddings = getattr(decoder_output, "mask_embeddings", None)
        if embeddings is None:
            return [m.float() for m in decoder_output.masks_queries_logits]
        pixels = pixel_decoder_output.mask_features.float()
        rows = pixel_rows_of(pixels)
        return [FactoredMaskLogits(e.float(), pixels, rows) for e in embeddings]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_auxiliary_logits: bool | None = None,
        output_clip_logits: bool | None = None,
        return_dict: bool | None = None,
        backbone_features: list[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> DearliPanopticOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Images normalised with CLIP's mean and std (see `DearliImageProcessor`).
            mask_labels (`list[torch.Tensor]`, *optional*):
                Per image, binary masks `(num_segments, height, width)` of the targets.
            class_labels (`list[torch.LongTensor]`, *optional*):
                Per image, the contiguous class id `(num_segments,)` of each mask (0 for localization-only warm-up).
            pixel_mask (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                1 for real pixels, 0 for padding.
            output_hidden_states (`bool`, *optional*): Return backbone, pixel-decoder and decoder hidden states.
            output_auxiliary_logits (`bool`, *optional*): Return the intermediate layers' predictions.
            output_clip_logits (`bool`, *optional*):
                Compute `clip_class_logits` (defaults to `True` in eval mode, `False` in training mode).
            backbone_features (`list[torch.FloatTensor]`, *optional*):
                The frozen backbone's four stage outputs for these images, from `compute_backbone_features` (which
                runs several batches through the backbone in one call); the backbone is then not run again and
                `pixel_values` may be left out. The outputs and gradients are those of the forward on the images.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if output_clip_logits is None:
            output_clip_logits = not self.training
        if backbone_features is None:
            if pixel_values is None:
                raise ValueError("forward needs pixel_values (or precomputed backbone_features)")
        else:
            backbone_features = list(backbone_features)
            self._check_backbone_features(backbone_features, pixel_values)
        batch_size = None if backbone_features is None else int(backbone_features[0].shape[0])
        self._check_inputs(pixel_values, mask_labels, class_labels, batch_size)

        if output_auxiliary_logits is None:
            output_auxiliary_logits = getattr(self.config, "output_auxiliary_logits", None)
        output_auxiliary_logits = bool(output_auxiliary_logits)
        auxiliary_loss = mask_labels is not None and self.config.use_auxiliary_loss
        need_auxiliary = output_auxiliary_logits or auxiliary_loss

        if backbone_features is None:
            # the backbone's dtype (a model loaded with dtype=torch.bfloat16 takes float32 images from the processor)
            features = self.backbone(pixel_values.to(self.backbone.logit_scale.dtype))
        else:
            features = backbone_features
        # The loss reads every layer's masks from their factors (`modeling_dearli.mask_loss`): the intermediate
        # layers' full-resolution masks are formed only when they are returned.
        pixel_decoder_output, decoder_output = self._decode(
            features, output_hidden_states, output_auxiliary_logits, output_mask_embeddings=mask_labels is not None
        )
        hidden_per_layer = decoder_output.intermediate_hidden_states
        masks_per_layer = decoder_output.masks_queries_logits
        # Logits in float32 whatever the compute dtype (bf16 autocast or weights): the loss, the matcher and the
        # post-processing read them.
        class_per_layer = [
            self.classify_queries(h.transpose(0, 1)).float()
            for h in (hidden_per_layer if need_auxiliary else hidden_per_layer[-1:])
        ]
        class_queries_logits = class_per_layer[-1]
        masks_queries_logits = masks_per_layer[-1].float()
        auxiliary_logits = None
        if output_auxiliary_logits:
            auxiliary_logits = [
                {"class_queries_logits": c, "masks_queries_logits": None if m is None else m.float()}
                for c, m in zip(class_per_layer[:-1], masks_per_layer[:-1])
            ]

        loss, loss_dict = None, None
        if mask_labels is not None:
            mask_labels = [m.to(masks_queries_logits.dtype) for m in mask_labels]
            class_labels = [c.long() for c in class_labels]
            # float32 loss and Hungarian matching, also under autocast
            with torch.autocast(masks_queries_logits.device.type, enabled=False):
                masks_for_loss = self._masks_for_loss(pixel_decoder_output, decoder_output)
                loss_dict = self.criterion(
                    masks_queries_logits=masks_for_loss[-1],
                    class_queries_logits=class_queries_logits,
                    mask_labels=mask_labels,
                    class_labels=class_labels,
                    auxiliary_predictions=[
                        {"class_queries_logits": c, "masks_queries_logits": m}
                        for c, m in zip(class_per_layer[:-1], masks_for_loss[:-1])
                    ] if auxiliary_loss else None,
                )
            for key in loss_dict:
                for term, weight in self.criterion.weight_dict.items():
                    if key.startswith(term):
                        loss_dict[key] = loss_dict[key] * weight
            loss = sum(loss_dict.values())

        clip_class_logits = None
        if output_clip_logits:
            clip_class_logits = self.clip_classify_masks(features[-1], masks_queries_logits).float()

        unpadded_sizes = None
        if pixel_mask is not None:
            valid = pixel_mask.bool()
            unpadded_sizes = torch.stack([valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)], dim=1)

        output = DearliPanopticOutput(
            loss=loss,
            loss_dict=loss_dict,
            class_queries_logits=class_queries_logits,
            masks_queries_logits=masks_queries_logits,
            clip_class_logits=clip_class_logits,
            auxiliary_logits=auxiliary_logits if output_auxiliary_logits else None,
            unpadded_sizes=unpadded_sizes,
            encoder_hidden_states=tuple(features) if output_hidden_states else None,
            pixel_decoder_last_hidden_state=pixel_decoder_output.mask_features,
            pixel_decoder_hidden_states=(
                tuple(pixel_decoder_output.multi_scale_features) if output_hidden_states else None
            ),
            transformer_decoder_last_hidden_state=decoder_output.last_hidden_state,
            transformer_decoder_hidden_states=decoder_output.hidden_states if output_hidden_states else None,
        )
        if not return_dict:
            return output.to_tuple()
        return output


__all__ = ["DearliForPanopticSegmentation", "DearliPanopticOutput", "DearliPreTrainedModel"]
