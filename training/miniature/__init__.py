"""DEARLi in miniature: a generated panoptic world and a tiny CLIP pretrained on it, so that the method's claims can be
measured on a CPU. ``world`` generates the dataset (COCO panoptic format); ``tiny_clip`` holds the CLIP's architecture,
caption stream, pretraining and DEARLi built on it, ``tiny_clip_zero_shot`` its zero-shot evaluation; ``assets/`` ships
the pretrained tiny CLIP."""

from .tiny_clip import (
    SHIPPED_CONFIG,
    SHIPPED_RECORD,
    SHIPPED_WEIGHTS,
    TINY_CLIP_MODEL_CONFIG,
    dearli_on_tiny_clip,
    world_class_names,
)
from .tiny_clip_zero_shot import zero_shot_report
from .world import (
    CLASSES,
    STUFF_CLASSES,
    THING_CLASSES,
    WorldSettings,
    generate_world,
    world_paths,
)

__all__ = [
    "CLASSES",
    "SHIPPED_CONFIG",
    "SHIPPED_RECORD",
    "SHIPPED_WEIGHTS",
    "STUFF_CLASSES",
    "THING_CLASSES",
    "TINY_CLIP_MODEL_CONFIG",
    "WorldSettings",
    "dearli_on_tiny_clip",
    "generate_world",
    "world_class_names",
    "world_paths",
    "zero_shot_report",
]
