"""Test-time image size of each dataset in the released recipe: the shorter side is resized to ``shortest_edge``
unless the longer one would exceed ``longest_edge`` (detectron2's ``ResizeShortestEdge`` with the reference configs'
``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``: ADE20K 640 / 2560, COCO-Panoptic and COCO-Objects 512 / 2048).

Validation inside the loops, the image processor saved with a trained model and ``scripts/evaluate.py`` use it, so
that a model is evaluated and used at the resolution of the paper's tables. Other datasets get
`DearliImageProcessor`'s default (640 / 2560).
"""

from __future__ import annotations

__all__ = ["DEFAULT_EVALUATION_SIZE", "EVALUATION_SIZES", "evaluation_size"]

DEFAULT_EVALUATION_SIZE: dict[str, int] = {"shortest_edge": 640, "longest_edge": 2560}
EVALUATION_SIZES: dict[str, dict[str, int]] = {
    "ade20k": {"shortest_edge": 640, "longest_edge": 2560},  # Base-ADE20K-PanopticSegmentation.yaml
    "coco_panoptic": {"shortest_edge": 512, "longest_edge": 2048},  # the COCO semi-supervised configs
    "coco_objects": {"shortest_edge": 512, "longest_edge": 2048},
}


def evaluation_size(dataset_name: str | None) -> dict[str, int]:
    """``{"shortest_edge", "longest_edge"}`` of `dataset_name` (a copy; unknown names and ``None``: the default)."""
    return dict(EVALUATION_SIZES.get(dataset_name or "", DEFAULT_EVALUATION_SIZE))
