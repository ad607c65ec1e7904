"""Configuration of DEARLi: frozen OpenCLIP ConvNeXt + Mask2Former decoder with language-based recognition."""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any

from transformers import PretrainedConfig

# The 14 ViLD prompt templates, as used by FC-CLIP and the DEARLi reference implementation.
VILD_PROMPT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
]

DEFAULT_CLIP_MODEL_NAME = "convnext_base_w_320"
DECODER_IMPLEMENTATIONS = ("dearli", "transformers")
DEFAULT_CLIP_PRETRAINED = "laion_aesthetic_s13b_b82k_augreg"
# Eq. 6 weight of the decoder posterior (paper: 0.6); the image processor's default too.
DEFAULT_ENSEMBLE_ALPHA = 0.6
# transformers' custom-pipeline entry, saved in config.json: `pipeline("image-segmentation", model=folder,
# trust_remote_code=True)` loads this class from the folder's pipeline_dearli.py (see there).
CUSTOM_PIPELINES: dict[str, dict[str, Any]] = {
    "image-segmentation": {
        "impl": "pipeline_dearli.DearliImageSegmentationPipeline",
        "pt": ["AutoModelForImageSegmentation"],
        "type": "image",
    }
}


def split_synonyms(class_name: str) -> list[str]:
    """Split a class entry like ``"person,child,girl"`` into its synonyms (at least one)."""
    synonyms = [s.strip() for s in class_name.split(",") if s.strip()]
    if not synonyms:
        raise ValueError(f"Empty class name entry: {class_name!r}")
    return synonyms


def _comparable(synonym: str) -> str:
    """How two synonyms are compared: CLIP's tokenizer lower-cases and collapses spaces, so these encode the same."""
    return " ".join(synonym.lower().split())


def validate_vocabulary(class_names: Any, thing_ids: Any = None) -> tuple[list[str], list[int]]:
    """Checked ``(class_names, thing_ids)`` of a vocabulary, or ``ValueError`` (nothing is changed anywhere).

    ``class_names``: a non-empty list of entries ``"name,synonym,..."``; no name or synonym may belong to two classes
    (``label2id`` would lose one, and their text embeddings would be the same). A synonym repeated within one class is
    harmless (its class takes the maximum over synonyms). ``thing_ids``: distinct integer class indices in
    ``[0, len(class_names))``; ``None`` makes every class a thing. Returns the names as strings and the sorted ids.
    """
    if isinstance(class_names, str) or not isinstance(class_names, (list, tuple)):
        raise TypeError(f"class_names must be a list of class names, got {type(class_names).__name__}")
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names is empty: a vocabulary needs at least one class")
    owner: dict[str, int] = {}
    for index, name in enumerate(names):
        for synonym in dict.fromkeys(_comparable(s) for s in split_synonyms(name)):
            if synonym in owner:
                other = owner[synonym]
                raise ValueError(f"classes {other} ({names[other]!r}) and {index} ({name!r}) share the name "
                                 f"{synonym!r}: every name and synonym must belong to one class")
            owner[synonym] = index
    if thing_ids is None:
        return names, list(range(len(names)))
    ids = []
    for value in thing_ids:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(f"thing_ids must be integer class indices, got {value!r}")
        ids.append(int(value))
    if len(set(ids)) != len(ids):
        raise ValueError(f"thing_ids has repeated entries: {ids}")
    bad = [i for i in ids if not 0 <= i < len(names)]
    if bad:
        raise ValueError(f"thing_ids {bad} are not class indices in [0, {len(names)})")
    return names, sorted(ids)


def resolve_open_clip_config(model_name: str) -> dict[str, Any]:
    """The architecture config of a built-in OpenCLIP model name, or of an OpenCLIP model-config JSON file (a
    ``model_configs/*.json``-style dict, or an ``open_clip_config.json`` with a ``model_cfg`` entry); no download."""
    import open_clip

    if str(model_name).endswith(".json") and os.path.isfile(model_name):
        with open(model_name) as f:
            cfg = json.load(f)
        cfg = cfg.get("model_cfg", cfg)
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
            raise ValueError(f"{model_name} is not an OpenCLIP model config (needs embed_dim, vision_cfg, text_cfg)")
        return cfg
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(
            f"Unknown OpenCLIP model name {model_name!r}: pass `clip_model_config` (an OpenCLIP model config dict "
            f"with `embed_dim`, `vision_cfg`, `text_cfg`) for custom architectures."
        )
    return cfg


