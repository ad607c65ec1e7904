"""What the loops train on: augmented panoptic ground truth (supervised, SSL labeled part), weak views of unlabeled
images (SSL) and class-agnostic masks (DeWa), and the loops' data from plain settings (:class:`PanopticDataConfig`;
:mod:`training.arguments` builds them from the command line).

The datasets take an index or an ``(index, seed)`` pair from :class:`training.data.sampler.ResumableSampler`; the seed
drives the geometric augmentation (a scale scheme of :mod:`training.data.transforms`),
so an example is a pure function of ``(index, seed)``. Items are dicts the
:class:`training.data.collator.DearliDataCollator` collates::

    {"pixel_values": (3, h, w) CLIP-normalised (unlabeled weak views: RGB in [0, 1]), "pixel_mask": (h, w) 1 = image /
     0 = padding, "mask_labels": (n, h, w) float, "class_labels": (n,) int64, "image_id": ...}

Images are read with the project's one reader (:func:`modeling_dearli.image_reading.read_image`). An example whose
files cannot be read (a truncated JPEG, a corrupt PNG, image and annotation of different sizes) is *skipped*: the
dataset returns the next readable example in its place (a pure function of the index too, so resuming stays exact)
and lists what it skipped under the item's ``"skipped"`` key (``[{"source": path, "error": message}]``), which the
training loop logs, counts and checks against ``--max_skipped_share`` (:class:`training.loop.SkippedSamples`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from modeling_dearli.image_reading import read_image, to_rgb

from .class_names import ClassNames
from .color_augmentation import ColorAugSSD
from .hub_datasets import DatasetColumns, DatasetImages, load_dataset_splits
from .panoptic_datasets import NAMED_DATASETS, load_panoptic_dataset, restrict_to_present_classes
from .panoptic_targets import panoptic_target_from_row
from .partitions import split_labeled_unlabeled
from .sampler import unpack_index
from .transforms import (
    GeometricAugmentation,
    GeometricParams,
    apply_to_id_map,
    apply_to_image,
    fixed_params,
    mask_record_to_targets,
    normalize_image,
    panoptic_to_targets,
    valid_pixel_mask,
)
from .unlabeled_images import load_unlabeled_images, merge_unlabeled

__all__ = [
    "MAX_REPLACEMENTS",
    "MasksTrainDataset",
    "PanopticDataConfig",
    "PanopticTrainDataset",
    "PanopticTrainingData",
    "UnlabeledTrainDataset",
    "UnreadableSample",
    "load_training_data",
    "mask_train_dataset",
    "row_image",
    "row_source",
    "without_image_decoding",
]

logger = logging.getLogger(__name__)


# Readable examples a dataset tries in place of an unreadable one before it gives up.
MAX_REPLACEMENTS = 32


class UnreadableSample(Exception):
    """A training example that cannot be used: its image or annotation cannot be read, or they do not fit together.
    ``source`` names it (a file path, else its image id)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def without_image_decoding(dataset: Any) -> Any:
    """A 🤗 dataset whose ``Image`` columns are not decoded (rows hold ``{"path", "bytes"}``), so that this module reads
    them with the project's image reader and can name an unreadable file; other datasets are returned as they are."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def row_source(row: Mapping[str, Any]) -> str:
    """What names a row in messages: its image file, else its file name or image id."""
    image = row.get("image")
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Mapping) and image.get("path"):
        return str(image["path"])
    return str(row.get("file_name") or row.get("image_id"))


def row_image(row: Mapping[str, Any]) -> Image.Image:
    """The ``image`` of a dataset row as 8-bit RGB: a PIL image, a path or a ``{"path", "bytes"}`` dict (an undecoded
    ``datasets.Image``), read with :func:`modeling_dearli.image_reading.read_image`."""
    image = row["image"]
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, Mapping):
        return read_image(image["bytes"] if image.get("bytes") else image["path"])
    return read_image(image)


class _SkipsUnreadable(Dataset):
    """``__getitem__`` of a training dataset that replaces an unreadable example by the next readable one (index + 1,
    + 2, ..., the same augmentation seed) and reports the skipped ones in the item's ``"skipped"`` list."""

    def _example(self, index: int, seed: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = unpack_index(key)
        if not 0 <= index < len(self):
            raise IndexError(index)
        skipped: list[dict[str, str]] = []
        for attempt in range(min(len(self), MAX_REPLACEMENTS + 1)):
            try:
                item = self._example((index + attempt) % len(self), seed)
            except UnreadableSample as error:
                skipped.append({"source": error.source, "error": error.reason})
                continue
            if skipped:
                item["skipped"] = skipped
            return item
        listed = "; ".join(f"{s['source']} ({s['error']})" for s in skipped[:3])
        raise RuntimeError(f"{len(skipped)} training examples in a row could not be read, e.g. {listed}")


def _read_row(dataset: Any, index: int, read: Callable[[Mapping[str, Any]], Any]) -> tuple[Mapping[str, Any], Any]:
    """``dataset[index]`` and ``read(row)``; a file that cannot be read or decoded raises :class:`UnreadableSample`."""
    row = dataset[index]
    try:
        return row, read(row)
    except (OSError, SyntaxError, ValueError) as error:  # PIL's reading errors; sizes that do not fit
        raise UnreadableSample(row_source(row), str(error)) from error


def _sample_geometry(
    transform: GeometricAugmentation | None, height: int, width: int, generator: torch.Generator
) -> GeometricParams:
    """The geometry of one example: drawn from its generator, or the identity without a transform."""
    if transform is None:
        return fixed_params((height, width))
    return transform.sample(height, width, generator)


def _augmented_image(
    image: Image.Image, params: GeometricParams, color: ColorAugSSD | None, generator: torch.Generator
) -> torch.Tensor:
    """The image under `params` (RGB in [0, 1], padding = CLIP mean), with the colour augmentation of its real
    (not padded) content when given."""
    pixels = apply_to_image(image, params)
    if color is not None:
        h, w = params.valid_size
        pixels[:, :h, :w] = color(pixels[:, :h, :w], generator)
    return pixels


class _AugmentedRows(_SkipsUnreadable):
    """Rows of a `training.data.panoptic_datasets` dataset (or any rows with an ``image``) under `transform`."""

    def __init__(self, dataset: Any, transform: GeometricAugmentation | None) -> None:
        self.dataset = without_image_decoding(dataset)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)


