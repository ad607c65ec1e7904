"""SAM for class-agnostic masks: the model types (segment_anything's builders), loading a checkpoint without
downloading anything, and the automatic mask generator's settings."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


# Builders return randomly initialised models: segment_anything's own (the tests register a tiny one).
SAM_MODEL_REGISTRY: dict[str, Callable[[], Sam]] = {
    "vit_h": partial(sam_model_registry["vit_h"], checkpoint=None),
    "vit_l": partial(sam_model_registry["vit_l"], checkpoint=None),
    "vit_b": partial(sam_model_registry["vit_b"], checkpoint=None),
}


def build_sam(model_type: str, checkpoint: PathLike, device: str | torch.device = "cpu") -> Sam:
    """Build a SAM of `model_type` and load its `checkpoint` (a state dict file; nothing is ever downloaded).

    Unlike segment_anything's builders this loads with ``weights_only=True`` and ``map_location="cpu"``.
    """
    if model_type not in SAM_MODEL_REGISTRY:
        raise ValueError(f"Unknown SAM model type {model_type!r}; choose from {sorted(SAM_MODEL_REGISTRY)}")
    if checkpoint is None:
        raise ValueError("A SAM checkpoint path is required (nothing is downloaded)")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {path} not found. Download the official {model_type} checkpoint from the "
            "segment-anything repository yourself; this tool downloads nothing."
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable or non-weights file
        raise ValueError(f"cannot read SAM checkpoint {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"SAM checkpoint {path} holds a {type(state_dict).__name__}, not a state dict")
    sam = SAM_MODEL_REGISTRY[model_type]()
    expected = sam.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        example = (f"{reshaped[0]}: {tuple(state_dict[reshaped[0]].shape)} in the file, "
                   f"{tuple(expected[reshaped[0]].shape)} in {model_type}" if reshaped else (missing or unexpected)[0])
        raise ValueError(f"SAM checkpoint {path} does not fit --model_type {model_type}: {len(missing)} tensors "
                         f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape (e.g. {example}); "
                         f"pass the model type the checkpoint was made for ({', '.join(sorted(SAM_MODEL_REGISTRY))})")
    sam.load_state_dict(state_dict)
    return sam.to(device).eval()


def register_sam_model(model_type: str, builder: Callable[[], Sam]) -> None:
    """Make `builder` (no arguments, returns a randomly initialised `Sam`) available as ``--model_type model_type``."""
    SAM_MODEL_REGISTRY[model_type] = builder


@dataclass
class SamGeneratorConfig:
    """Settings of `SamAutomaticMaskGenerator`; the defaults are the reference ones (SAM's own, ViT-H)."""

    model_type: str = "vit_h"
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0  # > 0 needs opencv

    def generator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `SamAutomaticMaskGenerator` (masks as COCO RLE)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model_type"}
        return {**kwargs, "output_mode": "coco_rle"}

    def identity(self) -> dict[str, Any]:
        """The settings that change the masks (everything but ``points_per_batch``)."""
        return {k: v for k, v in asdict(self).items() if k != "points_per_batch"}