class DearliConfig(PretrainedConfig):
    r"""
    Configuration of [`DearliForPanopticSegmentation`]. Defaults follow the DEARLi paper and its reference
    implementation (frozen OpenCLIP ConvNeXt-B, Mask2Former decoder with 200 queries, M2F-Lang recognition).

    Args:
        class_names (`list[str]`, *optional*):
            One entry per class (contiguous ids ``0..C-1``); each entry may hold comma-separated synonyms
            (``"person,child,girl"``), whose text embeddings are max-pooled at classification time. No name or
            synonym may belong to two classes.
        thing_ids (`list[int]`, *optional*):
            Contiguous ids of the *thing* classes (distinct, in ``[0, C)``; default: all); the others are *stuff*
            (fused in panoptic inference).
        clip_model_name (`str`, *optional*, defaults to `"convnext_base_w_320"`):
            OpenCLIP architecture name.
        clip_pretrained (`str`, *optional*, defaults to `"laion_aesthetic_s13b_b82k_augreg"`):
            OpenCLIP pretrained tag or a local checkpoint path; only used by
            [`DearliForPanopticSegmentation.from_open_clip`] (saved checkpoints carry the backbone weights).
        clip_model_config (`dict`, *optional*):
            Full OpenCLIP model config (``embed_dim``, ``vision_cfg``, ``text_cfg``). Resolved from
            `clip_model_name` when not given, so that a saved model never needs OpenCLIP's registry.
        keep_text_tower (`bool`, *optional*, defaults to `False`):
            Keep the CLIP text tower in the model (and checkpoint) so that `set_class_names` can re-encode a new
            vocabulary. When `False` only the text embeddings of the classes are stored.
        prompt_templates (`list[str]`, *optional*):
            Prompt templates with one ``{}`` placeholder; defaults to the 14 ViLD templates.
        num_queries (`int`, *optional*, defaults to 200): Number of object queries.
        decoder_layers (`int`, *optional*, defaults to 10):
            Mask2Former decoder layers, counting the prediction on the learnable queries (9 attention layers).
        hidden_dim (`int`, *optional*, defaults to 256): Transformer decoder width.
        num_attention_heads (`int`, *optional*, defaults to 8): Attention heads (decoder and deformable encoder).
        dim_feedforward (`int`, *optional*, defaults to 2048): Decoder feed-forward width.
        encoder_layers (`int`, *optional*, defaults to 6): Deformable pixel-decoder encoder layers.
        encoder_feedforward_dim (`int`, *optional*, defaults to 1024): Pixel-decoder feed-forward width.
        feature_size (`int`, *optional*, defaults to 256): Pixel-decoder width.
        mask_feature_size (`int`, *optional*, defaults to 256): Width of the per-pixel mask embeddings.
        feature_strides (`list[int]`, *optional*, defaults to `[4, 8, 16, 32]`):
            Strides of the four backbone stages; the deformable encoder runs on the last three.
        common_stride (`int`, *optional*, defaults to 4): Stride of the mask features.
        pre_norm (`bool`, *optional*, defaults to `False`): Pre-norm decoder layers.
        enforce_input_projection (`bool`, *optional*, defaults to `False`): Always project decoder inputs.
        class_embed_layers (`int`, *optional*, defaults to 3): Layers of the MLP mapping queries to CLIP space.
        decoder_implementation (`str`, *optional*, defaults to `"dearli"`):
            Forward of the pixel and transformer decoders: `"dearli"` (this package's faster forward,
            `DearliPixelDecoder` / `DearliTransformerModule`) or `"transformers"` (transformers' Mask2Former forward).
            Both use the same modules and weights and give the same outputs to rounding.
        logit_scale_init (`float`, *optional*, defaults to log(1/0.07)): Initial learnable M2F-Lang logit scale.
        mask_pooling_threshold (`float`, *optional*, defaults to 0.5):
            Sigmoid threshold of the query masks used for CLIP mask pooling.
        ensemble_alpha (`float`, *optional*, defaults to 0.6):
            Geometric ensembling weight α of Eq. 6: ``P = P_M2F^α · P_CLIP^(1-α)``.
        class_weight (`float`, *optional*, defaults to 2.0): Cross-entropy weight (loss and matcher).
        mask_weight (`float`, *optional*, defaults to 5.0): Binary cross-entropy mask weight.
        dice_weight (`float`, *optional*, defaults to 5.0): Dice loss weight.
        no_object_weight (`float`, *optional*, defaults to 0.1): Cross-entropy weight of the no-object class.
        train_num_points (`int`, *optional*, defaults to 12544): Points sampled for the mask losses.
        oversample_ratio (`float`, *optional*, defaults to 3.0): Point oversampling ratio.
        importance_sample_ratio (`float`, *optional*, defaults to 0.75): Ratio of uncertainty-sampled points.
        use_auxiliary_loss (`bool`, *optional*, defaults to `True`): Deep supervision on every decoder layer.
        localization_only (`bool`, *optional*, defaults to `False`):
            Class-agnostic decoder warm-up (DeWa): class weight 0 in both the loss and the matcher, so only the
            dice + BCE localization loss trains the decoder.
        init_std (`float`, *optional*, defaults to 0.02): Std of the default weight initialisation.
        init_xavier_std (`float`, *optional*, defaults to 1.0): Xavier gain used by the decoder layers.
    """

    model_type = "dearli"

    def __init__(
        self,
        class_names: list[str] | None = None,
        thing_ids: list[int] | None = None,
        clip_model_name: str = DEFAULT_CLIP_MODEL_NAME,
        clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        clip_model_config: dict[str, Any] | None = None,
        keep_text_tower: bool = False,
        prompt_templates: list[str] | None = None,
        num_queries: int = 200,
        decoder_layers: int = 10,
        hidden_dim: int = 256,
        num_attention_heads: int = 8,
        dim_feedforward: int = 2048,
        encoder_layers: int = 6,
        encoder_feedforward_dim: int = 1024,
        feature_size: int = 256,
        mask_feature_size: int = 256,
        feature_strides: list[int] | None = None,
        common_stride: int = 4,
        pre_norm: bool = False,
        enforce_input_projection: bool = False,
        class_embed_layers: int = 3,
        decoder_implementation: str = "dearli",
        logit_scale_init: float = 2.659260036932778,
        mask_pooling_threshold: float = 0.5,
        ensemble_alpha: float = DEFAULT_ENSEMBLE_ALPHA,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        train_num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        use_auxiliary_loss: bool = True,
        localization_only: bool = False,
        init_std: float = 0.02,
        init_xavier_std: float = 1.0,
        **kwargs,
    ):
        class_names, thing_ids = validate_vocabulary(["object"] if class_names is None else class_names, thing_ids)
        if prompt_templates is None:
            prompt_templates = list(VILD_PROMPT_TEMPLATES)
        for template in prompt_templates:
            if template.count("{}") != 1:
                raise ValueError(f"Prompt template must contain exactly one '{{}}': {template!r}")
        if not 0.0 <= ensemble_alpha <= 1.0:
            raise ValueError(f"ensemble_alpha must be in [0, 1], got {ensemble_alpha}")
        if decoder_implementation not in DECODER_IMPLEMENTATIONS:
            raise ValueError(
                f"decoder_implementation must be one of {DECODER_IMPLEMENTATIONS}, got {decoder_implementation!r}"
            )
        if clip_model_config is None:
            clip_model_config = resolve_open_clip_config(clip_model_name)

        self.class_names = class_names
        self.thing_ids = thing_ids
        self.clip_model_name = clip_model_name
        self.clip_pretrained = clip_pretrained
        self.clip_model_config = copy.deepcopy(clip_model_config)
        self.keep_text_tower = keep_text_tower
        self.prompt_templates = list(prompt_templates)
        self.num_queries = num_queries
        self.decoder_layers = decoder_layers
        self.hidden_dim = hidden_dim
        self.num_attention_heads = num_attention_heads
        self.dim_feedforward = dim_feedforward
        self.encoder_layers = encoder_layers
        self.encoder_feedforward_dim = encoder_feedforward_dim
        self.feature_size = feature_size
        self.mask_feature_size = mask_feature_size
        self.feature_strides = list(feature_strides) if feature_strides is not None else [4, 8, 16, 32]
        self.common_stride = common_stride
        self.pre_norm = pre_norm
        self.enforce_input_projection = enforce_input_projection
        self.class_embed_layers = class_embed_layers
        self.decoder_implementation = decoder_implementation
        self.logit_scale_init = logit_scale_init
        self.mask_pooling_threshold = mask_pooling_threshold
        self.ensemble_alpha = ensemble_alpha
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.train_num_points = train_num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.use_auxiliary_loss = use_auxiliary_loss
        self.localization_only = localization_only
        self.init_std = init_std
        self.init_xavier_std = init_xavier_std

        kwargs.pop("id2label", None)
        kwargs.pop("label2id", None)
        kwargs.pop("num_labels", None)
        kwargs.pop("custom_pipelines", None)  # fixed by the code: see the property
        super().__init__(**kwargs)
        self._set_label_maps()

    @property
    def custom_pipelines(self) -> dict[str, dict[str, Any]]:
        """What ``pipeline()`` reads as this model's custom pipelines: :data:`CUSTOM_PIPELINES` (the class is then
        loaded from the saved folder, with ``trust_remote_code=True``), less the tasks that the installed package
        already routes to DEARLi's pipeline (``pipeline()`` would otherwise demand ``trust_remote_code`` for installed
        code). ``config.json`` always carries :data:`CUSTOM_PIPELINES`."""
        pipelines = sys.modules.get("transformers.pipelines")
        registry = pipelines.PIPELINE_REGISTRY.supported_tasks if pipelines is not None else {}
        served = {task for task, entry in registry.items() if getattr(entry["impl"], "serves_model_type", None)
                  == self.model_type}
        return {task: copy.deepcopy(entry) for task, entry in CUSTOM_PIPELINES.items() if task not in served}

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["custom_pipelines"] = copy.deepcopy(CUSTOM_PIPELINES)
        return output

    def _set_label_maps(self) -> None:
        self.id2label = {i: split_synonyms(name)[0] for i, name in enumerate(self.class_names)}
        self.label2id = {name: i for i, name in self.id2label.items()}

    @property
    def num_classes(self) -> int:
        """Number of classes C, without the no-object class."""
        return len(self.class_names)

    @property
    def stuff_ids(self) -> list[int]:
        """Contiguous ids of the stuff classes."""
        things = set(self.thing_ids)
        return [i for i in range(self.num_classes) if i not in things]

    @property
    def clip_embed_dim(self) -> int:
        """Dimension of the joint CLIP embedding space."""
        return int(self.clip_model_config["embed_dim"])

    def set_class_names(self, class_names: list[str], thing_ids: list[int] | None = None) -> None:
        """Replace the vocabulary (the model's text embeddings must be re-encoded, see the model's method). Checked
        first with :func:`validate_vocabulary`: an invalid vocabulary raises ``ValueError`` and changes nothing."""
        self.class_names, self.thing_ids = validate_vocabulary(class_names, thing_ids)
        self._set_label_maps()

    def to_mask2former_config(self):
        """The equivalent `Mask2FormerConfig` used to build transformers' Mask2Former modules and loss."""
        from transformers import Mask2FormerConfig

        return Mask2FormerConfig(
            num_labels=self.num_classes,
            feature_size=self.feature_size,
            mask_feature_size=self.mask_feature_size,
            hidden_dim=self.hidden_dim,
            encoder_feedforward_dim=self.encoder_feedforward_dim,
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            num_attention_heads=self.num_attention_heads,
            dim_feedforward=self.dim_feedforward,
            pre_norm=self.pre_norm,
            enforce_input_projection=self.enforce_input_projection,
            common_stride=self.common_stride,
            feature_strides=self.feature_strides,
            num_queries=self.num_queries,
            no_object_weight=self.no_object_weight,
            class_weight=0.0 if self.localization_only else self.class_weight,
            mask_weight=self.mask_weight,
            dice_weight=self.dice_weight,
            train_num_points=self.train_num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
            use_auxiliary_loss=self.use_auxiliary_loss,
            init_std=self.init_std,
            init_xavier_std=self.init_xavier_std,
            dropout=0.0,
        )
