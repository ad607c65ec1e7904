"""The one image reader of the project: a file (or decoded PIL image) -> an 8-bit RGB PIL image, whatever its mode.

Prediction, the training datasets, evaluation, SAM-mask generation and the image processor all read images through
:func:`read_image` / :func:`to_rgb`, so every one of them sees the same pixels:

- EXIF orientation is applied when a *file* is read (as ``datasets``' ``Image`` feature and transformers' ``load_image``
  do); an already decoded image is taken as it is.
- Palette images (``P``, with or without a transparent index) take their palette colours.
- Grayscale (``1``, ``L``) is replicated into the three channels.
- Alpha (``RGBA``, ``LA``, ``PA``) is dropped: the colour channels are kept as stored, as the image processor does for
  RGBA arrays (and PIL, torchvision and transformers do).
- 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, and ``I`` holding values in ``[0, 65535]``) is *scaled* to 8 bits
  (``round(v / 257)``); PIL's ``convert("RGB")`` would clip it (every value above 255 becomes white). Float images
  (``F``) must hold values in ``[0, 1]``. (PIL already reduces 16-bit RGB PNGs to 8-bit ``RGB`` by scaling.)

A file that cannot be read (truncated, corrupt, not an image, a decompression bomb) raises ``OSError`` naming it.
Self-contained (PIL and numpy only): it ships as remote code with the
image processor.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageSource", "read_image", "to_rgb"]

ImageSource = str | os.PathLike | bytes | BinaryIO

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit ``RGB`` version of a decoded PIL image (see the module docstring for each mode); ``RGB`` images are
    returned as they are. Raises ``ValueError`` for values that cannot be shown in 8 bits (negative or above 16-bit
    integers, floats outside [0, 1])."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image)
        if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            raise ValueError(
                f"mode {mode!r} image with values in [{values.min()}, {values.max()}]: only 16-bit "
                "(0..65535) integer images are supported"
            )
        gray = np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError("mode 'F' (float) images must hold values in [0, 1]")
        gray = np.rint(values * 255.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if mode == "P":
        # A transparent palette index is alpha: go through RGBA (PIL warns when converting such images to RGB).
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _ALPHA_MODES:
        if mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply first
            image = image.convert("RGBA" if mode == "RGBa" else "LA")
        return image.convert("RGB")  # drops alpha, keeps the stored colours
    return image.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def read_image(source: ImageSource, *, exif_transpose: bool = True) -> Image.Image:
    """Read an image file (a path, its bytes or a binary file object) fully into an 8-bit ``RGB`` PIL image.

    The whole file is decoded here, so a truncated or corrupt file raises now (``OSError`` naming the file), not later
    in a data loader. ``exif_transpose`` applies the EXIF orientation (the default, as ``datasets`` does).
    """
    if isinstance(source, (bytes, bytearray)):
        name, stream = "<image bytes>", io.BytesIO(source)
    else:
        name, stream = os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source), source
    try:
        with Image.open(stream) as image:
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL reports some broken files as SyntaxError / ValueError and huge ones as DecompressionBombError: one error
        # type, with the file's name, for every file that cannot be read.
        raise OSError(f"cannot read image {name}: {error}") from error
