"""What the loops train on: augmented panoptic ground truth (supervised, SSL labeled part), weak views of unlabeled
images (SSL) and SAM masks (DeWa), and the functions that build them from the loops' arguments.

The datasets take an index or an ``(index, seed)`` pair from :class:`training.data.sampler.ResumableSampler`; the seed
drives the geometric augmentation (:class:`training.data.transforms.LargeScaleJitter`), so an example is a pure
function of ``(index, seed)``. Items are dicts the :class:`training.data.collator.DearliDataCollator` collates::

    {"pixel_values": (3, h, w) CLIP-normalised (unlabeled weak views: RGB in [0, 1]), "pixel_mask": (h, w) 1 = image /
     0 = padding, "mask_labels": (n, h, w) float, "class_labels": (n,) int64, "image_id": ...}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .panoptic_datasets import (
    ClassNames,
    load_panoptic_dataset,
    panoptic_target_from_row,
    restrict_to_present_classes,
    split_labeled_unlabeled,
)
from .sampler import unpack_index
from .transforms import (
    GeometricParams,
    LargeScaleJitter,
    apply_to_id_map,
    apply_to_image,
    fixed_params,
    normalize_image,
    panoptic_to_targets,
    sam_record_to_targets,
    valid_pixel_mask,
)

__all__ = [
    "PanopticTrainDataset",
    "PanopticTrainingData",
    "SamMasksTrainDataset",
    "UnlabeledTrainDataset",
    "load_panoptic_training_data",
    "load_rgb_image",
    "row_image",
    "sam_masks_train_dataset",
]

logger = logging.getLogger(__name__)


def load_rgb_image(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Open an image as RGB, applying its EXIF orientation (as datasets' Image feature and the SAM generator do)."""
    with Image.open(path) as image:
        image.load()
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def row_image(row: Mapping[str, Any]) -> Image.Image:
    """The ``image`` of a dataset row: a PIL image, or a path opened with :func:`load_rgb_image`."""
    image = row["image"]
    return load_rgb_image(image) if isinstance(image, (str, os.PathLike)) else image


def _sample_geometry(transform: LargeScaleJitter | None, height: int, width: int, seed: int) -> GeometricParams:
    """The augmentation of one example: drawn from its own seed, or the identity without a transform."""
    if transform is None:
        return fixed_params((height, width))
    return transform.sample(height, width, torch.Generator().manual_seed(seed))