class PanopticTrainDataset(_AugmentedRows):
    """Ground-truth panoptic examples of a `training.data.panoptic_datasets` dataset under random scale / crop / flip.

    Args:
        dataset: rows with ``image``, ``panoptic``, ``segments_info`` (see `training.data.panoptic_datasets`).
        transform: the geometric augmentation (None: the image as is).
        return_id_map: also return the augmented ``id_map`` (H, W) int64 and ``segments`` (for CutMix / debugging).
        color_augmentation: photometric augmentation of the image (the released configs: :class:`ColorAugSSD`).
    """

    def __init__(
        self,
        dataset: Any,
        transform: GeometricAugmentation | None,
        return_id_map: bool = False,
        color_augmentation: ColorAugSSD | None = None,
    ) -> None:
        super().__init__(dataset, transform)
        self.return_id_map = return_id_map
        self.color_augmentation = color_augmentation

    def _example(self, index: int, seed: int) -> dict[str, Any]:
        def read(row: Mapping[str, Any]) -> tuple[Image.Image, Any]:
            image, target = row_image(row), panoptic_target_from_row(row)
            if (image.height, image.width) != target.id_map.shape:
                raise ValueError(f"image {image.size[::-1]} and panoptic annotation {target.id_map.shape} sizes differ")
            return image, target

        row, (image, target) = _read_row(self.dataset, index, read)
        id_map = torch.from_numpy(target.training_id_map().astype(np.int64))  # crowd -> void
        height, width = id_map.shape
        generator = torch.Generator().manual_seed(seed)
        params = _sample_geometry(self.transform, height, width, generator)
        pixel_values = normalize_image(_augmented_image(image, params, self.color_augmentation, generator))
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


