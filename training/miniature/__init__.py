"""DEARLi in miniature: a generated panoptic world and a tiny CLIP pretrained on it, so that the method's claims can be
measured on a CPU. ``world`` generates the dataset (COCO panoptic format); ``tiny_clip`` holds the CLIP's architecture,
caption stream, pretraining and DEARLi built on it, ``tiny_clip_zero_shot`` its zero-shot evaluation; ``assets/`` ships
the pretrained tiny CLIP."""

import importlib
from typing import Any

# Each name is imported from its module on first use: `import training.miniature.world` (the world generator, numpy
# and PIL only) does not import torch through the tiny CLIP.
_EXPORTS = {
    "SHIPPED_CONFIG": "tiny_clip",
    "SHIPPED_RECORD": "tiny_clip",
    "SHIPPED_WEIGHTS": "tiny_clip",
    "TINY_CLIP_MODEL_CONFIG": "tiny_clip",
    "dearli_on_tiny_clip": "tiny_clip",
    "world_class_names": "tiny_clip",
    "zero_shot_report": "tiny_clip_zero_shot",
    "CLASSES": "world",
    "STUFF_CLASSES": "world",
    "THING_CLASSES": "world",
    "WorldSettings": "world",
    "generate_world": "world",
    "world_paths": "world",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
