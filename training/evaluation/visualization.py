"""Pictures and files of segmentation predictions: colours, overlays with outlines and class names, COCO panoptic
PNG + JSON.

Every task is first brought to one form, :class:`SegmentationResult`: an id map (``0`` = void, segment ids >= 1) and
one :class:`Segment` per id. Panoptic, semantic and instance outputs of ``DearliImageProcessor`` convert with
:func:`from_panoptic`, :func:`from_semantic` and :func:`from_instance`.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from modeling_dearli.image_processing_dearli import id_to_rgb
from modeling_dearli.image_reading import to_rgb

__all__ = [
    "Segment",
    "SegmentationResult",
    "class_palette",
    "from_instance",
    "from_panoptic",
    "from_semantic",
    "overlay",
    "save_panoptic_png",
    "segment_dicts",
    "segments_json",
    "write_json",
]


@dataclass
class Segment:
    """One segment of an id map: ``id`` >= 1, contiguous class index ``label_id`` and its name."""

    id: int
    label_id: int
    label: str
    score: float | None = None
    isthing: bool = True
    area: int = 0
    bbox: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # COCO [x, y, width, height]


@dataclass
class SegmentationResult:
    """An ``(H, W)`` int64 id map (0 = void) and its segments (with area and bounding box filled in)."""

    id_map: np.ndarray
    segments: list[Segment]


# ----------------------------------------------------------------------------------------------------------------------
# Conversions from the processor's outputs


def _to_numpy(segmentation: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(segmentation, torch.Tensor):
        segmentation = segmentation.detach().cpu().numpy()
    return np.asarray(segmentation).astype(np.int64)


def _finish(id_map: np.ndarray, segments: list[Segment]) -> SegmentationResult:
    """Fill in areas and bounding boxes (vectorised over pixels), drop segments without pixels."""
    if not segments:
        return SegmentationResult(id_map, [])
    size = int(max(id_map.max(initial=0), max(s.id for s in segments))) + 1
    flat = id_map.ravel()
    area = np.bincount(flat, minlength=size)
    ys, xs = np.divmod(np.arange(flat.size), id_map.shape[1])
    x0 = np.full(size, np.iinfo(np.int64).max)
    y0 = np.full(size, np.iinfo(np.int64).max)
    x1 = np.full(size, -1)
    y1 = np.full(size, -1)
    np.minimum.at(x0, flat, xs)
    np.minimum.at(y0, flat, ys)
    np.maximum.at(x1, flat, xs)
    np.maximum.at(y1, flat, ys)
    kept = []
    for s in segments:
        if area[s.id] == 0:
            continue
        s.area = int(area[s.id])
        s.bbox = [int(x0[s.id]), int(y0[s.id]), int(x1[s.id] - x0[s.id] + 1), int(y1[s.id] - y0[s.id] + 1)]
        kept.append(s)
    return SegmentationResult(id_map, kept)


def from_panoptic(
    result: Mapping[str, Any], id2label: Mapping[int, str], thing_ids: Sequence[int] = ()
) -> SegmentationResult:
    """``post_process_panoptic_segmentation`` output for one image (ids >= 1, -1 = void)."""
    id_map = _to_numpy(result["segmentation"])
    id_map[id_map < 0] = 0
    things = set(thing_ids)
    segments = [
        Segment(s["id"], s["label_id"], id2label.get(s["label_id"], str(s["label_id"])), s.get("score"),
                s["label_id"] in things)
        for s in result["segments_info"]
    ]
    return _finish(id_map, segments)


def from_semantic(
    segmentation: torch.Tensor | np.ndarray, id2label: Mapping[int, str], thing_ids: Sequence[int] = ()
) -> SegmentationResult:
    """``post_process_semantic_segmentation`` output for one image: one segment per class present (id = class + 1)."""
    classes = _to_numpy(segmentation)
    id_map = np.where(classes >= 0, classes + 1, 0)
    things = set(thing_ids)
    present = [int(c) for c in np.unique(classes) if c >= 0]
    segments = [Segment(c + 1, c, id2label.get(c, str(c)), None, c in things) for c in present]
    return _finish(id_map, segments)


def from_instance(result: Mapping[str, Any], id2label: Mapping[int, str]) -> SegmentationResult:
    """``post_process_instance_segmentation`` output (id map variant, ids >= 0, -1 = none) for one image."""
    raw = _to_numpy(result["segmentation"])
    id_map = np.where(raw >= 0, raw + 1, 0)
    segments = [
        Segment(s["id"] + 1, s["label_id"], id2label.get(s["label_id"], str(s["label_id"])), s.get("score"), True)
        for s in result["segments_info"]
    ]
    return _finish(id_map, segments)


# ----------------------------------------------------------------------------------------------------------------------
# Files


def save_panoptic_png(path: str | os.PathLike, id_map: np.ndarray) -> None:
    """COCO panoptic PNG: segment id ``R + 256 G + 256^2 B`` per pixel, void = 0 (black)."""
    Image.fromarray(id_to_rgb(id_map)).save(path)


def segments_json(
    result: SegmentationResult, file_name: str, image_id: int | str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A COCO panoptic annotation entry (``category_id`` = the model's contiguous class index) plus names/scores."""
    entry: dict[str, Any] = {
        "image_id": image_id,
        "file_name": file_name,
        "height": int(result.id_map.shape[0]),
        "width": int(result.id_map.shape[1]),
        "segments_info": [
            {
                "id": s.id,
                "category_id": s.label_id,
                "label": s.label,
                "score": None if s.score is None else round(float(s.score), 6),
                "isthing": int(s.isthing),
                "iscrowd": 0,
                "area": s.area,
                "bbox": s.bbox,
            }
            for s in result.segments
        ],
    }
    if extra:
        entry.update(extra)
    return entry


