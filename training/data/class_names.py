"""Label spaces: :class:`ClassNames` (contiguous class index <-> dataset category id, names with synonyms, thing
flags) and the shipped class-name files of ADE20K, COCO panoptic, COCO-Objects and SA-1B."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.data.package_data import DATA_DIR

DATASET_CLASS_FILES = {
    "ade20k": "ade20k_150.txt",
    "coco": "coco_panoptic.txt",
    "coco_panoptic": "coco_panoptic.txt",
    "coco_objects": "coco_objects.txt",
    "sa1b": "sa1b.txt",
}
COCO_MAX_THING_ID = 90  # COCO panoptic: category ids 1..90 are things, 92..200 stuff

# ADE20K-150 class ids of the 100 instance-benchmark classes, in instance-class order (instance class k -> entry k-1).
# Source: the ADE20K instance/scene-parsing category correspondence used by the standard panoptic conversion.
ADE20K_THING_IDS: tuple[int, ...] = (
    8, 9, 11, 13, 15, 16, 19, 20, 21, 23, 24, 25, 28, 31, 32, 33, 34, 36, 37, 38,
    39, 40, 42, 43, 44, 45, 46, 48, 50, 51, 54, 56, 57, 58, 59, 63, 65, 66, 67, 68,
    70, 71, 72, 73, 74, 75, 76, 77, 79, 81, 82, 83, 84, 86, 87, 88, 89, 90, 91, 93,
    94, 96, 98, 99, 103, 104, 105, 108, 109, 111, 112, 113, 116, 117, 119, 120, 121, 122, 124, 125,
    126, 127, 128, 130, 131, 133, 134, 135, 136, 137, 138, 139, 140, 143, 144, 145, 147, 148, 149, 150,
)  # fmt: skip
ADE20K_NUM_CLASSES = 150


@dataclass(frozen=True)
class ClassNames:
    """A label space: contiguous class index <-> dataset category id, names with synonyms, thing flags."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]  # "name,synonym,..." per contiguous index
    is_thing: tuple[bool, ...]
    _index: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (len(self.category_ids) == len(self.names) == len(self.is_thing)):
            raise ValueError("category_ids, names and is_thing must have the same length")
        self._index.update({c: i for i, c in enumerate(self.category_ids)})
        if len(self._index) != len(self.category_ids):
            raise ValueError("duplicate category ids")

    def __len__(self) -> int:
        return len(self.category_ids)

    @property
    def category_to_index(self) -> dict[int, int]:
        """Dataset category id -> contiguous index."""
        return dict(self._index)

    @property
    def index_to_category(self) -> list[int]:
        """Contiguous index -> dataset category id."""
        return list(self.category_ids)

    @property
    def thing_ids(self) -> list[int]:
        """Contiguous indices of thing classes (``config.thing_ids``)."""
        return [i for i, t in enumerate(self.is_thing) if t]

    @property
    def first_names(self) -> list[str]:
        return [n.split(",")[0].strip() for n in self.names]

    def label(self, category_id: int) -> int:
        try:
            return self._index[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not in this label space") from None

    def categories(self) -> list[dict[str, Any]]:
        """COCO-style category dicts (dataset ids) for :class:`training.evaluation.panoptic_quality.PanopticQuality`."""
        return [{"id": c, "name": n, "isthing": int(t)} for c, n, t in zip(self.category_ids, self.first_names,
                                                                              self.is_thing)]

    def categories_with_synonyms(self) -> list[dict[str, Any]]:
        """COCO-style category dicts whose ``name`` keeps the synonyms (``"name,synonym,..."``): the content of a
        categories file (:func:`class_names_from_categories` reads it back)."""
        return [{"id": c, "name": n, "isthing": int(t)} for c, n, t in zip(self.category_ids, self.names,
                                                                              self.is_thing)]

    def contiguous_categories(self) -> list[dict[str, Any]]:
        """Categories whose id is the contiguous index (the model's label space)."""
        return [{"id": i, "name": n, "isthing": int(t)} for i, (n, t) in enumerate(zip(self.first_names,
                                                                                       self.is_thing))]


def class_names_from_categories(categories: Any, source: str = "categories") -> ClassNames:
    """The label space of a COCO ``categories`` list (or a dict holding one under ``"categories"``): classes in
    category-id order, names as given (synonyms comma-separated), things from ``isthing``. `source` names the input in
    errors."""
    if isinstance(categories, dict):
        categories = categories.get("categories")
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{source}: expected a non-empty list of categories ({{'id', 'name', 'isthing'}})")
    try:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return ClassNames(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats),
                          tuple(int(c.get("isthing", 0)) == 1 for c in cats))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{source}: every category needs an integer 'id' and a 'name' ({error})") from None


def read_categories_json(path: str | os.PathLike[str]) -> Any:
    """The parsed COCO categories JSON at `path` (a list, or a dict holding one under ``"categories"``); a
    ``ValueError`` naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, or bytes that are not text
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def read_class_names(
    path: str | os.PathLike[str],
    *,
    thing_category_ids: Iterable[int] | None = None,
    categories_json: str | os.PathLike[str] | None = None,
) -> ClassNames:
    """Read ``id:name,synonym,...`` lines (ids not in the dataset read ``invalid_class_id`` and are skipped).

    Thing flags come from ``thing_category_ids``, else from a COCO categories JSON (``isthing``; a list or a dict
    with ``categories``), else all classes are stuff.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    ids: list[int] = []
    names: list[str] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if ":" not in line:
            raise ValueError(f"{path}:{lineno}: expected 'id:name,...', got {line!r}")
        cid, name = line.split(":", 1)
        if not cid.strip().lstrip("-").isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'id:name,...' with a whole-number id, got {line!r}")
        if name.strip() == "invalid_class_id":
            continue
        ids.append(int(cid))
        names.append(name.strip())
    if thing_category_ids is None and categories_json is not None:
        cats = read_categories_json(categories_json)
        cats = cats["categories"] if isinstance(cats, dict) else cats
        thing_category_ids = [c["id"] for c in cats if int(c.get("isthing", 0)) == 1]
    things = {int(t) for t in thing_category_ids} if thing_category_ids is not None else set()
    return ClassNames(tuple(ids), tuple(names), tuple(c in things for c in ids))


def load_class_names(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> ClassNames:
    """Class names of ``ade20k``, ``coco_panoptic`` (alias ``coco``), ``coco_objects`` or ``sa1b`` with thing flags.

    ADE20K things are the standard 100 (:data:`ADE20K_THING_IDS`); COCO things are ids
    1..90; COCO-Objects' background (0) is stuff; the class-agnostic SA-1B class is a thing. The files are read from
    ``data_dir/class_names/`` (default: the package's own, :data:`training.data.package_data.DATA_DIR`).
    """
    if dataset not in DATASET_CLASS_FILES:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASET_CLASS_FILES)}")
    path = Path(data_dir or DATA_DIR) / "class_names" / DATASET_CLASS_FILES[dataset]
    if dataset == "ade20k":
        things: Iterable[int] = ADE20K_THING_IDS
    elif dataset in ("coco", "coco_panoptic", "coco_objects"):
        things = range(1, COCO_MAX_THING_ID + 1)
    else:
        things = [0]
    return read_class_names(path, thing_category_ids=things)
