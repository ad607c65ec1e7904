"""Build the model a training loop starts from: a preset, an OpenCLIP model, or a saved DEARLi (``--init_from``).

With ``--init_from`` the class names come from the training data: a model with the same vocabulary is used as is; a
model that kept its CLIP text tower re-encodes the new names (``set_class_names``); otherwise the saved backbone and
decoder weights are copied into a fresh model built from the same CLIP architecture whose text tower (from
``--clip_pretrained``, or the saved ``config.clip_pretrained``) encodes the new names.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any

import torch

from modeling_dearli import DearliConfig, DearliForPanopticSegmentation, tiny_model

from .pretrained import check_finite_weights, check_model_location

__all__ = ["DECODER_INITS", "DECODER_INIT_ALIASES", "adapt_class_names", "apply_decoder_init", "build_model"]

logger = logging.getLogger(__name__)

# DearliConfig arguments that describe the architecture / loss (copied when rebuilding a model for new classes).
_NOT_COPIED = {"self", "kwargs", "class_names", "thing_ids", "clip_model_name", "clip_pretrained", "keep_text_tower"}
_COPIED_CONFIG_KEYS = [p for p in inspect.signature(DearliConfig.__init__).parameters if p not in _NOT_COPIED]
_TEXT_BUFFERS = ("text_embeddings", "text_class_index")
# Initial decoder weights of a fresh model, named by their distribution: "xavier" is the model's own (transformers'
# Mask2Former + the reference's pixel-decoder fills: Xavier-uniform, a deformable sampling grid;
# modeling_dearli/initialization.py); "normal" draws N(0, init_std) everywhere, with no sampling grid.
DECODER_INITS = ("xavier", "normal")
# Accepted spellings of DECODER_INITS values (scripts written for an earlier release).
DECODER_INIT_ALIASES = {"reference": "xavier"}
# Config settings of the loss and of inference, not of the architecture: the ones --model_config_overrides may change
# for an --init_from model (the criterion is rebuilt).
_OVERRIDABLE_KEYS = {"class_weight", "mask_weight", "dice_weight", "no_object_weight", "train_num_points",
                     "oversample_ratio", "importance_sample_ratio", "use_auxiliary_loss", "localization_only",
                     "ensemble_alpha", "mask_pooling_threshold"}


def _config_overrides(args: Any) -> dict[str, Any]:
    overrides = dict(json.loads(args.model_config_overrides)) if getattr(args, "model_config_overrides", None) else {}
    unknown = set(overrides) - set(_COPIED_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown DearliConfig keys in --model_config_overrides: {sorted(unknown)}")
    for key in ("num_queries", "train_num_points", "ensemble_alpha"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return overrides


def adapt_class_names(
    model: DearliForPanopticSegmentation,
    class_names: list[str],
    thing_ids: list[int],
    clip_pretrained: str | None = None,
) -> DearliForPanopticSegmentation:
    """Return `model` (or a rebuilt copy) whose vocabulary is `class_names` / `thing_ids` (see the module doc)."""
    config = model.config
    if list(config.class_names) == list(class_names):
        if sorted(config.thing_ids) != sorted(thing_ids):
            config.thing_ids = sorted(set(int(t) for t in thing_ids))
        return model
    if model.text_encoder is not None:
        logger.info("Re-encoding %d class names with the kept CLIP text tower", len(class_names))
        model.set_class_names(list(class_names), list(thing_ids))
        return model
    pretrained = clip_pretrained or config.clip_pretrained
    if pretrained is None:
        logger.warning(
            "The initial model has no CLIP text tower and no CLIP weights are known (clip_pretrained=None): the new "
            "class names are encoded with a RANDOM text tower. Pass --clip_pretrained or save the initial model with "
            "keep_text_tower=True."
        )
    logger.info("Rebuilding the model for %d new class names (CLIP %s, %s)", len(class_names), config.clip_model_name,
                pretrained)
    kwargs = {key: getattr(config, key) for key in _COPIED_CONFIG_KEYS if hasattr(config, key)}
    fresh = DearliForPanopticSegmentation.from_open_clip(
        config.clip_model_name, pretrained, class_names=list(class_names), thing_ids=list(thing_ids), **kwargs
    )
    # Everything but the vocabulary: text buffers, the (absent) text tower and the loss's class-count-sized buffers.
    skipped = (*_TEXT_BUFFERS, "text_encoder.", "criterion.")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(skipped)}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(skipped)]
    if missing or unexpected:
        raise RuntimeError(f"cannot copy the initial weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.freeze_clip_towers()
    return fresh


def apply_decoder_init(model: DearliForPanopticSegmentation, scheme: str = "xavier") -> None:
    """Initial decoder weights of a fresh `model` by `scheme` (:data:`DECODER_INITS`).

    ``"xavier"`` keeps what the model was built with (the reference's initialisation). ``"normal"`` redraws the
    decoder with Mask2Former's ``_init_weights`` applied only to modules with parameters of their own:
    N(0, ``config.init_std``) weights and zero biases for every linear / convolution (the deformable sampling offsets
    included: no sampling grid), N(0, 1) embeddings, PyTorch's default cross-attention init. For comparisons with
    models initialised that way.
    """
    scheme = DECODER_INIT_ALIASES.get(scheme, scheme)
    if scheme not in DECODER_INITS:
        raise ValueError(f"unknown decoder_init {scheme!r}; known: {DECODER_INITS}")
    if scheme == "xavier":
        return
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPreTrainedModel

    frozen = {id(m) for part in (model.backbone, model.text_encoder, model.criterion) if part is not None
              for m in part.modules()}
    modules = [m for m in model.modules() if id(m) not in frozen and m is not model]
    with torch.no_grad():
        for module in reversed(modules):  # children before their parents, as transformers' initialisation runs
            if next(module.parameters(recurse=False), None) is not None:
                Mask2FormerPreTrainedModel._init_weights(model, module)


def build_model(
    args: Any, class_names: list[str], thing_ids: list[int], localization_only: bool = False
) -> DearliForPanopticSegmentation:
    """The initial model of a loop from its ``--model_preset`` / ``--clip_model_name`` / ``--clip_pretrained`` /
    ``--init_from`` / ``--keep_text_tower`` / ``--num_queries`` / ``--train_num_points`` / ``--ensemble_alpha`` /
    ``--model_config_overrides`` / ``--decoder_init`` arguments."""
    overrides = _config_overrides(args)
    decoder_init = getattr(args, "decoder_init", None) or "xavier"
    decoder_init = DECODER_INIT_ALIASES.get(decoder_init, decoder_init)
    keep_text_tower = bool(getattr(args, "keep_text_tower", False))
    seed = int(getattr(args, "seed", 0))
    if getattr(args, "init_from", None):
        if decoder_init != "xavier":
            raise ValueError("--decoder_init applies to a fresh model; an --init_from model keeps its weights")
        location = check_model_location(args.init_from)
        model = check_finite_weights(DearliForPanopticSegmentation.from_pretrained(location), location)
        model = adapt_class_names(model, class_names, thing_ids, getattr(args, "clip_pretrained", None))
        architecture = set(_COPIED_CONFIG_KEYS) - _OVERRIDABLE_KEYS
        for key, value in overrides.items():
            if key in architecture and value != getattr(model.config, key):
                raise ValueError(f"{key} cannot be changed for an --init_from model (only loss settings can)")
            setattr(model.config, key, value)
        # (Re)build the criterion for this stage's loss: localization-only for DeWa, full loss afterwards.
        model.set_localization_only(localization_only)
    elif getattr(args, "model_preset", None) == "tiny":
        model = tiny_model(class_names=list(class_names), thing_ids=list(thing_ids), seed=seed,
                           keep_text_tower=keep_text_tower, localization_only=localization_only, **overrides)
    else:
        torch.manual_seed(seed)
        model = DearliForPanopticSegmentation.from_open_clip(
            args.clip_model_name, getattr(args, "clip_pretrained", None), class_names=list(class_names),
            thing_ids=list(thing_ids), keep_text_tower=keep_text_tower, localization_only=localization_only,
            **overrides,
        )
    if not getattr(args, "init_from", None):
        apply_decoder_init(model, decoder_init)
    model.freeze_clip_towers()
    return model
