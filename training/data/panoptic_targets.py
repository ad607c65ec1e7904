"""Targets of a panoptic dataset row: :class:`PanopticTarget` (segment-id map and segments in the contiguous label
space), semantic maps for mIoU, and Mask2Former-style ``mask_labels`` / ``class_labels``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from modeling_dearli.image_processing_dearli import rgb_to_id
from training.data.class_names import ClassNames
from training.data.panoptic_format import IGNORE_INDEX, VOID_ID, VOID_SEGMENT_COLUMN


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
        for cid, label in class_names.category_to_index.items():
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