class _AugmentedRows(Dataset):
    """Rows of a `training.data.panoptic_datasets` dataset (or any rows with an ``image``) under `transform`."""

    def __init__(self, dataset: Any, transform: LargeScaleJitter | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def _row(self, key: int | tuple[int, int]) -> tuple[Mapping[str, Any], Image.Image, int]:
        """The row of `key`, its image and its augmentation seed."""
        index, seed = unpack_index(key)
        row = self.dataset[index]
        return row, row_image(row), seed


class PanopticTrainDataset(_AugmentedRows):
    """Ground-truth panoptic examples of a `training.data.panoptic_datasets` dataset under random scale / crop / flip.

    Args:
        dataset: rows with ``image``, ``panoptic``, ``segments_info`` (see `training.data.panoptic_datasets`).
        transform: the geometric augmentation (None: the image as is).
        return_id_map: also return the augmented ``id_map`` (H, W) int64 and ``segments`` (for CutMix / debugging).
    """

    def __init__(self, dataset: Any, transform: LargeScaleJitter | None, return_id_map: bool = False) -> None:
        super().__init__(dataset, transform)
        self.return_id_map = return_id_map

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        row, image, seed = self._row(key)
        target = panoptic_target_from_row(row)
        id_map = torch.from_numpy(target.training_id_map().astype(np.int64))  # crowd -> void
        height, width = id_map.shape
        if (image.height, image.width) != (height, width):
            raise ValueError(f"image {row.get('image_id')!r}: image {image.size[::-1]} and panoptic {(height, width)} "
                             "sizes differ")
        params = _sample_geometry(self.transform, height, width, seed)
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
        params = _sample_geometry(self.transform, height, width, seed)
        mask_labels, class_labels = sam_record_to_targets(record, params)
        return {
            "pixel_values": normalize_image(apply_to_image(image, params)),
            "pixel_mask": valid_pixel_mask(params),
            "mask_labels": mask_labels,
            "class_labels": class_labels,
            "image_id": record["image_id"],
        }


class UnlabeledTrainDataset(_AugmentedRows):
    """Weak views of unlabeled images: ``{"pixel_values": (3, h, w) RGB in [0, 1] (not normalised; padding = CLIP
    mean), "pixel_mask": (h, w), "image_id"}``. Rows need an ``image`` (PIL image or path); labels are ignored.

    The SSL step normalises the weak view for the teacher and derives the student's strong view from it.
    """

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        row, image, seed = self._row(key)
        params = _sample_geometry(self.transform, image.height, image.width, seed)
        return {
            "pixel_values": apply_to_image(image, params),
            "pixel_mask": valid_pixel_mask(params),
            "image_id": row.get("image_id"),
        }


# --------------------------------------------------------------------------------------------------------------------
# From the loops' arguments (training.arguments)
# --------------------------------------------------------------------------------------------------------------------
def sam_masks_train_dataset(args: Any) -> SamMasksTrainDataset:
    """DeWa's data: the SAM records of every ``--sam_masks_dir`` paired with its ``--image_dir``, under the random
    scale / crop / flip of ``--crop_size``, ``--min_scale``, ``--max_scale``, ``--flip_prob``."""
    from .sam_masks import load_sam_masks

    image_dirs = args.image_dir * len(args.sam_masks_dir) if len(args.image_dir) == 1 else args.image_dir
    sources = []
    for masks_dir, image_dir in zip(args.sam_masks_dir, image_dirs):
        records = load_sam_masks(masks_dir)
        if len(records) == 0:
            raise ValueError(f"no SAM masks in {masks_dir}: run scripts/generate_sam_masks.py first")
        sources.append((records, image_dir))
    transform = LargeScaleJitter(args.crop_size, args.min_scale, args.max_scale, args.flip_prob)
    return SamMasksTrainDataset(sources, transform, exif_transpose=not args.no_exif_transpose)


@dataclass
class PanopticTrainingData:
    """A panoptic dataset as a loop uses it: labeled training rows, the unlabeled rest (``None`` when every training
    image is labeled), validation rows (``None`` without validation data) and the label space."""

    labeled: Any
    unlabeled: Any | None
    validation: Any | None
    class_names: ClassNames


def load_panoptic_training_data(args: Any) -> PanopticTrainingData:
    """The panoptic data arguments (``--dataset_name``, the folders, ``--class_names_file``, ``--partition`` /
    ``--labeled_fraction``,
    ``--restrict_to_present_classes``, ``--max_eval_images``) -> :class:`PanopticTrainingData`.

    With ``--restrict_to_present_classes`` the label space is the classes annotated in the training set (before the
    labeled / unlabeled split); validation segments of other classes are dropped.
    """
    train, class_names = load_panoptic_dataset(
        args.dataset_name, images_dir=args.train_images_dir, panoptic_dir=args.train_panoptic_dir,
        annotations_json=args.train_annotations, ade20k_root=args.ade20k_root, split="training", with_semantic=False,
        class_names_file=args.class_names_file,
    )
    val = None
    if args.dataset_name == "ade20k" or args.val_annotations:
        val, _ = load_panoptic_dataset(
            args.dataset_name, images_dir=args.val_images_dir or args.train_images_dir,
            panoptic_dir=args.val_panoptic_dir or args.train_panoptic_dir, annotations_json=args.val_annotations,
            ade20k_root=args.ade20k_root, split="validation", class_names_file=args.class_names_file,
        )
    if args.restrict_to_present_classes:
        train, class_names, val = restrict_to_present_classes(train, class_names, val)
    unlabeled = None
    if args.partition:
        split_name = "coco" if args.dataset_name.startswith("coco") else args.dataset_name
        train, unlabeled = split_labeled_unlabeled(train, dataset=split_name, partition=args.partition)
    elif args.labeled_fraction:
        train, unlabeled = split_labeled_unlabeled(train, fraction=args.labeled_fraction, seed=args.seed)
    if args.max_eval_images is not None and val is not None:
        val = val.select(range(min(args.max_eval_images, len(val))))
    return PanopticTrainingData(train, unlabeled, val, class_names)
