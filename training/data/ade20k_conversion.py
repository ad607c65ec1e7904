"""ADE20K (ADEChallengeData2016) semantic + instance annotations -> COCO panoptic format.

Follows the standard ADE20K panoptic benchmark conversion (Mask2Former's ``datasets/prepare_ade20k_pan_seg.py``):

* 150 categories; the 100 classes of the ADE20K instance benchmark are things, the other 50 stuff;
* stuff: one segment per stuff class present in ``annotations/<split>/<name>.png`` (pixel value = class id, 0 = void);
  pixels of thing classes in the semantic map are void unless covered by an instance;
* things: one segment per instance id (G channel) of ``annotations_instance/<split>/<name>.png``, whose R channel
  holds the instance-benchmark class (1..100, mapped to the 150-class ids below); instances are pasted after stuff
  and win where they overlap it;
* like the standard conversion, a stuff segment's ``area``/``bbox`` are measured on the semantic mask *before*
  instances are pasted (so evaluating against these JSON files reproduces published numbers); pass
  ``exact_areas=True`` to measure them on the final map instead.

Differences, on purpose: category ids are the ADE20K class ids 1..150 (the semantic PNG values and the ids of the
shipped ``training/data/assets/class_names/ade20k_150.txt``; the reference used 0..149), segment ids are
deterministic (``category_id + 256 * k``, k = 0 for stuff, 1.. for the instances of a class) and colours are
generated.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
from collections.abc import Sequence
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modeling_dearli.image_processing_dearli import id_to_rgb

from .class_names import ADE20K_NUM_CLASSES, ADE20K_THING_IDS, load_class_names
from .panoptic_datasets import ADE20K_SPLITS

logger = logging.getLogger(__name__)



def category_color(category_id: int) -> list[int]:
    """A deterministic, well-spread colour per category (golden-ratio hues)."""
    h = (category_id * 0.618033988749895) % 1.0
    s = 0.55 + 0.4 * ((category_id * 7) % 5) / 4
    v = 0.6 + 0.4 * ((category_id * 3) % 4) / 3
    return [int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v)]


def ade20k_categories(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """COCO-style categories (id 1..150, name, isthing, color). ``names`` defaults to the shipped class-name file."""
    if names is None:
        names = [n.split(",")[0] for n in load_class_names("ade20k").names]
    if len(names) != ADE20K_NUM_CLASSES:
        raise ValueError(f"expected {ADE20K_NUM_CLASSES} ADE20K class names, got {len(names)}")
    things = set(ADE20K_THING_IDS)
    return [
        {"id": i, "name": names[i - 1], "isthing": int(i in things), "color": category_color(i), "supercategory": ""}
        for i in range(1, ADE20K_NUM_CLASSES + 1)
    ]


def _bbox(mask: np.ndarray) -> list[int]:
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def convert_annotation(
    semantic: np.ndarray, instance: np.ndarray, *, exact_areas: bool = False, name: str = "?"
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image: semantic map (H, W) uint8 (0 void, 1..150) + instance map (H, W, 3) -> (id map, segments_info)."""
    semantic = np.asarray(semantic)
    instance = np.asarray(instance)
    if semantic.ndim != 2:
        raise ValueError(f"{name}: semantic annotation must be single-channel, got shape {semantic.shape}")
    if instance.ndim != 3 or instance.shape[2] < 2:
        raise ValueError(f"{name}: instance annotation must be RGB (R = class, G = instance id), got {instance.shape}")
    if instance.shape[:2] != semantic.shape:
        raise ValueError(f"{name}: instance annotation size {instance.shape[:2]} != semantic size {semantic.shape}")
    things = set(ADE20K_THING_IDS)
    id_map = np.zeros(semantic.shape, dtype=np.int64)
    segments: list[dict[str, Any]] = []

    for cat in np.unique(semantic).tolist():
        if cat == 0 or cat in things:
            continue
        if cat > ADE20K_NUM_CLASSES:
            raise ValueError(f"{name}: semantic annotation has class {cat} > {ADE20K_NUM_CLASSES}")
        mask = semantic == cat
        id_map[mask] = cat
        segments.append({"id": int(cat), "category_id": int(cat), "area": int(mask.sum()), "bbox": _bbox(mask),
                         "iscrowd": 0})

    inst_cls, inst_ids = instance[..., 0], instance[..., 1]
    per_class: dict[int, int] = {}
    for iid in np.unique(inst_ids).tolist():
        if iid == 0:
            continue
        mask = inst_ids == iid
        classes = np.unique(inst_cls[mask])
        if len(classes) != 1 or not 1 <= int(classes[0]) <= len(ADE20K_THING_IDS):
            raise ValueError(f"{name}: instance {iid} has instance classes {classes.tolist()} (expected one in 1..100)")
        cat = ADE20K_THING_IDS[int(classes[0]) - 1]
        per_class[cat] = per_class.get(cat, 0) + 1
        sid = cat + 256 * per_class[cat]
        id_map[mask] = sid
        segments.append({"id": int(sid), "category_id": int(cat), "area": int(mask.sum()), "bbox": _bbox(mask),
                         "iscrowd": 0})

    if exact_areas:
        kept = []
        for seg in segments:
            mask = id_map == seg["id"]
            if mask.any():
                seg["area"], seg["bbox"] = int(mask.sum()), _bbox(mask)
                kept.append(seg)
        segments = kept
    return id_map, segments


