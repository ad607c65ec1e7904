"""Augmented training datasets: panoptic ground truth (supervised / SSL labeled part) and SAM masks (DeWa).

Both take an index or an ``(index, seed)`` pair from :class:`training.common.ResumableSampler`; the seed drives the
geometric augmentation (:class:`training.data.transforms.LargeScaleJitter`), so an example is a pure function of
``(index, seed)``. Items are dicts the :class:`training.data.collator.DearliDataCollator` collates::

    {"pixel_values": (3, h, w) CLIP-normalised, "pixel_mask": (h, w) 1 = image / 0 = padding,
     "mask_labels": (n, h, w) float, "class_labels": (n,) int64, "image_id": ...}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..common import unpack_index
from .transforms import (
    LargeScaleJitter,
    apply_to_id_map,
    apply_to_image,
    normalize_image,
    panoptic_to_targets,
    sam_record_to_targets,
    valid_pixel_mask,
)

__all__ = ["PanopticTrainDataset", "SamMasksTrainDataset", "load_rgb_image"]

logger = logging.getLogger(__name__)


def load_rgb_image(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Open an image as RGB, applying its EXIF orientation (as datasets' Image feature and the SAM generator do)."""
    with Image.open(path) as image:
        image.load()
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


class PanopticTrainDataset(Dataset):
    """Ground-truth panoptic examples of a `training.data.panoptic_datasets` dataset under random scale / crop / flip.

    Args:
        dataset: rows with ``image``, ``panoptic``, ``segments_info`` (see `training.data.panoptic_datasets`).
        transform: the geometric augmentation (None: the image as is).
        return_id_map: also return the augmented ``id_map`` (H, W) int64 and ``segments`` (for CutMix / debugging).
    """

    def __init__(self, dataset: Any, transform: LargeScaleJitter | None, return_id_map: bool = False) -> None:
        self.dataset = dataset
        self.transform = transform
        self.return_id_map = return_id_map

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from .panoptic_datasets import panoptic_target_from_row

        index, seed = unpack_index(key)
        row = self.dataset[index]
        image = row["image"]
        if isinstance(image, (str, os.PathLike)):
            image = load_rgb_image(image)
        target = panoptic_target_from_row(row)
        id_map = torch.from_numpy(target.training_id_map().astype(np.int64))  # crowd -> void
        height, width = id_map.shape
        if (image.height, image.width) != (height, width):
            raise ValueError(f"image {row.get('image_id')!r}: image {image.size[::-1]} and panoptic {(height, width)} "
                             "sizes differ")
        if self.transform is None:
            from .transforms import fixed_params

            params = fixed_params((height, width))
        else:
            params = self.transform.sample(height, width, torch.Generator().manual_seed(seed))
        pixel_values = normalize_image(apply_to_image(image, params))
        id_map = apply_to_id_map(id_map, params)
        mask_labels, class_labels = panoptic_to_targets(id_map, target.instance_id_to_label())
        item = {
            "pixel_values": pixel_values,
            "pixel_mask": valid_pixel_mask(params),
            "mask_labels": mask_labels,
            "class_labels": class_labels,
            "image_id": row.get("image_id"),
        }
        if self.return_id_map:
            item["id_map"] = id_map
            item["segments"] = target.segments
        return item


class SamMasksTrainDataset(Dataset):
    """Class-agnostic DeWa examples: images with their SAM masks (`training.data.sam_masks.load_sam_masks` records).

    Args:
        sources: ``(records, image_root)`` pairs; a record's image is ``image_root / record["file_name"]`` (the
            folder `scripts/generate_sam_masks.py` read). Several pairs are concatenated (e.g. labeled + unlabeled).
        transform: the geometric augmentation applied to the image and every mask.
        exif_transpose: apply EXIF orientation (must match the SAM generation setting, default True).
    """

    def __init__(
        self,
        sources: Sequence[tuple[Any, str | os.PathLike]],
        transform: LargeScaleJitter | None,
        exif_transpose: bool = True,
    ) -> None:
        self.sources = [(records, Path(root)) for records, root in sources]
        self.offsets = np.cumsum([0] + [len(records) for records, _ in self.sources])
        self.transform = transform
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = unpack_index(key)
        if not 0 <= index < len(self):
            raise IndexError(index)
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        records, root = self.sources[source]
        record = records[index - int(self.offsets[source])]
        if not record.get("file_name"):
            raise ValueError(f"SAM record {record.get('image_id')!r} has no file_name to find its image")
        image = load_rgb_image(root / record["file_name"], self.exif_transpose)
        height, width = int(record["height"]), int(record["width"])
        if (image.height, image.width) != (height, width):
            raise ValueError(
                f"{root / record['file_name']}: image size {(image.height, image.width)} differs from its SAM record "
                f"{(height, width)}"
            )
        if self.transform is None:
            from .transforms import fixed_params

            params = fixed_params((height, width))
        else:
            params = self.transform.sample(height, width, torch.Generator().manual_seed(seed))
        mask_labels, class_labels = sam_record_to_targets(record, params)
        return {
            "pixel_values": normalize_image(apply_to_image(image, params)),
            "pixel_mask": valid_pixel_mask(params),
            "mask_labels": mask_labels,
            "class_labels": class_labels,
            "image_id": record["image_id"],
        }
