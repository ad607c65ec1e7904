"""The data that ships inside the package (``training/data/assets/``, see its README for sources and licences).

``DATA_DIR`` holds ``class_names/`` and ``splits/`` (the layout every ``data_dir=`` argument of
:mod:`training.data.panoptic_datasets` expects); ``COCO_PANOPTIC_SAMPLE`` is the two-image COCO panoptic sample of the
demo, the CPU presets and the tests. Both are plain paths inside the installed package (setuptools package data), so
they work from a clone, an editable install and a wheel alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

__all__ = ["COCO_PANOPTIC_SAMPLE", "DATA_DIR", "CocoPanopticFolder"]

DATA_DIR = Path(str(files("training.data") / "assets"))


@dataclass(frozen=True)
class CocoPanopticFolder:
    """A folder in COCO panoptic format: ``images/``, ``panoptic/`` (RGB-encoded segment-id PNGs) and the annotation
    JSON."""

    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def panoptic(self) -> Path:
        return self.root / "panoptic"

    @property
    def annotations(self) -> Path:
        return self.root / "panoptic_annotations.json"

    @property
    def categories(self) -> Path:
        """The 133 COCO panoptic categories (``id``, ``name``, ``isthing``, ``color``)."""
        return self.root / "panoptic_coco_categories.json"


COCO_PANOPTIC_SAMPLE = CocoPanopticFolder(DATA_DIR / "coco_panoptic_sample")
