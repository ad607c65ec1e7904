"""Conversion of the reference implementation's released checkpoints (GitHub ``helen1c/DEARLi``, detectron2) into
`DearliForPanopticSegmentation`.

The reference model (``VisionLanguageMaskFormer`` / ``...Student`` / ``...Teacher``) stores one detectron2 state dict:
``backbone.clip_model.*`` (the whole OpenCLIP model, image and text towers), ``sem_seg_head.pixel_decoder.*``
(detectron2 ``MSDeformAttnPixelDecoder``), ``sem_seg_head.predictor.*`` (the vision-language masked-attention
decoder with its CLIP-space class MLP and logit scale), ``void_embedding.weight`` and loss buffers
(``criterion*.empty_weight``). Our decoder is transformers' ``Mask2FormerPixelDecoder`` +
``Mask2FormerTransformerModule``, so the decoder names follow transformers' own Mask2Former conversion; the one
structural difference is the decoder self-attention, fused (``in_proj_weight``) in the reference and split into
``q_proj``/``k_proj``/``v_proj`` here (cross-attention stays a fused ``nn.MultiheadAttention`` on both sides).

The reference computes its text classifier at run time and never saves it, so the class text embeddings are
re-encoded with the checkpoint's own CLIP text tower and the reference recipe (ViLD templates, per-prompt L2
normalisation, template mean, re-normalisation); a ``text_classifier`` tensor in the checkpoint is used instead when
present.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeling_dearli import DearliConfig, DearliForPanopticSegmentation
from modeling_dearli.clip_backbone import ClipTextEncoder, build_open_clip_model
from modeling_dearli.configuration_dearli import split_synonyms

from ..data.resolutions import EVALUATION_SIZES

logger = logging.getLogger(__name__)

REFERENCE_DATASETS: tuple[str, ...] = ("ade20k", "coco_panoptic", "coco_objects")

# Inference resolution of the reference configs (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST).
REFERENCE_TEST_SIZES: dict[str, dict[str, int]] = {name: EVALUATION_SIZES[name] for name in REFERENCE_DATASETS}

# The reference's GEOMETRIC_ENSEMBLE_ALPHA (0.4) weights the CLIP posterior; our `ensemble_alpha` weights the decoder
# posterior (P = P_M2F^a * P_CLIP^(1-a)), hence 1 - 0.4.
REFERENCE_GEOMETRIC_ENSEMBLE_ALPHA = 0.4

CLIP_PREFIX = "backbone.clip_model."
PIXEL_DECODER_PREFIX = "sem_seg_head.pixel_decoder."
PREDICTOR_PREFIX = "sem_seg_head.predictor."

# Reference keys that carry no weights we need: loss buffers (rebuilt from the config), normalisation constants and
# OpenCLIP's causal attention mask (a constant buffer, not persistent in recent OpenCLIP versions).
IGNORED_REFERENCE_KEYS = re.compile(
    r"^(criterion(_labeled|_pseudolabeled)?\.empty_weight|pixel_mean|pixel_std|backbone\.clip_model\.attn_mask)$"
)
# Reference keys (besides the CLIP weights) that may hold the precomputed class text embeddings.
TEXT_CLASSIFIER_KEYS: tuple[str, ...] = ("text_classifier", "sem_seg_head.text_classifier")

# Human-readable key groups: reference key pattern -> our module (documented in the README and the closing note).
KEY_GROUPS: tuple[tuple[str, str], ...] = (
    ("backbone.clip_model.visual.*", "backbone.visual.* (FrozenClipBackbone, OpenCLIP image tower)"),
    ("backbone.clip_model.logit_scale", "backbone.logit_scale (CLIP temperature of the mask-pooling branch)"),
    (
        "backbone.clip_model.{transformer,token_embedding,positional_embedding,ln_final,text_projection}*",
        "text_embeddings buffer (re-encoded with the ViLD templates); text_encoder.clip.* if keep_text_tower",
    ),
    ("sem_seg_head.pixel_decoder.input_proj.{i}.{0,1}", "pixel_decoder.input_projections.{i}.{0,1}"),
    ("sem_seg_head.pixel_decoder.transformer.level_embed", "pixel_decoder.level_embed"),
    (
        ("sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}.self_attn.{sampling_offsets,attention_weights,"
        "value_proj,output_proj}"),
        "pixel_decoder.encoder.layers.{i}.self_attn.* (same names)",
    ),
    (
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}.{linear1,linear2,norm1,norm2}",
        "pixel_decoder.encoder.layers.{i}.{fc1,fc2,self_attn_layer_norm,final_layer_norm}",
    ),
    ("sem_seg_head.pixel_decoder.adapter_{k}.{weight,norm.*}", "pixel_decoder.adapter_{k}.{0.weight,1.*}"),
    ("sem_seg_head.pixel_decoder.layer_{k}.{weight,norm.*}", "pixel_decoder.layer_{k}.{0.weight,1.*}"),
    ("sem_seg_head.pixel_decoder.mask_features", "pixel_decoder.mask_projection"),
    (
        "sem_seg_head.predictor.{query_feat,query_embed,level_embed}",
        "transformer_module.{queries_features,queries_embedder,level_embed}",
    ),
    ("sem_seg_head.predictor.input_proj.{l}", "transformer_module.input_projections.{l} (only if projected)"),
    (
        "sem_seg_head.predictor.transformer_self_attention_layers.{i}.self_attn.in_proj_{weight,bias}",
        "transformer_module.decoder.layers.{i}.self_attn.{q,k,v}_proj (split in thirds)",
    ),
    (
        "sem_seg_head.predictor.transformer_self_attention_layers.{i}.{self_attn.out_proj,norm}",
        "transformer_module.decoder.layers.{i}.{self_attn.out_proj,self_attn_layer_norm}",
    ),
    (
        "sem_seg_head.predictor.transformer_cross_attention_layers.{i}.{multihead_attn.*,norm}",
        "transformer_module.decoder.layers.{i}.{cross_attn.*,cross_attn_layer_norm}",
    ),
    (
        "sem_seg_head.predictor.transformer_ffn_layers.{i}.{linear1,linear2,norm}",
        "transformer_module.decoder.layers.{i}.{fc1,fc2,final_layer_norm}",
    ),
    ("sem_seg_head.predictor.decoder_norm", "transformer_module.decoder.layernorm"),
    ("sem_seg_head.predictor.mask_embed.layers.{j}", "transformer_module.decoder.mask_predictor.mask_embedder.{j}.0"),
    ("sem_seg_head.predictor.class_embed.layers.{j}", "class_embed.{j}.0 (M2F-Lang MLP to CLIP space)"),
    ("sem_seg_head.predictor.logit_scale", "logit_scale (M2F-Lang temperature)"),
    ("void_embedding.weight", "void_embedding.weight"),
    ("criterion*.empty_weight, pixel_mean, pixel_std", "ignored (rebuilt from the config)"),
)


class ReferenceCheckpointError(ValueError):
    """The checkpoint does not match the reference architecture for the requested configuration."""


@dataclass(frozen=True)
class _Rule:
    """Our key pattern -> reference key template (+ optional third of a fused attention projection)."""

    ours: re.Pattern[str]
    reference: str
    qkv_part: int | None = None  # 0 = query, 1 = key, 2 = value rows of a fused in_proj


# Sub-modules of one layer whose weight and bias are renamed as they are: ours -> reference ({i}: the layer index).
_ENCODER_LAYER = {"fc1": "linear1", "fc2": "linear2", "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}
_DECODER_LAYER = {
    "self_attn.out_proj": "transformer_self_attention_layers.{i}.self_attn.out_proj",
    "self_attn_layer_norm": "transformer_self_attention_layers.{i}.norm",
    "cross_attn_layer_norm": "transformer_cross_attention_layers.{i}.norm",
    "fc1": "transformer_ffn_layers.{i}.linear1",
    "fc2": "transformer_ffn_layers.{i}.linear2",
    "final_layer_norm": "transformer_ffn_layers.{i}.norm",
}


def _layer_rule(layers: str, ours: str, reference: str) -> _Rule:
    """``<layers>.<i>.<ours>.(weight|bias)`` -> ``<reference>.(weight|bias)`` with ``{i}`` the layer index."""
    pattern = rf"^{re.escape(layers)}\.(\d+)\.{re.escape(ours)}\.(weight|bias)$"
    return _Rule(re.compile(pattern), reference.replace("{i}", r"\1") + r".\2")


def _rules() -> list[_Rule]:
    pd, pr = PIXEL_DECODER_PREFIX, PREDICTOR_PREFIX
    wb = r"(weight|bias)"
    rules = [
        # Frozen CLIP image tower and its temperature.
        _Rule(re.compile(r"^backbone\.visual\.(.+)$"), CLIP_PREFIX + r"visual.\1"),
        _Rule(re.compile(r"^backbone\.logit_scale$"), CLIP_PREFIX + "logit_scale"),
        _Rule(re.compile(r"^text_encoder\.clip\.(.+)$"), CLIP_PREFIX + r"\1"),
        # Pixel decoder (transformers' Mask2FormerPixelDecoder <- detectron2 MSDeformAttnPixelDecoder).
        _Rule(re.compile(rf"^pixel_decoder\.input_projections\.(\d+)\.(\d+)\.{wb}$"), pd + r"input_proj.\1.\2.\3"),
        _Rule(re.compile(r"^pixel_decoder\.level_embed$"), pd + "transformer.level_embed"),
        _Rule(
            re.compile(
                rf"^pixel_decoder\.encoder\.layers\.(\d+)\.self_attn\."
                rf"(sampling_offsets|attention_weights|value_proj|output_proj)\.{wb}$"
            ),
            pd + r"transformer.encoder.layers.\1.self_attn.\2.\3",
        ),
        _Rule(re.compile(r"^pixel_decoder\.(adapter|layer)_(\d+)\.0\.(weight|bias)$"), pd + r"\1_\2.\3"),
        _Rule(re.compile(rf"^pixel_decoder\.(adapter|layer)_(\d+)\.1\.{wb}$"), pd + r"\1_\2.norm.\3"),
        _Rule(re.compile(rf"^pixel_decoder\.mask_projection\.{wb}$"), pd + r"mask_features.\1"),
        # Transformer decoder (transformers' Mask2FormerTransformerModule <- the vision-language decoder).
        _Rule(re.compile(r"^transformer_module\.queries_features\.weight$"), pr + "query_feat.weight"),
        _Rule(re.compile(r"^transformer_module\.queries_embedder\.weight$"), pr + "query_embed.weight"),
        _Rule(re.compile(r"^transformer_module\.level_embed\.weight$"), pr + "level_embed.weight"),
        _Rule(re.compile(rf"^transformer_module\.input_projections\.(\d+)\.{wb}$"), pr + r"input_proj.\1.\2"),
        _Rule(
            re.compile(
                r"^transformer_module\.decoder\.layers\.(\d+)\.cross_attn\."
                r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$"
            ),
            pr + r"transformer_cross_attention_layers.\1.multihead_attn.\2",
        ),
        _Rule(re.compile(rf"^transformer_module\.decoder\.layernorm\.{wb}$"), pr + r"decoder_norm.\1"),
        _Rule(
            re.compile(rf"^transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.{wb}$"),
            pr + r"mask_embed.layers.\1.\2",
        ),
        # M2F-Lang recognition head.
        _Rule(re.compile(rf"^class_embed\.(\d+)\.0\.{wb}$"), pr + r"class_embed.layers.\1.\2"),
        _Rule(re.compile(r"^logit_scale$"), pr + "logit_scale"),
        _Rule(re.compile(r"^void_embedding\.weight$"), "void_embedding.weight"),
    ]
    # Per-layer renames of the pixel decoder's encoder and of the transformer decoder.
    rules += [_layer_rule("pixel_decoder.encoder.layers", ours, pd + f"transformer.encoder.layers.{{i}}.{reference}")
              for ours, reference in _ENCODER_LAYER.items()]
    rules += [_layer_rule("transformer_module.decoder.layers", ours, pr + reference)
              for ours, reference in _DECODER_LAYER.items()]
    for part, name in enumerate(("q", "k", "v")):
        rules.append(
            _Rule(
                re.compile(rf"^transformer_module\.decoder\.layers\.(\d+)\.self_attn\.{name}_proj\.{wb}$"),
                pr + r"transformer_self_attention_layers.\1.self_attn.in_proj_\2",
                qkv_part=part,
            )
        )
    return rules


RULES: list[_Rule] = _rules()

# Our keys that do not come from the reference checkpoint: filled by the conversion itself.
COMPUTED_KEYS = re.compile(r"^(text_embeddings|text_class_index|criterion\..+)$")


def reference_source(our_key: str) -> tuple[str, int | None] | None:
    """The reference key (and fused-projection third: 0=q, 1=k, 2=v, or None) our parameter `our_key` comes from;
    None for keys this conversion computes (text embeddings, loss buffers). Raises KeyError for unknown keys."""
    if COMPUTED_KEYS.match(our_key):
        return None
    for rule in RULES:
        match = rule.ours.match(our_key)
        if match:
            return match.expand(rule.reference), rule.qkv_part
    raise KeyError(f"No reference mapping for our parameter {our_key!r}")


# ----------------------------------------------------------------------------------------------- loading
def unwrap_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The model state dict inside a detectron2 checkpoint (``{"model": ...}``), a ``{"state_dict": ...}`` wrapper or
    a bare state dict; strips a DistributedDataParallel ``module.`` prefix."""
    state = checkpoint
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise ReferenceCheckpointError(
            f"Expected a state dict (or {{'model': state_dict}}), got {type(state).__name__}"
        )
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if skipped:
        logger.warning("Ignoring %d non-tensor entries of the state dict: %s", len(skipped), skipped[:10])
    if not tensors:
        raise ReferenceCheckpointError(
            f"No tensors found in the checkpoint (top-level keys: {sorted(map(str, checkpoint))[:20]})"
            if isinstance(checkpoint, Mapping)
            else "No tensors found in the checkpoint"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a reference ``.pth`` checkpoint safely (``torch.load(weights_only=True)``, no code execution)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError and friends
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = next((line for line in lines if "Unsupported global" in line), None)
        if refused is not None:  # a readable pickle that names Python objects beyond tensors
            refused = refused.split(" was not an allowed global")[0].split("error: ")[-1]
            raise ReferenceCheckpointError(
                f"Could not load {path} with torch.load(weights_only=True): the checkpoint contains pickled Python "
                f"objects beyond tensors ({refused}). If you trust its source, re-save only the weights first: "
                "torch.save({'model': torch.load(path, weights_only=False)['model']}, 'clean.pth')."
            ) from error
        reason = "the file is empty" if path.stat().st_size == 0 else \
            next((line for line in reversed(lines) if line.startswith("Unsupported")), None) or \
            (lines[0] if lines else type(error).__name__)
        raise ReferenceCheckpointError(f"{path} is not a readable PyTorch checkpoint: {reason}") from error
    return unwrap_state_dict(checkpoint)


# ----------------------------------------------------------------------------------------------- vocabulary
def dataset_vocabulary(
    dataset: str, data_dir: str | Path | None = None
) -> tuple[list[str], list[int]]:
    """Class names (with synonyms, in the reference's contiguous order) and thing ids of a reference dataset, read
    from the class-name files that ship with the package (the reference implementation's own prompt-engineered names),
    or from ``data_dir/class_names/``."""
    if dataset not in REFERENCE_DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {REFERENCE_DATASETS}")
    from training.data.class_names import load_class_names

    vocabulary = load_class_names(dataset, data_dir)
    return list(vocabulary.names), list(vocabulary.thing_ids)


# ----------------------------------------------------------------------------------------------- conversion
def _key_problems(*groups: tuple[str, Any]) -> list[str]:
    """One line ``<label> (<count>): <keys>`` per non-empty group of keys (sorted)."""
    return [f"{label} ({len(keys)}):{_format_keys(sorted(keys))}" for label, keys in groups if keys]


def _format_keys(keys: list[str], limit: int = 60) -> str:
    shown = "\n  ".join(keys[:limit])
    more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {shown}{more}"


def _load_clip(state_dict: Mapping[str, torch.Tensor], config: DearliConfig) -> nn.Module:
    """The reference's full OpenCLIP model (image + text towers) with the checkpoint's weights, strictly loaded."""
    clip_state = {k[len(CLIP_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(CLIP_PREFIX)}
    clip_state.pop("attn_mask", None)
    clip_model = build_open_clip_model(config.clip_model_config)
    expected = clip_model.state_dict()
    missing = sorted(CLIP_PREFIX + k for k in expected if k not in clip_state)
    unexpected = sorted(CLIP_PREFIX + k for k in clip_state if k not in expected)
    mismatched = sorted(
        f"{CLIP_PREFIX}{k}: checkpoint {tuple(v.shape)} vs {config.clip_model_name} {tuple(expected[k].shape)}"
        for k, v in clip_state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    problems = _key_problems(("missing CLIP keys", missing), ("unexpected CLIP keys", unexpected),
                             ("CLIP shape mismatches", mismatched))
    if problems:
        raise ReferenceCheckpointError(
            f"The checkpoint's backbone does not match the OpenCLIP architecture {config.clip_model_name!r}:\n"
            + "\n".join(problems)
        )
    clip_model.load_state_dict(clip_state, strict=True)
    return clip_model.eval()


def _text_embeddings(
    state_dict: Mapping[str, torch.Tensor], config: DearliConfig, clip_model: nn.Module, device: str | torch.device
) -> tuple[torch.Tensor, str]:
    """Class text embeddings (S, D): the checkpoint's text classifier if it has one, else re-encoded with its CLIP
    text tower. Returns the embeddings and a short description of their source."""
    synonyms = [s for name in config.class_names for s in split_synonyms(name)]
    for key in TEXT_CLASSIFIER_KEYS:
        if key in state_dict:
            classifier = state_dict[key].float()
            if classifier.shape[0] == len(synonyms) + 1:  # with the void row appended at run time
                classifier = classifier[:-1]
            if tuple(classifier.shape) != (len(synonyms), config.clip_embed_dim):
                raise ReferenceCheckpointError(
                    f"Checkpoint text classifier {key!r} has shape {tuple(state_dict[key].shape)}, expected "
                    f"({len(synonyms)}, {config.clip_embed_dim}) for the {len(synonyms)} synonyms of the dataset"
                )
            return torch.nn.functional.normalize(classifier, dim=-1), f"checkpoint key {key!r}"
    encoder = ClipTextEncoder(clip_model, config.clip_model_config.get("text_cfg", {})).to(device)
    embeddings = encoder.encode_synonyms(synonyms, config.prompt_templates).cpu()
    return embeddings, f"re-encoded with the checkpoint's CLIP text tower ({len(synonyms)} synonyms)"


def _check_class_count(state_dict: Mapping[str, torch.Tensor], config: DearliConfig) -> bool:
    """Compare the class count of the checkpoint's loss buffer with the vocabulary; True for a class-agnostic
    (decoder warm-up) checkpoint."""
    for key in ("criterion_labeled.empty_weight", "criterion.empty_weight"):
        if key in state_dict:
            trained_classes = int(state_dict[key].numel()) - 1
            if trained_classes == 1 and config.num_classes != 1:
                logger.warning(
                    "%s says the checkpoint was trained class-agnostically (decoder warm-up): its masks are "
                    "meaningful, its M2F-Lang class predictions are not; fine-tune it before use.",
                    key,
                )
                return True
            if trained_classes != config.num_classes:
                raise ReferenceCheckpointError(
                    f"The checkpoint was trained with {trained_classes} classes ({key} has {trained_classes + 1} "
                    f"entries) but the vocabulary has {config.num_classes}: wrong --dataset?"
                )
            return False
    return False


@dataclass
class ConversionResult:
    """A converted model and how its parts were obtained."""

    model: DearliForPanopticSegmentation
    text_embeddings_source: str
    class_agnostic: bool  # a decoder warm-up checkpoint (trained with a single class-agnostic class)
    # Reference tensors whose values our model holds: every key copied (a fused self-attention projection once; the
    # CLIP text tower only when the model keeps it) plus a checkpoint text classifier. Keys only read (the text tower
    # that encodes the class names) or ignored are not counted.
    converted_keys: int


def convert_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: DearliConfig,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    model: DearliForPanopticSegmentation | None = None,
) -> ConversionResult:
    """Build a `DearliForPanopticSegmentation` for `config` (or fill `model`, built for `config`) with the weights
    of a reference state dict.

    Every parameter and buffer of our model must come from exactly one reference key (or be computed here) and every
    reference key must be used or known to be irrelevant; otherwise a `ReferenceCheckpointError` lists the offending
    keys. Shapes are checked key by key.
    """
    say = progress or logger.info
    state_dict = dict(state_dict)
    mask_pooling_keys = sorted(k for k in state_dict if "_mask_pooling_proj" in k)
    if mask_pooling_keys:
        raise ReferenceCheckpointError(
            "The checkpoint has decoder mask-pooling projections (FC-CLIP's INCLUDE_MASK_POOLINGS=True), which DEARLi "
            f"does not use:{_format_keys(mask_pooling_keys)}"
        )
    class_agnostic = _check_class_count(state_dict, config)

    if model is None:
        say("building the target model")
        model = DearliForPanopticSegmentation(config)
    elif (model.config.class_names, model.config.num_queries) != (config.class_names, config.num_queries):
        raise ValueError("`model` was not built for `config`")
    ours = model.state_dict()

    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for key, target in ours.items():
        source = reference_source(key)
        if source is None:
            continue
        ref_key, part = source
        if ref_key not in state_dict:
            missing.append(f"{ref_key}  (for {key})")
            continue
        tensor = state_dict[ref_key]
        if part is not None:
            if tensor.shape[0] % 3:
                mismatched.append(f"{ref_key}: fused projection with {tensor.shape[0]} rows is not divisible by 3")
                continue
            third = tensor.shape[0] // 3
            tensor = tensor[part * third : (part + 1) * third]
        if tuple(tensor.shape) != tuple(target.shape):
            mismatched.append(f"{ref_key} {tuple(tensor.shape)} -> {key} {tuple(target.shape)}")
            continue
        converted[key] = tensor.to(target.dtype).clone()
        used.add(ref_key)

    clip_keys = {k for k in state_dict if k.startswith(CLIP_PREFIX)}
    unexpected = sorted(
        k
        for k in state_dict
        if k not in used
        and k not in clip_keys
        and not IGNORED_REFERENCE_KEYS.match(k)
        and k not in TEXT_CLASSIFIER_KEYS
    )
    problems = _key_problems(("missing reference keys", missing), ("unexpected reference keys", unexpected),
                             ("shape mismatches", mismatched))
    if problems:
        raise ReferenceCheckpointError(
            "The checkpoint does not match the reference DEARLi architecture for this configuration "
            f"({config.num_queries} queries, {config.decoder_layers} decoder layers, {config.encoder_layers} "
            f"pixel-decoder layers, CLIP {config.clip_model_name!r}):\n" + "\n".join(problems)
        )

    say("loading the CLIP towers")
    clip_model = _load_clip(state_dict, config)  # validates every backbone.clip_model.* key
    say("encoding the class names")
    embeddings, source = _text_embeddings(state_dict, config, clip_model, device)
    copied = len(used) + sum(key in state_dict and source == f"checkpoint key {key!r}" for key in TEXT_CLASSIFIER_KEYS)
    logger.info("Text embeddings: %s", source)
    converted["text_embeddings"] = embeddings.to(ours["text_embeddings"].dtype)
    for key, value in ours.items():
        if key not in converted:  # text_class_index, criterion.empty_weight: from our own config
            converted[key] = value
    model.load_state_dict(converted, strict=True)
    model.freeze_clip_towers()
    return ConversionResult(model.eval(), source, class_agnostic, copied)


@torch.no_grad()
def verify_converted_model(model: DearliForPanopticSegmentation, image_size: int = 128) -> dict[str, tuple[int, ...]]:
    """Run one random image through the converted model and check every output's shape and finiteness."""
    config = model.config
    device = next(model.parameters()).device
    pixel_values = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    out = model.eval()(pixel_values)
    q, c = config.num_queries, config.num_classes
    expected = {
        "class_queries_logits": (1, q, c + 1),
        "masks_queries_logits": (1, q, image_size // 4, image_size // 4),
        "clip_class_logits": (1, q, c),
    }
    shapes = {}
    for name, shape in expected.items():
        value = getattr(out, name)
        if value is None or tuple(value.shape) != shape:
            raise ReferenceCheckpointError(
                f"Converted model output {name} has shape {None if value is None else tuple(value.shape)}, "
                f"expected {shape}"
            )
        if not torch.isfinite(value).all():
            raise ReferenceCheckpointError(f"Converted model output {name} is not finite")
        shapes[name] = shape
    return shapes


# The DearliConfig settings `reference_config` takes from a `base_config`: the architecture only. Everything else
# (prompt templates, ensemble_alpha, loss settings) is the reference's, so that the converted model's text embeddings
# follow its 14 templates and its inference its ensembling weight.
ARCHITECTURE_KEYS: tuple[str, ...] = (
    "clip_model_name", "clip_pretrained", "clip_model_config", "keep_text_tower", "num_queries", "decoder_layers",
    "hidden_dim", "num_attention_heads", "dim_feedforward", "encoder_layers", "encoder_feedforward_dim",
    "feature_size", "mask_feature_size", "feature_strides", "common_stride", "pre_norm", "enforce_input_projection",
    "class_embed_layers",
)  # fmt: skip


def reference_config(
    class_names: list[str], thing_ids: list[int], base_config: DearliConfig | None = None, **overrides: Any
) -> DearliConfig:
    """The DearliConfig of a reference checkpoint: the full default (ConvNeXt-B ``convnext_base_w_320``, 200 queries,
    10 decoder layers, 6 deformable layers) or `base_config`'s architecture (:data:`ARCHITECTURE_KEYS` only), with
    the dataset's vocabulary, the reference's 14 prompt templates and its ensembling weight; `overrides` win."""
    kwargs = {key: getattr(base_config, key) for key in ARCHITECTURE_KEYS if hasattr(base_config, key)}
    kwargs["ensemble_alpha"] = round(1.0 - REFERENCE_GEOMETRIC_ENSEMBLE_ALPHA, 6)
    kwargs.update(overrides)
    return DearliConfig(class_names=class_names, thing_ids=thing_ids, **kwargs)
