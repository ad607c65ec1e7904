"""Panoptic datasets as 🤗 ``datasets.Dataset``: COCO panoptic format, ADE20K (converted), COCO-Objects, partitions.

Rows have the columns

* ``image`` (``datasets.Image``), ``panoptic`` (``datasets.Image``: the RGB-encoded segment-id PNG),
* ``image_id`` (as in the JSON: int for COCO, str for ADE20K), ``file_name`` (image file name),
* ``segments_info``: list of ``{id, category_id, label, iscrowd, isthing, area, bbox}`` where ``category_id`` is the
  dataset's own id and ``label`` the contiguous class index (position in :class:`ClassNames`),
* optionally ``semantic`` (``datasets.Image``: a semantic map of category ids, 0 = ignore; ADE20K),
* optionally ``void_segment_id`` (COCO-Objects): the segment that the PNG's void pixels (id 0) belong to.

``save_to_disk`` embeds the image bytes; ``push_to_hub`` works as for any dataset. Label spaces are in
:mod:`training.data.class_names`, partitions in :mod:`training.data.partitions`, model targets in
:mod:`training.data.panoptic_targets`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

from training.data.class_names import ClassNames, class_names_from_categories, load_class_names, read_class_names
from training.data.panoptic_format import VOID_SEGMENT_COLUMN

logger = logging.getLogger(__name__)

# The datasets loaded by name (load_panoptic_dataset); any other name is a 🤗 dataset (training.data.hub_datasets).
NAMED_DATASETS = ("coco_panoptic", "coco_objects", "ade20k", "custom")
# ADE20K split names -> the ADEChallengeData2016 folder names.
ADE20K_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


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
        class_names = class_names_from_categories(data["categories"], str(annotations_json))
    category_to_index = class_names.category_to_index

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
            if cid not in category_to_index:
                raise ValueError(
                    f"{annotations_json}: image {image_id!r} segment {s.get('id')} has category_id {cid}, which is "
                    f"not in the label space ({len(class_names)} classes)"
                )
            label = category_to_index[cid]
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
    to_label = objects.category_to_index
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


def restrict_to_present_classes(
    ds: Any, class_names: ClassNames, validation: Any = None
) -> tuple[Any, ClassNames, Any]:
    """Keep only the classes annotated in `ds` (small demos): ``(ds, restricted label space, validation)`` with the
    segments' ``label`` renumbered in place (no file is re-read); validation segments of other classes are dropped."""
    present = sorted({s["category_id"] for segs in ds["segments_info"] for s in segs})
    keep = [class_names.category_to_index[c] for c in present]
    restricted = ClassNames(
        tuple(present), tuple(class_names.names[i] for i in keep), tuple(class_names.is_thing[i] for i in keep)
    )
    new_label = restricted.category_to_index

    def relabel(segments: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "segments_info": [
                {**s, "label": new_label[s["category_id"]]} for s in segments if s["category_id"] in new_label
            ]
        }

    ds = ds.map(relabel, input_columns="segments_info", desc="restrict classes")
    if validation is not None:
        validation = validation.map(relabel, input_columns="segments_info", desc="restrict classes")
    return ds, restricted, validation


def dataset_class_names(ds: Any) -> ClassNames | None:
    """The label space recorded in a dataset built here (``ds.info.description``), if any."""
    try:
        info = json.loads(ds.info.description or "")
        names, ids, things = info["class_names"], info["category_ids"], set(info["thing_ids"])
    except (ValueError, KeyError, TypeError):
        return None
    return ClassNames(tuple(ids), tuple(names), tuple(i in things for i in range(len(ids))))