class MasksTrainDataset(_SkipsUnreadable):
    """Class-agnostic DeWa examples: images with their SAM masks (`training.data.mask_reading.load_masks` records).

    Args:
        sources: ``(records, images)`` pairs: a folder, where a record's image is ``folder / record["file_name"]``
            (the folder `scripts/generate_sam_masks.py` read), or the 🤗 dataset split it read
            (:class:`~training.data.hub_datasets.DatasetImages`), where the record's ``image_id`` names the row.
            Several pairs are concatenated (e.g. labeled + unlabeled).
        transform: the geometric augmentation applied to the image and every mask.
        exif_transpose: apply EXIF orientation (must match the SAM generation setting, default True).
        color_augmentation: photometric augmentation of the image (the released configs: :class:`ColorAugSSD`).
        drop_empty_masks: drop the masks the crop leaves empty. The released DeWa keeps them as empty targets (the
            default): they count in the loss normalisation and teach the queries matched to them to predict nothing.
    """

    def __init__(
        self,
        sources: Sequence[tuple[Any, str | os.PathLike | DatasetImages]],
        transform: GeometricAugmentation | None,
        exif_transpose: bool = True,
        color_augmentation: ColorAugSSD | None = None,
        drop_empty_masks: bool = False,
    ) -> None:
        self.sources = [(records, images if isinstance(images, DatasetImages) else Path(images))
                        for records, images in sources]
        for records, images in self.sources:
            if isinstance(images, DatasetImages):
                missing = [key for key in records["image_id"] if key not in images]
                if missing:
                    raise ValueError(f"{len(missing)} of {len(records)} mask records have no image in {images.name} "
                                     f"(e.g. {', '.join(map(repr, missing[:3]))}): were the masks generated from "
                                     f"another split, or with another --id_column?")
        self.offsets = np.cumsum([0] + [len(records) for records, _ in self.sources])
        self.transform = transform
        self.exif_transpose = exif_transpose
        self.color_augmentation = color_augmentation
        self.drop_empty_masks = drop_empty_masks

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _example(self, index: int, seed: int) -> dict[str, Any]:
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        records, images = self.sources[source]
        record = records[index - int(self.offsets[source])]
        if isinstance(images, DatasetImages):
            path = images.source(record["image_id"])
            read = partial(images.read, record["image_id"])
        else:
            if not record.get("file_name"):
                raise ValueError(f"SAM record {record.get('image_id')!r} has no file_name to find its image")
            path = str(images / record["file_name"])
            read = partial(read_image, images / record["file_name"])
        height, width = int(record["height"]), int(record["width"])
        try:
            image = read(exif_transpose=self.exif_transpose)
        except OSError as error:
            raise UnreadableSample(path, str(error)) from error
        if (image.height, image.width) != (height, width):
            raise UnreadableSample(path, f"image size {(image.height, image.width)} differs from its SAM record "
                                              f"{(height, width)}")
        generator = torch.Generator().manual_seed(seed)
        params = _sample_geometry(self.transform, height, width, generator)
        mask_labels, class_labels = mask_record_to_targets(record, params, drop_empty=self.drop_empty_masks)
        return {
            "pixel_values": normalize_image(_augmented_image(image, params, self.color_augmentation, generator)),
            "pixel_mask": valid_pixel_mask(params),
            "mask_labels": mask_labels,
            "class_labels": class_labels,
            "image_id": record["image_id"],
        }


