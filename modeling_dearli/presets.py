"""Small named configurations: a tiny DEARLi for tests and the CPU demo."""

from __future__ import annotations

from typing import Any

from .configuration_dearli import DearliConfig

# A tiny OpenCLIP-compatible architecture: timm ConvNeXt-Atto image tower, 1-layer text tower, 64-d joint space.
TINY_CLIP_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {
        "timm_model_name": "convnext_atto",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "timm_drop": 0.0,
        "timm_drop_path": 0.0,
        "image_size": 64,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


TINY_CLIP_MODEL_NAME = "dearli-tiny-convnext"

# Decoder sizes of the tiny configuration (everything else keeps the paper's defaults).
TINY_DECODER_KWARGS: dict[str, Any] = dict(
    prompt_templates=["a photo of a {}.", "There is a {} in the scene"],
    num_queries=16,
    decoder_layers=3,
    hidden_dim=64,
    num_attention_heads=4,
    dim_feedforward=128,
    encoder_layers=1,
    encoder_feedforward_dim=128,
    feature_size=64,
    mask_feature_size=64,
    train_num_points=1024,
)


def tiny_config(
    class_names: list[str] | None = None, thing_ids: list[int] | None = None, **overrides: Any
) -> DearliConfig:
    """A few-million-parameter DEARLi configuration that runs in well under a second per image on a CPU."""
    kwargs: dict[str, Any] = dict(
        clip_model_name=TINY_CLIP_MODEL_NAME,
        clip_pretrained=None,
        clip_model_config=TINY_CLIP_MODEL_CONFIG,
        **TINY_DECODER_KWARGS,
    )
    kwargs.update(overrides)
    return DearliConfig(class_names=class_names or ["person", "sky", "grass"], thing_ids=thing_ids, **kwargs)


def tiny_model(
    class_names: list[str] | None = None,
    thing_ids: list[int] | None = None,
    clip_checkpoint: str | None = None,
    seed: int = 0,
    **overrides: Any,
):
    """A tiny `DearliForPanopticSegmentation` with class text embeddings encoded by its (random or given) CLIP
    towers: `clip_checkpoint` is an optional local OpenCLIP state-dict file of `TINY_CLIP_MODEL_CONFIG`."""
    import torch

    from .modeling_dearli import DearliForPanopticSegmentation

    kwargs: dict[str, Any] = dict(clip_model_config=TINY_CLIP_MODEL_CONFIG, **TINY_DECODER_KWARGS)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return DearliForPanopticSegmentation.from_open_clip(
        TINY_CLIP_MODEL_NAME,
        clip_checkpoint,
        class_names=class_names or ["person", "sky", "grass"],
        thing_ids=thing_ids,
        **kwargs,
    )
