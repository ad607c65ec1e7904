"""Image files as inference input: finding them, reading them in DataLoader workers, and batching them so that a batch
gives exactly the results of one image at a time.

A batch is padded to its largest image, and padding changes a convolutional backbone's features near the border (and
what the decoder's attention sees), so images of different padded sizes in one batch get slightly different results
than alone. :func:`batches_by_padded_size` therefore groups images by the size the image processor gives them on their
own (``DearliImageProcessor.padded_size``): photos of one camera share it, and every batch equals batch size 1.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image
from torch.utils.data import Dataset

from modeling_dearli.image_reading import read_image

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "batches_by_padded_size", "find_images", "image_size", "is_file_entry"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_file_entry(path: Path) -> bool:
    """A file, or a link to nothing (kept, so that reading it names it as unreadable instead of dropping it unseen);
    not a folder, device or pipe."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def find_images(inputs: Iterable[str], recursive: bool = False) -> tuple[list[Path], list[str]]:
    """``(images, not_found)``: files as given (any extension), the image files of folders (sub-folders too with
    `recursive`) and glob matches, sorted per input and without duplicates; ``not_found`` lists the inputs that are
    neither a file nor a folder and the patterns that match no file. A broken link named like an image inside a folder
    is kept (reading it fails and names it)."""
    found: list[Path] = []
    not_found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found += [p for p in sorted(path.glob(pattern))
                      if p.suffix.lower() in IMAGE_EXTENSIONS and is_file_entry(p)]
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            matches = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
            if not matches:
                not_found.append(item)
            found += matches
        else:
            not_found.append(item)
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(str(p.resolve()), p)
    return list(unique.values()), not_found


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file as :func:`~modeling_dearli.image_reading.read_image` returns it (EXIF
    orientation applied), from its header only; ``OSError`` when the file is not an image."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {os.fspath(path)}: {error}") from error
    return height, width


def batches_by_padded_size(
    sizes: Sequence[tuple[int, int] | None], padded_size: Callable[[int, int], tuple[int, int]], batch_size: int
) -> list[list[int]]:
    """Indices of `sizes` in batches of at most `batch_size` whose images share ``padded_size(h, w)`` (the input order
    within each size; sizes in order of first appearance). ``None`` sizes (unreadable files) each form a batch of
    their own, so they are reported in input order."""
    groups: dict[Any, list[int]] = {}
    for index, size in enumerate(sizes):
        key = ("unreadable", index) if size is None else padded_size(*size)
        groups.setdefault(key, []).append(index)
    return [members[i : i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


class ImageFiles(Dataset):
    """Image files read with the project's reader; an item is ``{"index", "image": RGB PIL image or None, "error":
    message or None}``, so one unreadable file is reported instead of stopping a batch."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return {"index": index, "image": read_image(self.paths[index]), "error": None}
        except OSError as error:
            return {"index": index, "image": None, "error": str(error)}