class UnlabeledTrainDataset(_AugmentedRows):
    """Weak views of unlabeled images: ``{"pixel_values": (3, h, w) RGB in [0, 1] (not normalised; padding = CLIP
    mean), "pixel_mask": (h, w), "image_id"}``. Rows need an ``image`` (PIL image or path); labels are ignored.

    The SSL step normalises the weak view for the teacher and derives the student's strong view from it. With
    `cutmix_source` an item also carries the weak view of another unlabeled image drawn at random (with replacement,
    from the item's seed), with its own scale / crop / flip: ``cutmix_pixel_values``, ``cutmix_pixel_mask``,
    ``cutmix_image_id`` -- the source of the reference's CutMix boxes. An unreadable source image skips the item
    like an unreadable image of its own.
    """

    def __init__(self, dataset: Any, transform: GeometricAugmentation | None, cutmix_source: bool = False) -> None:
        super().__init__(dataset, transform)
        self.cutmix_source = cutmix_source

    def _weak_view(self, image: Image.Image, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        params = _sample_geometry(self.transform, image.height, image.width, generator)
        return apply_to_image(image, params), valid_pixel_mask(params)

    def _example(self, index: int, seed: int) -> dict[str, Any]:
        row, image = _read_row(self.dataset, index, row_image)
        generator = torch.Generator().manual_seed(seed)
        pixel_values, pixel_mask = self._weak_view(image, generator)
        item = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "image_id": row.get("image_id")}
        if self.cutmix_source:
            source_index = int(torch.randint(len(self.dataset), (1,), generator=generator))
            source, source_image = _read_row(self.dataset, source_index, row_image)
            item["cutmix_pixel_values"], item["cutmix_pixel_mask"] = self._weak_view(source_image, generator)
            item["cutmix_image_id"] = source.get("image_id")
        return item


# --------------------------------------------------------------------------------------------------------------------
# The loops' data, from plain settings (training.arguments turns the command line into them)
# --------------------------------------------------------------------------------------------------------------------
def mask_train_dataset(
    masks_dirs: Sequence[str | os.PathLike],
    image_dirs: Sequence[str | os.PathLike | DatasetImages],
    transform: GeometricAugmentation | None,
    *,
    exif_transpose: bool = True,
    color_augmentation: ColorAugSSD | None = None,
    drop_empty_masks: bool = False,
) -> MasksTrainDataset:
    """DeWa's data: the mask records of every folder of `masks_dirs` paired with its images (one of `image_dirs` per
    masks folder, or one for all: a folder or a 🤗 dataset split, see :class:`MasksTrainDataset`), under `transform`
    and `color_augmentation`."""
    from .mask_reading import load_masks

    if len(image_dirs) not in (1, len(masks_dirs)):
        raise ValueError("give one image folder, or one per masks folder")
    image_dirs = list(image_dirs) * len(masks_dirs) if len(image_dirs) == 1 else list(image_dirs)
    sources = []
    for masks_dir, image_dir in zip(masks_dirs, image_dirs):
        records = load_masks(masks_dir)
        if len(records) == 0:
            raise ValueError(f"no masks in {masks_dir}: run scripts/generate_sam_masks.py first")
        sources.append((records, image_dir))
    return MasksTrainDataset(sources, transform, exif_transpose=exif_transpose, color_augmentation=color_augmentation,
                             drop_empty_masks=drop_empty_masks)


@dataclass(frozen=True)
class PanopticDataConfig:
    """Where a loop's panoptic data comes from and how it is split (the ``panoptic data`` flags of
    :mod:`training.arguments`).

    Args:
        dataset_name: label space and loader (``coco_panoptic``, ``coco_objects``, ``ade20k``, ``custom``).
        train_images_dir, train_panoptic_dir, train_annotations: the training split in COCO panoptic format.
        val_images_dir, val_panoptic_dir, val_annotations: the validation split (none without annotations; the
            folders default to the training ones).
        ade20k_root: the ADEChallengeData2016 folder (``ade20k``; replaces the folders).
        class_names_file: class names with synonyms (``id:name,synonym,...`` lines).
        partition: the labeled images: a text file listing them, or a shipped partition (e.g. ``1_128``;
            :func:`training.data.partitions.labeled_keys`), or
        labeled_fraction: a random labeled subset of this share, drawn with `seed`.
        unlabeled_images_dirs: folders of unannotated images, added to the unlabeled data (the training images
            outside the labeled partition, if one is given; :mod:`training.data.unlabeled_images`).
        restrict_to_present_classes: keep only the classes annotated in the training images.
        max_eval_images: validate on at most this many images.
        coco_objects_void_to_background: COCO-Objects' void pixels become background (the reference's).
        dataset_config_name: a 🤗 dataset's configuration (a `dataset_name` that is a Hub id or a folder).
        train_split, validation_split: its splits (validation ``None``: none; ``"validation"`` when the dataset
            lacks it: none either, logged).
        columns: its column names (:class:`~training.data.hub_datasets.DatasetColumns`).
    """

    dataset_name: str = "coco_panoptic"
    train_images_dir: str | None = None
    train_panoptic_dir: str | None = None
    train_annotations: str | None = None
    val_images_dir: str | None = None
    val_panoptic_dir: str | None = None
    val_annotations: str | None = None
    ade20k_root: str | None = None
    class_names_file: str | None = None
    partition: str | None = None
    labeled_fraction: float | None = None
    unlabeled_images_dirs: tuple[str, ...] = ()
    seed: int = 0
    restrict_to_present_classes: bool = False
    max_eval_images: int | None = None
    coco_objects_void_to_background: bool = True
    dataset_config_name: str | None = None
    train_split: str = "train"
    validation_split: str | None = "validation"
    columns: DatasetColumns = DatasetColumns()


