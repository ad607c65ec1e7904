"""Unlabeled images given as plain folders (``ssl.py --unlabeled_images_dir``): image files without any
annotation, as 🤗 ``datasets.Dataset`` rows that :class:`training.data.train_datasets.UnlabeledTrainDataset` reads with
the project's one image reader (:func:`modeling_dearli.image_reading.read_image`).

A row is ``{"image": the file (datasets.Image), "image_id": its path relative to the folder without the suffix (the id
``scripts/generate_sam_masks.py --image_dir`` gives it), "file_name": its path relative to the folder}``. Files whose
header is not an image's are skipped when the folder is read, with one logged count; a file that fails later (a
truncated JPEG) is skipped by the training dataset like any unreadable example.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .image_files import find_images, image_size

__all__ = ["UNLABELED_COLUMNS", "load_unlabeled_images", "merge_unlabeled"]

logger = logging.getLogger(__name__)

# What an unlabeled row needs (annotation columns of labeled datasets are dropped when the two are merged).
UNLABELED_COLUMNS = ("image", "image_id", "file_name")


def _features() -> Any:
    import datasets

    return datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                              "file_name": datasets.Value("string")})


def load_unlabeled_images(folders: Sequence[str | os.PathLike[str]], recursive: bool = True) -> Any:
    """The image files of `folders` (sub-folders too with `recursive`; the extensions of
    :data:`training.data.image_files.IMAGE_EXTENSIONS`) as a ``datasets.Dataset`` of unlabeled rows (module docstring),
    sorted by path. Files that cannot be opened as images are skipped and counted in one warning; a folder that does
    not exist, or holds no readable image, raises an error naming it."""
    import datasets

    rows: dict[str, list[str]] = {name: [] for name in UNLABELED_COLUMNS}
    skipped: list[str] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"unlabeled images folder not found: {folder}")
        files, _ = find_images([str(folder)], recursive=recursive)
        for path in files:
            try:
                image_size(path)
            except OSError as error:
                skipped.append(str(error))
                continue
            relative = path.relative_to(folder)
            rows["image"].append(str(path))
            rows["image_id"].append(relative.with_suffix("").as_posix())
            rows["file_name"].append(relative.as_posix())
    if skipped:
        logger.warning("unlabeled images: skipped %d file(s) that are not readable images, e.g. %s", len(skipped),
                       "; ".join(skipped[:3]))
    if not rows["image"]:
        raise ValueError(f"no readable image in {', '.join(map(str, folders))}")
    logger.info("unlabeled images: %d from %s", len(rows["image"]), ", ".join(map(str, folders)))
    return datasets.Dataset.from_dict(rows, features=_features())


def merge_unlabeled(*parts: Any) -> Any:
    """One unlabeled dataset from several (``None`` parts are left out): the rest of a labeled training set after
    its partition and the rows of :func:`load_unlabeled_images`, reduced to :data:`UNLABELED_COLUMNS` (image ids as
    strings) and concatenated in the order given."""
    import datasets

    given = [p for p in parts if p is not None]
    if len(given) == 1:
        return given[0]
    reduced = []
    for part in given:
        part = part.select_columns(list(UNLABELED_COLUMNS))
        if part.features["image_id"] != datasets.Value("string"):
            part = part.cast_column("image_id", datasets.Value("string"))
        reduced.append(part.cast(_features()))
    return datasets.concatenate_datasets(reduced)
