"""Reading a :mod:`training.data.mask_shards` folder: the records as a `datasets.Dataset`, their masks decoded, and the
class-agnostic Mask2Former targets of DeWa (every mask one target of the single class 0, overlaps allowed, no area
filter, as the reference implementation does)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils

from .mask_shards import MASKS_SCHEMA, shard_files

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

def load_masks(output_dir: PathLike, cache_dir: PathLike | None = None) -> "datasets.Dataset":
    """The masks in `output_dir` as a `datasets.Dataset` (one row per image, finished shards only).

    Equivalent to ``datasets.load_dataset("parquet", data_files=<the shards>, split="train")``.
    Raises ValueError if an image id occurs twice.
    """
    import datasets

    files = shard_files(output_dir)
    if not files:
        features = datasets.Features.from_arrow_schema(MASKS_SCHEMA)
        return datasets.Dataset.from_dict({name: [] for name in MASKS_SCHEMA.names}, features=features)
    dataset = datasets.load_dataset(
        "parquet",
        data_files=[str(f) for f in files],
        split="train",
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    ids = dataset["image_id"]
    if len(set(ids)) != len(dataset):
        raise ValueError(f"Duplicate image ids in {output_dir}: was it written by two runs at once?")
    return dataset


def masks_index(dataset: "datasets.Dataset") -> dict[str, int]:
    """Map image_id -> row of a `load_masks` dataset (to join it with an image dataset)."""
    return {image_id: row for row, image_id in enumerate(dataset["image_id"])}


def decode_masks(record: Mapping[str, Any]) -> np.ndarray:
    """Decode a record's RLE masks with pycocotools: uint8 array (n, height, width) of 0/1."""
    height, width = int(record["height"]), int(record["width"])
    rles = [
        {"size": [int(s) for s in m["segmentation"]["size"]], "counts": m["segmentation"]["counts"]}
        for m in record["masks"]
    ]
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    with warnings.catch_warnings():
        # pycocotools (2.0.11) calls np.array(copy=False) on its own mask type, whose __array__ lacks numpy 2's `copy`
        # keyword: "DeprecationWarning: __array__ implementation doesn't accept a copy keyword" on every call.
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        dense = mask_utils.decode(rles)  # (H, W, n), Fortran order
    if dense.shape[:2] != (height, width):
        raise ValueError(f"RLE size {dense.shape[:2]} differs from the record's image size {(height, width)}")
    return np.ascontiguousarray(dense.transpose(2, 0, 1))


def masks_to_targets(
    record: Mapping[str, Any],
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    size: tuple[int, int] | None = None,
    drop_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic Mask2Former targets of one mask record (paper Sec. 3.3, DeWa).

    Every mask becomes one target of the single class 0; overlaps are allowed and there is no area filter.

    Args:
        record: a row of `load_masks` (or any dict with height, width and masks[*].segmentation RLEs).
        transform: geometric hook applied to the uint8 masks (n, H, W) at image size, e.g. the resize + crop applied
            to the image; must keep the first dimension.
        size: finally resize to (height, width) with nearest-neighbour interpolation.
        drop_empty: drop masks left without any pixel (e.g. cropped away); masks of any positive area are kept.

    Returns:
        mask_labels: float32 (n, H, W) of 0/1; class_labels: int64 zeros (n,).
    """
    masks = torch.from_numpy(decode_masks(record))
    if transform is not None:
        masks = transform(masks)
    if size is not None and tuple(masks.shape[-2:]) != tuple(size):
        masks = torch.nn.functional.interpolate(masks[None].float(), size=tuple(size), mode="nearest")[0]
    masks = masks.float()
    if drop_empty and len(masks):
        masks = masks[masks.flatten(1).any(dim=1)]
    return masks, torch.zeros(len(masks), dtype=torch.long)