@dataclass
class PanopticTrainingData:
    """A panoptic dataset as a loop uses it: labeled training rows, the unlabeled rest (``None`` when every training
    image is labeled), validation rows (``None`` without validation data) and the label space."""

    labeled: Any
    unlabeled: Any | None
    validation: Any | None
    class_names: ClassNames


def load_training_data(config: PanopticDataConfig) -> PanopticTrainingData:
    """The data of `config` as :class:`PanopticTrainingData`.

    With ``restrict_to_present_classes`` the label space is the classes annotated in the training set (before the
    labeled / unlabeled split); validation segments of other classes are dropped.
    """
    c = config
    val = None
    if c.dataset_name not in NAMED_DATASETS:  # a 🤗 dataset: Hub id or local folder
        validation_role = "validation?" if c.validation_split == "validation" else "validation"
        splits, class_names = load_dataset_splits(
            c.dataset_name, {"train": c.train_split, validation_role: c.validation_split},
            config_name=c.dataset_config_name, columns=c.columns, class_names_file=c.class_names_file,
        )
        train, val = splits["train"], splits["validation"]
        if val is None and c.validation_split is not None:
            logger.warning("%s has no split %r: training without validation", c.dataset_name, c.validation_split)
    else:
        train, class_names = load_panoptic_dataset(
            c.dataset_name, images_dir=c.train_images_dir, panoptic_dir=c.train_panoptic_dir,
            annotations_json=c.train_annotations, ade20k_root=c.ade20k_root, split="training", with_semantic=False,
            coco_objects_void_to_background=c.coco_objects_void_to_background, class_names_file=c.class_names_file,
        )
    if c.dataset_name in NAMED_DATASETS and (c.dataset_name == "ade20k" or c.val_annotations):
        val, _ = load_panoptic_dataset(
            c.dataset_name, images_dir=c.val_images_dir or c.train_images_dir,
            panoptic_dir=c.val_panoptic_dir or c.train_panoptic_dir, annotations_json=c.val_annotations,
            ade20k_root=c.ade20k_root, split="validation",
            coco_objects_void_to_background=c.coco_objects_void_to_background, class_names_file=c.class_names_file,
        )
    if c.restrict_to_present_classes:
        train, class_names, val = restrict_to_present_classes(train, class_names, val)
    unlabeled = None
    if c.partition:
        split_name = "coco" if c.dataset_name.startswith("coco") else c.dataset_name
        train, unlabeled = split_labeled_unlabeled(train, dataset=split_name, partition=c.partition)
    elif c.labeled_fraction:
        train, unlabeled = split_labeled_unlabeled(train, fraction=c.labeled_fraction, seed=c.seed)
    if c.unlabeled_images_dirs:
        unlabeled = merge_unlabeled(unlabeled if unlabeled is not None and len(unlabeled) else None,
                                    load_unlabeled_images(c.unlabeled_images_dirs))
    if c.max_eval_images is not None and val is not None:
        val = val.select(range(min(c.max_eval_images, len(val))))
    return PanopticTrainingData(train, unlabeled, val, class_names)
