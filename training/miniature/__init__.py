"""DEARLi in miniature: a generated panoptic world in which the method's claims can be measured on a CPU.
``world`` generates the dataset (COCO panoptic format)."""

from .world import CLASSES, STUFF_CLASSES, THING_CLASSES, WorldSettings, generate_world, world_paths

__all__ = ["CLASSES", "STUFF_CLASSES", "THING_CLASSES", "WorldSettings", "generate_world", "world_paths"]
