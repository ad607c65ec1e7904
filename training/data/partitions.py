"""Labeled partitions: the shipped split files (the reference's ``labeled.txt`` / ``val.txt``), a list of your own
(:func:`labeled_keys`), and the split of a training dataset into its labeled part and the unlabeled rest."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data.package_data import DATA_DIR

logger = logging.getLogger(__name__)

SPLIT_DIRS = {"ade20k": "ade20k", "coco": "coco", "coco_panoptic": "coco", "coco_objects": "coco"}


def read_split_file(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Lines ``<image path> <annotation path>`` -> list of pairs (a single column is allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise ValueError(f"{path}:{lineno}: expected '<image> [<annotation>]', got {line!r}")
        pairs.append((parts[0], parts[-1]))
    return pairs


def split_file(dataset: str, partition: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of ``labeled.txt`` for ``partition`` (e.g. ``1_128``) or of ``val.txt`` for ``partition="val"``."""
    base = Path(data_dir or DATA_DIR) / "splits" / SPLIT_DIRS.get(dataset, dataset)
    path = base / "val.txt" if partition == "val" else base / partition / "labeled.txt"
    if not path.is_file():
        avail = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        raise FileNotFoundError(f"partition file not found: {path} (available partitions: {avail})")
    return path


def partition_keys(dataset: str, partition: str, data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Image keys (file stems, e.g. ``ADE_train_00001609`` / ``000000283213``) of a standard partition."""
    return [Path(img).stem for img, _ in read_split_file(split_file(dataset, partition, data_dir))]


def labeled_keys(
    partition: str | os.PathLike[str], dataset: str | None = None, data_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """Image keys of a labeled partition given as

    - a text file: one image per line, its file name (``photo_0003.jpg``, a path relative to the images folder, or
      just the stem) or its image id; a second column (the annotation, as in the reference's ``labeled.txt``) is
      ignored, empty lines are skipped;
    - a folder holding ``labeled.txt`` (the reference's layout);
    - the name of a shipped partition of `dataset` (e.g. ``1_128`` of ``ade20k``, ``1_512`` of ``coco``).
    """
    path = Path(partition)
    if path.is_dir():
        path = path / "labeled.txt"
        if not path.is_file():
            raise FileNotFoundError(f"partition folder {path.parent} has no labeled.txt")
    if path.is_file():
        keys = [Path(image).stem for image, _ in read_split_file(path)]
        if not keys:
            raise ValueError(f"partition file {path} lists no image")
        return keys
    if path.suffix or len(path.parts) > 1:
        raise FileNotFoundError(f"partition file not found: {path}")
    if dataset is None:
        raise ValueError(f"partition {str(partition)!r} is neither a file nor a folder; a shipped partition's name "
                         "needs dataset= ('ade20k' or 'coco')")
    return partition_keys(dataset, str(partition), data_dir)


def row_key(file_name: str) -> str:
    """The key partitions use for a row: its image file stem."""
    return Path(file_name).stem


def split_labeled_unlabeled(
    ds: Any,
    labeled: Sequence[str | int] | None = None,
    *,
    dataset: str | None = None,
    partition: str | None = None,
    fraction: float | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    strict: bool = True,
) -> tuple[Any, Any]:
    """Split a training dataset into (labeled, unlabeled = the rest).

    Exactly one of: ``labeled`` (image file stems or image ids), ``partition`` (a file listing the labeled images, or
    with ``dataset`` a standard partition, e.g. ``("ade20k", "1_128")``: :func:`labeled_keys`), or ``fraction``
    (random subset of that size, drawn with ``seed``).
    With ``strict``, listed images missing from ``ds`` raise ``KeyError`` naming them.
    """
    given = sum(x is not None for x in (labeled, partition, fraction))
    if given != 1:
        raise ValueError("give exactly one of labeled=, partition= (with dataset=) or fraction=")
    keys = [row_key(f) for f in ds["file_name"]]
    if partition is not None:
        labeled = labeled_keys(partition, dataset, data_dir)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        n = max(1, round(fraction * len(keys)))
        chosen = sorted(random.Random(seed).sample(range(len(keys)), n))
    else:
        assert labeled is not None
        index: dict[Any, int] = {}
        for i, k in enumerate(keys):
            index.setdefault(k, i)
        ids = ds["image_id"]
        for i, image_id in enumerate(ids):
            index.setdefault(image_id, i)
        chosen_set: dict[int, None] = {}
        missing = []
        for k in labeled:
            i = index.get(k, index.get(str(k)))
            if i is None and isinstance(k, str) and k.isdigit():  # an image id read from a text file
                i = index.get(int(k))
            if i is None:
                missing.append(str(k))
            else:
                chosen_set[i] = None
        if missing:
            msg = f"{len(missing)} labeled images not in the dataset: {', '.join(missing[:5])}"
            if strict:
                raise KeyError(msg)
            logger.warning(msg)
        chosen = sorted(chosen_set)
    chosen_mask = np.zeros(len(keys), dtype=bool)
    chosen_mask[chosen] = True
    rest = np.flatnonzero(~chosen_mask).tolist()
    logger.info("partition: %d labeled, %d unlabeled", len(chosen), len(rest))
    return ds.select(chosen), ds.select(rest)