def _convert_one(
    image_path: Path, semantic_dir: Path, instance_dir: Path, out_dir: Path, exact_areas: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    stem = image_path.stem
    sem_path = semantic_dir / f"{stem}.png"
    ins_path = instance_dir / f"{stem}.png"
    for p, what in ((sem_path, "semantic"), (ins_path, "instance")):
        if not p.is_file():
            raise FileNotFoundError(f"{what} annotation for image {image_path} not found: {p}")
    semantic = np.asarray(Image.open(sem_path))
    instance = np.asarray(Image.open(ins_path).convert("RGB"))
    with Image.open(image_path) as im:
        width, height = im.size
    if (height, width) != semantic.shape:
        raise ValueError(f"{sem_path}: size {semantic.shape[::-1]} differs from image {image_path} ({width}x{height})")
    id_map, segments = convert_annotation(semantic, instance, exact_areas=exact_areas, name=str(sem_path))
    Image.fromarray(id_to_rgb(id_map)).save(out_dir / f"{stem}.png")
    image = {"id": stem, "file_name": image_path.name, "width": width, "height": height}
    annotation = {"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments}
    return image, annotation


def prepare_ade20k_panoptic(
    root: str | os.PathLike[str],
    split: str = "validation",
    *,
    output_dir: str | os.PathLike[str] | None = None,
    num_workers: int = 0,
    exact_areas: bool = False,
    progress: bool = True,
) -> Path:
    """Convert ``root`` (= ADEChallengeData2016) ``split`` to ``ade20k_panoptic_{train,val}/`` + ``.json``.

    Expects ``images/<split>/*.jpg``, ``annotations/<split>/*.png`` and ``annotations_instance/<split>/*.png``.
    Returns the JSON path. Output defaults to ``root``.
    """
    root = Path(root)
    if split not in ADE20K_SPLITS:
        raise ValueError(f"split must be one of {sorted(ADE20K_SPLITS)}, got {split!r}")
    dirname = ADE20K_SPLITS[split]
    short = "train" if dirname == "training" else "val"
    image_dir = root / "images" / dirname
    semantic_dir = root / "annotations" / dirname
    instance_dir = root / "annotations_instance" / dirname
    for d in (image_dir, semantic_dir, instance_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"ADE20K folder not found: {d}")
    out_root = Path(output_dir) if output_dir is not None else root
    out_dir = out_root / f"ade20k_panoptic_{short}"
    out_dir.mkdir(parents=True, exist_ok=True)
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no .jpg images in {image_dir}")

    fn = partial(_convert_one, semantic_dir=semantic_dir, instance_dir=instance_dir, out_dir=out_dir,
                 exact_areas=exact_areas)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(images), desc=f"ADE20K {short} -> panoptic", disable=not progress)
    results = []
    if num_workers > 0:
        with Pool(num_workers) as pool:
            for r in pool.imap(fn, images, chunksize=8):
                results.append(r)
                bar.update(1)
    else:
        for p in images:
            results.append(fn(p))
            bar.update(1)
    bar.close()
    data = {
        "info": {"description": f"ADE20K panoptic ({dirname}), converted by dearli"},
        "images": [r[0] for r in results],
        "annotations": [r[1] for r in results],
        "categories": ade20k_categories(),
    }
    out_json = out_root / f"ade20k_panoptic_{short}.json"
    with open(out_json, "w") as f:
        json.dump(data, f)
    empty = sum(1 for r in results if not r[1]["segments_info"])
    logger.info("wrote %d images to %s (%d without any segment)", len(results), out_json, empty)
    return out_json