def write_json(path: str | os.PathLike, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


# ----------------------------------------------------------------------------------------------------------------------
# Pictures


def class_palette(num_classes: int, saturation: float = 0.75, value: float = 0.95) -> np.ndarray:
    """Distinct, deterministic colours ``(num_classes, 3)`` uint8 (golden-ratio hue steps)."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    colours = [colorsys.hsv_to_rgb(h, saturation, value) for h in hues]
    return (np.asarray(colours).reshape(-1, 3) * 255).round().astype(np.uint8)


def _segment_colours(segments: Sequence[Segment], num_classes: int) -> dict[int, np.ndarray]:
    """Class colour per segment; instances of one thing class get lighter / darker shades of it."""
    palette = class_palette(max(num_classes, 1))
    seen: dict[int, int] = {}
    colours = {}
    for s in segments:
        base = palette[s.label_id % len(palette)].astype(np.float64)
        k = seen.get(s.label_id, 0)
        seen[s.label_id] = k + 1
        if s.isthing and k:
            shade = ((k * 0.37) % 0.8) - 0.4  # deterministic shade in [-0.4, 0.4)
            base = base + (255 - base) * shade if shade > 0 else base * (1 + shade)
        colours[s.id] = base.clip(0, 255).astype(np.uint8)
    return colours


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _label_anchor(order: np.ndarray, start: int, stop: int, width: int) -> tuple[int, int]:
    """The segment pixel nearest to the segment's centroid (inside the segment even when it is not convex)."""
    pixels = order[start:stop]
    ys, xs = np.divmod(pixels, width)
    cy, cx = ys.mean(), xs.mean()
    best = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[best]), int(ys[best])


def overlay(
    image: Image.Image,
    result: SegmentationResult,
    num_classes: int,
    alpha: float = 0.55,
    outline_width: int | None = None,
    draw_labels: bool = True,
    min_label_fraction: float = 0.001,
) -> Image.Image:
    """The image with coloured segments, white outlines and class names (with scores where known)."""
    rgb = np.asarray(to_rgb(image)).astype(np.float32)
    id_map = result.id_map
    if id_map.shape != rgb.shape[:2]:
        raise ValueError(f"id map {id_map.shape} and image {rgb.shape[:2]} differ in size")
    height, width = id_map.shape
    size = int(id_map.max(initial=0)) + 1
    lut = np.zeros((max(size, max((s.id for s in result.segments), default=0) + 1), 3), dtype=np.float32)
    has_colour = np.zeros(len(lut), dtype=bool)
    for seg_id, colour in _segment_colours(result.segments, num_classes).items():
        lut[seg_id] = colour
        has_colour[seg_id] = True
    coloured = has_colour[id_map]
    blended = rgb.copy()
    blended[coloured] = (1 - alpha) * rgb[coloured] + alpha * lut[id_map[coloured]]

    # Outlines where the id changes to the right or below, thickened for large images.
    edge = np.zeros((height, width), dtype=bool)
    edge[:, :-1] |= id_map[:, :-1] != id_map[:, 1:]
    edge[:-1, :] |= id_map[:-1, :] != id_map[1:, :]
    thickness = outline_width or max(1, min(height, width) // 300)
    for _ in range(thickness - 1):
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:, 1:] |= edge[:, :-1]
        edge = grown
    blended[edge] = 255.0
    picture = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))

    if draw_labels and result.segments:
        draw = ImageDraw.Draw(picture)
        font = _font(max(10, min(height, width) // 40))
        flat = id_map.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(len(lut) + 1))
        min_area = min_label_fraction * height * width
        for s in sorted(result.segments, key=lambda s: -s.area):
            if s.area < min_area:
                continue
            x, y = _label_anchor(order, bounds[s.id], bounds[s.id + 1], width)
            text = s.label if s.score is None else f"{s.label} {s.score:.2f}"
            box = draw.textbbox((x, y), text, font=font, anchor="mm")
            draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
            draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor="mm")
    return picture


def segment_dicts(result: SegmentationResult) -> list[dict[str, Any]]:
    """Plain dicts of the segments (for logging / JSON)."""
    return [asdict(s) for s in result.segments]
