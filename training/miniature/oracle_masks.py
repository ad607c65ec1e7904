"""An *oracle* mask source for the miniature reproduction's ``dearli_oracle_masks`` row: the world's ground-truth
segments of each training image, without their classes, as class-agnostic masks for the decoder warm-up (DeWa).

SAM's automatic masks on real photographs follow objects and regions; the Felzenszwalb masks that stand in for SAM here
follow texture (things split into pattern cells, stuff into patches). This row asks whether DeWa helps when its masks
are good, not whether it helps with the masks a user can have: it is never a headline row. Only the segments'
*shapes* reach the decoder (DeWa trains the localization loss alone, one class-agnostic class); classes are never
read.

:class:`GroundTruthMaskGenerator` has SAM's automatic generator interface (``generate(image)`` -> ``coco_rle``
annotations, ``config.identity()``), so :func:`training.data.mask_generation.generate_masks` writes its masks as it
writes SAM's. It finds an image's ground truth by the image's decoded pixels (a digest of the array it is given),
which is how the generator interface identifies images; an image not in the annotation file raises.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.unsupervised_masks import segments_to_annotations

__all__ = ["GroundTruthMaskGenerator", "GroundTruthMasksConfig"]


@dataclass
class GroundTruthMasksConfig:
    """Where the ground truth comes from (recorded in the masks folder; a rerun with another is refused)."""

    annotations: str

    def identity(self) -> dict[str, Any]:
        return {"mask_source": "ground_truth_oracle", "annotations": self.annotations}


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


class GroundTruthMaskGenerator:
    """The ground-truth segments (without classes) of the images of a COCO panoptic annotation file.

    Args:
        images_dir / panoptic_dir / annotations: the split's image folder, panoptic PNG folder and annotation JSON.
    """

    def __init__(self, images_dir: str | Path, panoptic_dir: str | Path, annotations: str | Path) -> None:
        from modeling_dearli.image_reading import read_image

        self.config = GroundTruthMasksConfig(str(annotations))
        data = json.loads(Path(annotations).read_text())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        self._panoptic: dict[str, Path] = {}
        for ann in data["annotations"]:
            image = np.asarray(read_image(Path(images_dir) / files[ann["image_id"]]), dtype=np.uint8)
            self._panoptic[_digest(image)] = Path(panoptic_dir) / ann["file_name"]

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """The ground-truth segments of `image` (uint8 RGB) as ``coco_rle`` annotations, largest first; void pixels
        (id 0) are no mask."""
        from modeling_dearli.image_processing_dearli import rgb_to_id
        from modeling_dearli.image_reading import read_image

        path = self._panoptic.get(_digest(image))
        if path is None:
            raise KeyError("an image without ground truth in " + self.config.annotations)
        ids = rgb_to_id(np.asarray(read_image(path))).astype(np.int64)
        return segments_to_annotations(ids, ignore=(0,))

