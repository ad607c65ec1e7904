"""Panoptic datasets as 🤗 ``datasets.Dataset``: COCO panoptic format, ADE20K (converted), COCO-Objects, partitions.

Rows have the columns

* ``image`` (``datasets.Image``), ``panoptic`` (``datasets.Image``: the RGB-encoded segment-id PNG),
* ``image_id`` (as in the JSON: int for COCO, str for ADE20K), ``file_name`` (image file name),
* ``segments_info``: list of ``{id, category_id, label, iscrowd, isthing, area, bbox}`` where ``category_id`` is the
  dataset's own id and ``label`` the contiguous class index (position in :class:`ClassNames`),
* optionally ``semantic`` (``datasets.Image``: a semantic map of category ids, 0 = ignore; ADE20K),
* optionally ``void_segment_id`` (COCO-Objects): the segment that the PNG's void pixels (id 0) belong to.

``save_to_disk`` embeds the image bytes; ``push_to_hub`` works as for any dataset.
Model targets come from :func:`panoptic_target_from_row` (segment-id map + ``{segment id: class}``), which the
image processor or :func:`masks_and_labels` turn into Mask2Former-style ``mask_labels``/``class_labels``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modeling_dearli.image_processing_dearli import rgb_to_id
from training.data.package_data import DATA_DIR
from training.data.panoptic_format import IGNORE_INDEX, VOID_ID

logger = logging.getLogger(__name__)


DATASET_CLASS_FILES = {
    "ade20k": "ade20k_150.txt",
    "coco": "coco_panoptic.txt",
    "coco_panoptic": "coco_panoptic.txt",
    "coco_objects": "coco_objects.txt",
    "sa1b": "sa1b.txt",
}
SPLIT_DIRS = {"ade20k": "ade20k", "coco": "coco", "coco_panoptic": "coco", "coco_objects": "coco"}
COCO_MAX_THING_ID = 90  # COCO panoptic: category ids 1..90 are things, 92..200 stuff
# Row column naming the segment that takes the PNG's void pixels (COCO-Objects: the background segment).
VOID_SEGMENT_COLUMN = "void_segment_id"

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
# ADE20K split names -> the ADEChallengeData2016 folder names.
ADE20K_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


# --------------------------------------------------------------------------------------------------------------------
# class names
# --------------------------------------------------------------------------------------------------------------------

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
    def id_to_label(self) -> dict[int, int]:
        """Dataset category id -> contiguous index."""
        return dict(self._index)

    @property
    def label_to_id(self) -> list[int]:
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

    def contiguous_categories(self) -> list[dict[str, Any]]:
        """Categories whose id is the contiguous index (the model's label space)."""
        return [{"id": i, "name": n, "isthing": int(t)} for i, (n, t) in enumerate(zip(self.first_names,
                                                                                       self.is_thing))]


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
        if name.strip() == "invalid_class_id":
            continue
        ids.append(int(cid))
        names.append(name.strip())
    if thing_category_ids is None and categories_json is not None:
        with open(categories_json) as f:
            cats = json.load(f)
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


# --------------------------------------------------------------------------------------------------------------------
# COCO panoptic format -> datasets.Dataset
# --------------------------------------------------------------------------------------------------------------------
def segment_features() -> Any:
    import datasets

    v = datasets.Value
    return datasets.List(
        {
            "id": v("int64"),
            "category_id": v("int64"),
            "label": v("int64"),
            "iscrowd": v("int64"),
            "isthing": v("bool"),
            "area": v("int64"),
            "bbox": datasets.List(v("float64"), length=4),
        }
    )


def panoptic_features(image_id_type: str = "int64", with_semantic: bool = False) -> Any:
    import datasets

    feats = {
        "image": datasets.Image(),
        "panoptic": datasets.Image(),
        "image_id": datasets.Value(image_id_type),
        "file_name": datasets.Value("string"),
        "segments_info": segment_features(),
    }
    if with_semantic:
        feats["semantic"] = datasets.Image()
    return datasets.Features(feats)


def _report_missing(paths: list[str], what: str, source: Path) -> None:
    if paths:
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        raise FileNotFoundError(f"{len(paths)} {what} referenced by {source} not found: {shown}")


def load_coco_panoptic(
    images_dir: str | os.PathLike[str],
    panoptic_dir: str | os.PathLike[str],
    annotations_json: str | os.PathLike[str],
    *,
    class_names: ClassNames | None = None,
    semantic_dir: str | os.PathLike[str] | None = None,
    keep_unannotated: bool = False,
    check_files: bool = True,
) -> Any:
    """A COCO panoptic format folder -> ``datasets.Dataset`` (columns in the module docstring).

    ``class_names`` sets the label space (default: the JSON's categories in id order, things from ``isthing``);
    segments whose category is not in it raise ``ValueError``. Images listed in the JSON without an annotation entry
    are counted, logged and dropped (``keep_unannotated=True`` keeps them with an empty ``segments_info`` and no
    ``panoptic``); annotation entries without any segment are counted and logged. Missing image / PNG files and
    annotations pointing to unknown images raise errors naming them.
    """
    import datasets

    images_dir, panoptic_dir, annotations_json = Path(images_dir), Path(panoptic_dir), Path(annotations_json)
    if not annotations_json.is_file():
        raise FileNotFoundError(f"panoptic annotations JSON not found: {annotations_json}")
    for d, what in ((images_dir, "images"), (panoptic_dir, "panoptic PNG")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {d}")
    try:
        data = json.loads(annotations_json.read_text())
    except ValueError as error:
        raise ValueError(f"{annotations_json} is not valid JSON: {error}") from None
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{annotations_json} has no '{key}' list: not a COCO panoptic annotation file")

    if class_names is None:
        if "categories" not in data:
            raise ValueError(f"{annotations_json} has no 'categories'; pass class_names")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        class_names = ClassNames(
            tuple(int(c["id"]) for c in cats),
            tuple(str(c["name"]) for c in cats),
            tuple(int(c.get("isthing", 0)) == 1 for c in cats),
        )
    id_to_label = class_names.id_to_label

    images = {img["id"]: img for img in data["images"]}
    annotated = set()
    records: dict[str, list[Any]] = {k: [] for k in ("image", "panoptic", "image_id", "file_name", "segments_info")}
    if semantic_dir is not None:
        records["semantic"] = []
    missing_images: list[str] = []
    missing_pngs: list[str] = []
    missing_semantic: list[str] = []
    no_segments = 0
    for ann in data["annotations"]:
        image_id = ann.get("image_id")
        if image_id not in images:
            raise ValueError(
                f"{annotations_json}: annotation {ann.get('file_name')!r} points to image_id {image_id!r}, which is "
                f"not in 'images'"
            )
        if image_id in annotated:
            raise ValueError(f"{annotations_json}: image_id {image_id!r} has more than one annotation")
        annotated.add(image_id)
        img = images[image_id]
        image_path = images_dir / img["file_name"]
        png_path = panoptic_dir / ann["file_name"]
        if check_files:
            if not image_path.is_file():
                missing_images.append(str(image_path))
            if not png_path.is_file():
                missing_pngs.append(str(png_path))
        segs = []
        for s in ann.get("segments_info", []):
            cid = int(s["category_id"])
            if cid not in id_to_label:
                raise ValueError(
                    f"{annotations_json}: image {image_id!r} segment {s.get('id')} has category_id {cid}, which is "
                    f"not in the label space ({len(class_names)} classes)"
                )
            label = id_to_label[cid]
            segs.append(
                {
                    "id": int(s["id"]),
                    "category_id": cid,
                    "label": label,
                    "iscrowd": int(s.get("iscrowd", 0)),
                    "isthing": bool(class_names.is_thing[label]),
                    "area": int(s.get("area", 0)),
                    "bbox": [float(x) for x in s.get("bbox", [0, 0, 0, 0])],
                }
            )
        if not segs:
            no_segments += 1
        records["image"].append(str(image_path))
        records["panoptic"].append(str(png_path))
        records["image_id"].append(image_id)
        records["file_name"].append(img["file_name"])
        records["segments_info"].append(segs)
        if semantic_dir is not None:
            sem_path = Path(semantic_dir) / (Path(img["file_name"]).stem + ".png")
            if check_files and not sem_path.is_file():
                missing_semantic.append(str(sem_path))
            records["semantic"].append(str(sem_path))
    _report_missing(missing_images, "image files", annotations_json)
    _report_missing(missing_pngs, "panoptic PNG files", annotations_json)
    _report_missing(missing_semantic, "semantic annotation files", annotations_json)

    unannotated = [i for i in images if i not in annotated]
    if unannotated:
        logger.warning(
            "%s: %d of %d images have no annotation entry (%s)%s",
            annotations_json, len(unannotated), len(images), ", ".join(map(str, unannotated[:5])),
            "; kept without segments" if keep_unannotated else "; dropped",
        )
        if keep_unannotated:
            for image_id in unannotated:
                img = images[image_id]
                records["image"].append(str(images_dir / img["file_name"]))
                records["panoptic"].append(None)
                records["image_id"].append(image_id)
                records["file_name"].append(img["file_name"])
                records["segments_info"].append([])
                if semantic_dir is not None:
                    records["semantic"].append(None)
    if no_segments:
        logger.warning("%s: %d annotated images have no segment at all", annotations_json, no_segments)
    logger.info("%s: %d images, %d classes", annotations_json, len(records["image"]), len(class_names))

    id_type = "string" if any(isinstance(i, str) for i in records["image_id"]) else "int64"
    features = panoptic_features(id_type, with_semantic=semantic_dir is not None)
    ds = datasets.Dataset.from_dict(records, features=features)
    ds.info.description = json.dumps(
        {"unannotated_images": len(unannotated), "images_without_segments": no_segments,
         "class_names": list(class_names.names), "category_ids": list(class_names.category_ids),
         "thing_ids": class_names.thing_ids}
    )
    return ds


def load_ade20k_panoptic(
    root: str | os.PathLike[str],
    split: str = "validation",
    *,
    panoptic_root: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    with_semantic: bool = True,
) -> Any:
    """ADE20K after ``scripts/prepare_ade20k.py``: ``root`` = ADEChallengeData2016 (``images/<split>``,
    ``annotations/<split>``) with ``ade20k_panoptic_{train,val}[.json]`` in ``panoptic_root`` (default ``root``).
    Adds the original semantic maps as ``semantic`` (for mIoU) unless ``with_semantic=False``.
    """
    if split not in ADE20K_SPLITS:
        raise ValueError(f"split must be one of {sorted(ADE20K_SPLITS)}, got {split!r}")
    dirname = ADE20K_SPLITS[split]
    short = "train" if dirname == "training" else "val"
    root = Path(root)
    proot = Path(panoptic_root) if panoptic_root is not None else root
    ann = proot / f"ade20k_panoptic_{short}.json"
    if not ann.is_file():
        raise FileNotFoundError(f"{ann} not found: run scripts/prepare_ade20k.py --root {root} first")
    return load_coco_panoptic(
        root / "images" / dirname,
        proot / f"ade20k_panoptic_{short}",
        ann,
        class_names=load_class_names("ade20k", data_dir),
        semantic_dir=(root / "annotations" / dirname) if with_semantic else None,
    )


def to_coco_objects(ds: Any, class_names: ClassNames | None = None, void_to_background: bool = True) -> Any:
    """Remap a COCO-Panoptic dataset to COCO-Objects (81 classes) as the reference's ``prepare_coco_objects.py``:
    every stuff segment becomes ``background`` (category 0, label 0), things keep their COCO id with COCO-Objects'
    contiguous label, and (`void_to_background`, the reference) the void pixels join the background too, in training
    and in the evaluation ground truth, which then has no void.

    Stuff segments of one image still have distinct ids in the PNG; :func:`panoptic_target_from_row` merges
    segments of the same stuff class (so an image has one background segment, with the first stuff segment's id).
    Void pixels go to that segment, or, in an image without stuff, to a new background segment whose id is the
    smallest positive integer the image does not use (column ``void_segment_id``; the segment is dropped again when
    the image has no void pixel). ``void_to_background=False`` leaves void pixels void (unlabeled, not evaluated).
    """
    objects = class_names or load_class_names("coco_objects")
    to_label = objects.id_to_label
    if 0 not in to_label:
        raise ValueError("COCO-Objects label space needs category 0 (background)")

    def remap(segments: list[dict[str, Any]]) -> dict[str, Any]:
        out, background = [], None
        for s in segments:
            s = dict(s)
            if s["isthing"]:
                if s["category_id"] not in to_label:
                    raise ValueError(f"thing category {s['category_id']} is not a COCO-Objects class")
                s["label"] = to_label[s["category_id"]]
            else:
                s["category_id"], s["label"] = 0, to_label[0]
                background = s["id"] if background is None else background
            s["isthing"] = bool(objects.is_thing[s["label"]])
            out.append(s)
        if not void_to_background:
            return {"segments_info": out, VOID_SEGMENT_COLUMN: -1}
        if background is None:
            used = {s["id"] for s in segments}
            background = next(i for i in itertools.count(1) if i not in used)
            out.append({"id": background, "category_id": 0, "label": to_label[0], "iscrowd": 0, "isthing": False,
                        "area": 0, "bbox": [0.0, 0.0, 0.0, 0.0]})
        return {"segments_info": out, VOID_SEGMENT_COLUMN: background}

    new = ds.map(remap, input_columns="segments_info", desc="COCO-Objects remap")
    info = json.loads(ds.info.description or "{}") if (ds.info.description or "").startswith("{") else {}
    info.update({"class_names": list(objects.names), "category_ids": list(objects.category_ids),
                 "thing_ids": objects.thing_ids})
    new.info.description = json.dumps(info)
    return new


def load_coco_objects(
    images_dir: str | os.PathLike[str],
    panoptic_dir: str | os.PathLike[str],
    annotations_json: str | os.PathLike[str],
    void_to_background: bool = True,
    **kwargs: Any,
) -> Any:
    """COCO panoptic folder loaded with the 133 COCO classes, then remapped by :func:`to_coco_objects`."""
    data_dir = kwargs.pop("data_dir", None)
    ds = load_coco_panoptic(images_dir, panoptic_dir, annotations_json,
                            class_names=load_class_names("coco_panoptic", data_dir), **kwargs)
    return to_coco_objects(ds, load_class_names("coco_objects", data_dir), void_to_background)


def load_panoptic_dataset(
    dataset_name: str,
    *,
    images_dir: str | os.PathLike[str] | None = None,
    panoptic_dir: str | os.PathLike[str] | None = None,
    annotations_json: str | os.PathLike[str] | None = None,
    ade20k_root: str | os.PathLike[str] | None = None,
    split: str = "validation",
    panoptic_root: str | os.PathLike[str] | None = None,
    with_semantic: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    coco_objects_void_to_background: bool = True,
    class_names_file: str | os.PathLike[str] | None = None,
) -> tuple[Any, ClassNames]:
    """One split of a dataset by name and its label space: ``ade20k`` (``ade20k_root``, ``split``, ``panoptic_root``,
    ``with_semantic``), ``coco_panoptic`` / ``coco_objects`` (their fixed label spaces; COCO-Objects' void pixels are
    background unless ``coco_objects_void_to_background=False``) or ``custom`` (the classes of the annotation JSON)
    from a COCO panoptic folder (``images_dir``, ``panoptic_dir``, ``annotations_json``). ``data_dir``: class names as
    in :func:`load_class_names`.

    ``class_names_file`` (``coco_panoptic`` / ``custom``): the label space's names with synonyms from an
    ``id:name,synonym,...`` file (:func:`read_class_names`; thing flags from the JSON's ``isthing``) instead of the
    dataset's default names."""
    if class_names_file is not None and dataset_name not in ("coco_panoptic", "custom"):
        raise ValueError(f"a class-names file replaces the names of a COCO panoptic or custom dataset, not of "
                         f"{dataset_name!r} (its names ship with the project)")
    if dataset_name == "ade20k":
        ds = load_ade20k_panoptic(ade20k_root, split, panoptic_root=panoptic_root, data_dir=data_dir,
                                  with_semantic=with_semantic)
        return ds, load_class_names("ade20k", data_dir)
    if dataset_name == "coco_objects":
        ds = load_coco_objects(images_dir, panoptic_dir, annotations_json, coco_objects_void_to_background,
                               data_dir=data_dir)
        return ds, load_class_names("coco_objects", data_dir)
    if dataset_name not in ("coco_panoptic", "custom"):
        raise ValueError(f"unknown dataset {dataset_name!r}: coco_panoptic, coco_objects, ade20k or custom")
    names = load_class_names("coco_panoptic", data_dir) if dataset_name == "coco_panoptic" else None
    if class_names_file is not None:
        names = read_class_names(class_names_file, categories_json=annotations_json)
    ds = load_coco_panoptic(images_dir, panoptic_dir, annotations_json, class_names=names)
    return ds, names or dataset_class_names(ds)


def restrict_to_present_classes(ds: Any, class_names: ClassNames, validation: Any = None) -> tuple[Any, ClassNames, Any]:
    """Keep only the classes annotated in `ds` (small demos): ``(ds, restricted label space, validation)`` with the
    segments' ``label`` renumbered in place (no file is re-read); validation segments of other classes are dropped."""
    present = sorted({s["category_id"] for segs in ds["segments_info"] for s in segs})
    keep = [class_names.id_to_label[c] for c in present]
    restricted = ClassNames(tuple(present), tuple(class_names.names[i] for i in keep),
                            tuple(class_names.is_thing[i] for i in keep))
    new_label = restricted.id_to_label

    def relabel(segments: list[dict[str, Any]]) -> dict[str, Any]:
        return {"segments_info": [{**s, "label": new_label[s["category_id"]]} for s in segments
                                  if s["category_id"] in new_label]}

    ds = ds.map(relabel, input_columns="segments_info", desc="restrict classes")
    if validation is not None:
        validation = validation.map(relabel, input_columns="segments_info", desc="restrict classes")
    return ds, restricted, validation


# --------------------------------------------------------------------------------------------------------------------
# partitions
# --------------------------------------------------------------------------------------------------------------------
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

    Exactly one of: ``labeled`` (image file stems or image ids), ``dataset`` + ``partition`` (standard partition
    files, e.g. ``("ade20k", "1_128")``), or ``fraction`` (random subset of that size, drawn with ``seed``).
    With ``strict``, listed images missing from ``ds`` raise ``KeyError`` naming them.
    """
    given = sum(x is not None for x in (labeled, partition, fraction))
    if given != 1:
        raise ValueError("give exactly one of labeled=, partition= (with dataset=) or fraction=")
    keys = [row_key(f) for f in ds["file_name"]]
    if partition is not None:
        if dataset is None:
            raise ValueError("partition= needs dataset= ('ade20k' or 'coco')")
        labeled = partition_keys(dataset, partition, data_dir)
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


# --------------------------------------------------------------------------------------------------------------------
# row -> targets
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class PanopticTarget:
    """Ground truth of one image: segment-id map (0 = void) and its segments in the contiguous label space."""

    id_map: np.ndarray  # (H, W) int64
    segments: list[dict[str, Any]]  # {"id", "label", "category_id", "iscrowd", "isthing"}

    def instance_id_to_label(self, include_crowd: bool = False) -> dict[int, int]:
        """``{segment id: contiguous class}`` of non-crowd segments (pair it with :meth:`training_id_map`)."""
        return {s["id"]: s["label"] for s in self.segments if include_crowd or not s["iscrowd"]}

    def instance_id_to_semantic_id(self) -> dict[int, int]:
        """Every segment -> contiguous class, crowd segments -> -1 (ignored): the ``instance_id_to_semantic_id``
        argument of ``DearliImageProcessor.preprocess`` for :attr:`id_map`."""
        return {s["id"]: (-1 if s["iscrowd"] else s["label"]) for s in self.segments}

    def training_id_map(self) -> np.ndarray:
        """The id map with crowd segments set to void (0): crowd regions belong to no training mask."""
        crowd = [s["id"] for s in self.segments if s["iscrowd"]]
        if not crowd:
            return self.id_map
        return np.where(np.isin(self.id_map, crowd), VOID_ID, self.id_map)

    def eval_segments(self) -> list[dict[str, Any]]:
        """Segments for :class:`~training.evaluation.panoptic_quality.PanopticQuality` in the contiguous label space."""
        return [{"id": s["id"], "category_id": s["label"], "iscrowd": s["iscrowd"]} for s in self.segments]

    def semantic_map(self, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
        """(H, W) contiguous class per pixel (crowd included), ``ignore_index`` for void / unlisted ids."""
        ids = np.array(sorted({s["id"] for s in self.segments}), dtype=np.int64)
        labels = {s["id"]: s["label"] for s in self.segments}
        if len(ids) == 0:
            return np.full(self.id_map.shape, ignore_index, dtype=np.int64)
        lut = np.array([labels[i] for i in ids.tolist()] + [ignore_index], dtype=np.int64)
        pos = np.searchsorted(ids, self.id_map)
        found = ids[np.minimum(pos, len(ids) - 1)] == self.id_map
        return np.where(found, lut[np.minimum(pos, len(ids) - 1)], ignore_index)


def _image_array(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        from PIL import Image

        with Image.open(value) as im:
            return np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L", "I", "I;16") else im)
    if isinstance(value, dict):  # datasets.Image(decode=False)
        import io

        from PIL import Image

        src = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(src) as im:
            return np.asarray(im)
    if hasattr(value, "mode") and value.mode == "P":
        value = value.convert("RGB")
    return np.asarray(value)


def panoptic_target_from_row(row: Mapping[str, Any], *, merge_stuff: bool = True) -> PanopticTarget:
    """A dataset row -> :class:`PanopticTarget`.

    With ``merge_stuff`` (default) all segments of one stuff class become a single segment (the first one's id), as
    panoptic segmentation requires; this is what makes COCO-Objects' remapped background one segment. A row's
    ``void_segment_id`` (COCO-Objects) gives the void pixels to that segment.
    """
    color = _image_array(row["panoptic"])
    if color is None:
        raise ValueError(f"row {row.get('image_id')!r} has no panoptic annotation")
    id_map = rgb_to_id(color).astype(np.int64)
    void_segment = int(row.get(VOID_SEGMENT_COLUMN) or -1)
    if void_segment > 0:  # COCO-Objects: void pixels belong to the background segment (see to_coco_objects)
        id_map[id_map == VOID_ID] = void_segment
    segments = [
        {"id": int(s["id"]), "label": int(s["label"]), "category_id": int(s["category_id"]),
         "iscrowd": int(s["iscrowd"]), "isthing": bool(s["isthing"])}
        for s in row["segments_info"]
    ]
    if merge_stuff:
        first: dict[tuple[int, int], int] = {}
        remap: dict[int, int] = {}
        kept = []
        for s in segments:
            if s["isthing"]:
                kept.append(s)
                continue
            key = (s["label"], s["iscrowd"])
            if key in first:
                remap[s["id"]] = first[key]
            else:
                first[key] = s["id"]
                kept.append(s)
        if remap:
            src = np.array(list(remap), dtype=np.int64)
            dst = np.array([remap[i] for i in src.tolist()], dtype=np.int64)
            order = np.argsort(src)
            src, dst = src[order], dst[order]
            pos = np.minimum(np.searchsorted(src, id_map), len(src) - 1)
            id_map = np.where(src[pos] == id_map, dst[pos], id_map)
        segments = kept
    if void_segment > 0 and not (id_map == void_segment).any():  # an added background segment left without pixels
        segments = [s for s in segments if s["id"] != void_segment]
    return PanopticTarget(id_map=id_map, segments=segments)


def semantic_target_from_row(
    row: Mapping[str, Any], class_names: ClassNames | None = None, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """(H, W) int64 contiguous semantic labels for mIoU: from the ``semantic`` column when present (category ids,
    0 = ignore; needs ``class_names``), else from the panoptic annotation (crowd included, void ignored).
    """
    sem = row.get("semantic")
    if sem is not None:
        if class_names is None:
            raise ValueError("semantic column holds category ids: pass class_names to map them")
        arr = _image_array(sem).astype(np.int64)
        lut = np.full(max(max(class_names.category_ids), int(arr.max(initial=0))) + 1, ignore_index, dtype=np.int64)
        for cid, label in class_names.id_to_label.items():
            if cid >= 0:
                lut[cid] = label
        return lut[arr]
    return panoptic_target_from_row(row).semantic_map(ignore_index)


def masks_and_labels(
    id_map: np.ndarray, instance_id_to_label: Mapping[int, int]
) -> tuple[Any, Any]:
    """``mask_labels`` float (n, H, W) and ``class_labels`` long (n,) torch tensors for the listed segments
    (segments absent from the map are dropped; unlisted ids such as void or crowd get no mask)."""
    import torch

    id_map = np.asarray(id_map)
    ids = [i for i in instance_id_to_label]
    if not ids:
        return torch.zeros((0,) + id_map.shape, dtype=torch.float32), torch.zeros(0, dtype=torch.long)
    t = torch.from_numpy(id_map.astype(np.int64))
    id_t = torch.tensor(ids, dtype=torch.int64)
    masks = t.unsqueeze(0) == id_t.view(-1, 1, 1)
    present = masks.flatten(1).any(1)
    labels = torch.tensor([instance_id_to_label[i] for i in ids], dtype=torch.long)
    return masks[present].float(), labels[present]


def dataset_class_names(ds: Any) -> ClassNames | None:
    """The label space recorded in a dataset built here (``ds.info.description``), if any."""
    try:
        info = json.loads(ds.info.description or "")
        names, ids, things = info["class_names"], info["category_ids"], set(info["thing_ids"])
    except (ValueError, KeyError, TypeError):
        return None
    return ClassNames(tuple(ids), tuple(names), tuple(i in things for i in range(len(ids))))
