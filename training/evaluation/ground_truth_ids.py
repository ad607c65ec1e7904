"""A dataset's own image ids and category ids for predictions, so that its COCO panoptic ground truth scores them.

Images are matched by file name (``images[].file_name`` in the ground-truth JSON, without its folder), else by file
stem. Classes follow the label space the training loops and ``scripts/evaluate.py`` derive from the same JSON: the
model's class ``i`` is the ``i``-th category in id order, so the model must have as many classes as the JSON has
categories; names that differ are reported (a warning), not guessed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["GroundTruthIds"]

logger = logging.getLogger(__name__)


def _same_class(class_name: str, category_name: str) -> bool:
    """Whether a synonym of the model's class (comma-separated) is the category's name or begins it before a dash
    (``grass`` / ``grass-merged``)."""
    category = str(category_name).strip().lower()
    return any(category == s or category.startswith(s + "-")
               for s in (s.strip().lower() for s in str(class_name).split(",")) if s)


class GroundTruthIds:
    """Image and category ids of a COCO panoptic ground-truth JSON for a model's classes.

    Args:
        ground_truth: the parsed JSON (``images`` and ``categories``).
        class_names: the model's class names (``config.class_names``: synonyms comma-separated).
    """

    def __init__(self, ground_truth: Mapping[str, Any], class_names: Sequence[str]) -> None:
        images = ground_truth.get("images")
        categories = ground_truth.get("categories")
        if not isinstance(images, list) or not isinstance(categories, list):
            raise ValueError("the ground-truth JSON needs `images` and `categories` lists (COCO panoptic format)")
        self.categories = [dict(c) for c in categories]
        self._by_file = {Path(im["file_name"]).name: im["id"] for im in images}
        stems: dict[str, list[Any]] = {}
        for im in images:
            stems.setdefault(Path(im["file_name"]).stem, []).append(im["id"])
        self._by_stem = {stem: ids[0] for stem, ids in stems.items() if len(ids) == 1}
        ordered = sorted(self.categories, key=lambda c: c["id"])
        if len(ordered) != len(class_names):
            raise ValueError(f"the model has {len(class_names)} classes, the ground truth {len(ordered)} categories: "
                             "predictions can only be written in the label space the model was trained on")
        self.category_ids: list[int] = [c["id"] for c in ordered]
        differing = [f"{i}:{str(name).split(',')[0]!r} vs {c['name']!r}" for i, (name, c) in
                     enumerate(zip(class_names, ordered)) if not _same_class(name, c["name"])]
        if differing:
            logger.warning("%d model classes are named differently from the ground-truth category at their position "
                           "(id order): %s%s", len(differing), ", ".join(differing[:5]),
                           " ..." if len(differing) > 5 else "")

    @classmethod
    def from_json(cls, path: str | os.PathLike, class_names: Sequence[str]) -> GroundTruthIds:
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f), class_names)

    def image_id(self, path: str | os.PathLike) -> Any | None:
        """The ground-truth id of the image file `path` (matched by file name, else by stem), ``None`` if absent."""
        path = Path(path)
        if path.name in self._by_file:
            return self._by_file[path.name]
        return self._by_stem.get(path.stem)

    def category_id(self, label_id: int) -> int:
        """The ground-truth category id of the model's class index `label_id`."""
        return self.category_ids[int(label_id)]

    def convert(self, annotation: dict[str, Any], image_id: Any) -> dict[str, Any]:
        """A copy of a predicted COCO panoptic annotation with the dataset's image id and category ids."""
        segments = [{**s, "category_id": self.category_id(s["category_id"])} for s in annotation["segments_info"]]
        return {**annotation, "image_id": image_id, "segments_info": segments}
