"""Class-agnostic masks without labels and without SAM weights: an unsupervised segmentation algorithm behind the SAM
masks' shard format, for the decoder warm-up (DeWa) where SAM checkpoints cannot be had.

:class:`FelzenszwalbMaskGenerator` runs Felzenszwalb & Huttenlocher's graph-based segmentation (IJCV 2004, as
implemented by scikit-image's ``skimage.segmentation.felzenszwalb``) and returns its segments in the output format of
segment_anything's ``SamAutomaticMaskGenerator.generate`` with ``output_mode="coco_rle"``, so that
:func:`training.data.mask_generation.generate_masks` writes them as it writes SAM's (same parquet shards, manifest,
resumption) and ``training/dewa.py --masks_dir`` reads them unchanged. Differences from SAM's masks: they
partition the image (no overlapping whole/part masks), and ``predicted_iou`` / ``stability_score`` are NaN (the
algorithm has no such scores). Masks smaller than ``min_area`` pixels (texture fragments) are dropped.

The defaults suit the 256x256 miniature world (``training.miniature``); ``scale`` and ``min_size`` are in pixels, so
scale them with the image area for other data. They were chosen on held-out scenes of the tiny CLIP's evaluation
stream (never a panoptic training or validation image) by recall at IoU 0.5 against the ground-truth segments and the
number of masks per image (``scripts/generate_sam_masks.py --help`` lists them; measured: things 75%, stuff 97%,
15 masks per image, 0.09 CPU-s per image).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["MASK_SOURCES", "FelzenszwalbConfig", "FelzenszwalbMaskGenerator", "segments_to_annotations"]

MASK_SOURCES = ("sam", "felzenszwalb")


@dataclass
class FelzenszwalbConfig:
    """Settings of the Felzenszwalb mask source (recorded in the output folder; a rerun with others is refused).

    Args:
        scale: Felzenszwalb's ``scale`` (higher: larger segments).
        sigma: Width of the Gaussian smoothing before segmentation.
        min_size: Felzenszwalb's minimum component size (pixels), enforced by merging.
        min_area: Masks with fewer pixels are dropped (fragments of textures).
    """

    scale: float = 500.0
    sigma: float = 1.0
    min_size: int = 150
    min_area: int = 300

    def __post_init__(self) -> None:
        if self.scale <= 0 or self.sigma < 0 or self.min_size < 1 or self.min_area < 0:
            raise ValueError(f"invalid Felzenszwalb settings {asdict(self)}: scale > 0, sigma >= 0, min_size >= 1, "
                             "min_area >= 0")

    def identity(self) -> dict[str, Any]:
        """The settings that change the masks (written to the output folder's config file)."""
        return {"mask_source": "felzenszwalb", **asdict(self)}


def segments_to_annotations(labels: np.ndarray, min_area: int = 0, ignore: tuple[int, ...] = ()
                            ) -> list[dict[str, Any]]:
    """A label image (H, W) of segment ids -> ``SamAutomaticMaskGenerator``-style annotations (``coco_rle``), one per
    segment of at least ``min_area`` pixels whose id is not in `ignore`, largest first; ``predicted_iou`` and
    ``stability_score`` are NaN."""
    ids, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    annotations = []
    for segment_id, area in zip(ids[order].tolist(), counts[order].tolist()):
        if area < min_area or segment_id in ignore:
            continue
        rle = mask_utils.encode(np.asfortranarray(labels == segment_id, dtype=np.uint8))
        annotations.append({
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(area),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "predicted_iou": math.nan,
            "stability_score": math.nan,
        })
    return annotations


class FelzenszwalbMaskGenerator:
    """Felzenszwalb's graph-based segmentation with ``SamAutomaticMaskGenerator``'s interface (``generate(image)``).

    Example::

        generate_masks("images/", "masks/", mask_generator=FelzenszwalbMaskGenerator())
    """

    def __init__(self, config: FelzenszwalbConfig | None = None) -> None:
        self.config = config or FelzenszwalbConfig()

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks of a uint8 RGB image (H, W, 3) as ``coco_rle`` annotations (see :func:`segments_to_annotations`)."""
        from skimage.segmentation import felzenszwalb

        labels = felzenszwalb(image, scale=self.config.scale, sigma=self.config.sigma, min_size=self.config.min_size,
                              channel_axis=-1)
        return segments_to_annotations(labels, self.config.min_area)
