"""Pictures and files of segmentation predictions: overlays (a fixed colour per class, segment borders,
labels inside their segments, a legend), COCO panoptic PNG + JSON.

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
from scipy import ndimage

from modeling_dearli.image_processing_dearli import id_to_rgb
from modeling_dearli.image_reading import to_rgb

__all__ = [
    "Segment",
    "SegmentationResult",
    "class_colour",
    "draw_legend",
    "from_instance",
    "from_panoptic",
    "from_semantic",
    "legend_entries",
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


def class_colour(label_id: int) -> np.ndarray:
    """The colour ``(3,)`` uint8 of class ``label_id`` of a vocabulary: the same in every image and run.

    Hues advance by the golden ratio (neighbouring classes far apart on the colour wheel, so a small vocabulary gets
    well-separated colours) and brightness cycles over three levels, which separates the classes whose hues come
    close again (13, 21, 34, ... classes apart)."""
    hue = (label_id * 0.618033988749895) % 1.0
    saturation, value = ((0.75, 0.95), (0.9, 0.75), (0.55, 0.9))[label_id % 3]
    return (np.asarray(colorsys.hsv_to_rgb(hue, saturation, value)) * 255).round().astype(np.uint8)


def _segment_colours(segments: Sequence[Segment]) -> dict[int, np.ndarray]:
    """Class colour per segment id; further instances of a thing class get lighter / darker shades of it."""
    seen: dict[int, int] = {}
    colours = {}
    for s in sorted(segments, key=lambda s: s.id):
        base = class_colour(s.label_id).astype(np.float64)
        k = seen.get(s.label_id, 0)
        seen[s.label_id] = k + 1
        if s.isthing and k:
            shade = ((k * 0.37) % 0.4) - 0.2  # deterministic shade in [-0.2, 0.2)
            base = base + (255 - base) * shade if shade > 0 else base * (1 + shade)
        colours[s.id] = base.clip(0, 255).astype(np.uint8)
    return colours


def legend_entries(result: SegmentationResult) -> list[tuple[str, np.ndarray]]:
    """``(class name, colour)`` of every class in ``result``, once each, largest total area first."""
    areas: dict[int, int] = {}
    names: dict[int, str] = {}
    for s in result.segments:
        areas[s.label_id] = areas.get(s.label_id, 0) + s.area
        names[s.label_id] = s.label
    return [(names[c], class_colour(c)) for c in sorted(areas, key=lambda c: (-areas[c], c))]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_colour(background: np.ndarray) -> tuple[int, int, int]:
    """Black on light, white on dark backgrounds (ITU-R BT.601 luma)."""
    luma = 0.299 * float(background[0]) + 0.587 * float(background[1]) + 0.114 * float(background[2])
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _pole_of_inaccessibility(mask: np.ndarray) -> tuple[int, int, float]:
    """``(y, x, radius)``: the pixel of a binary mask farthest from its boundary (the image edge counts as boundary),
    and that distance. Inside the segment even when it is not convex, unlike the centroid."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(y), int(x), float(distance[y, x])


def _draw_labels(picture: Image.Image, result: SegmentationResult, colours: Mapping[int, np.ndarray],
                 font: ImageFont.ImageFont) -> None:
    """Class names in boxes of their segment's colour at each segment's pole of inaccessibility, largest segments
    first; a segment too thin for the text height, or whose box would cover an earlier label, stays unlabelled."""
    draw = ImageDraw.Draw(picture)
    id_map = result.id_map
    height, width = id_map.shape
    bounds = ndimage.find_objects(id_map)
    placed: list[tuple[int, int, int, int]] = []
    for s in sorted(result.segments, key=lambda s: (-s.area, s.id)):
        box_slices = bounds[s.id - 1] if s.id - 1 < len(bounds) else None
        if box_slices is None:
            continue
        y, x, radius = _pole_of_inaccessibility(id_map[box_slices] == s.id)
        y, x = y + box_slices[0].start, x + box_slices[1].start
        text = s.label if s.score is None else f"{s.label} {s.score:.0%}"
        left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor="mm")
        pad = 2
        if radius < (bottom - top) / 2 + pad:
            continue
        # Keep the whole box inside the picture.
        dx = max(0, pad - left) - max(0, right + pad - (width - 1))
        dy = max(0, pad - top) - max(0, bottom + pad - (height - 1))
        box = (left + dx - pad, top + dy - pad, right + dx + pad, bottom + dy + pad)
        if any(box[0] <= b[2] and b[0] <= box[2] and box[1] <= b[3] and b[1] <= box[3] for b in placed):
            continue
        placed.append(box)
        fill = colours[s.id]
        draw.rectangle(box, fill=tuple(int(c) for c in fill), outline=(0, 0, 0))
        draw.text((x + dx, y + dy), text, fill=_text_colour(fill), font=font, anchor="mm")


def draw_legend(entries: Sequence[tuple[str, np.ndarray]], width: int, font: ImageFont.ImageFont) -> Image.Image:
    """A white panel ``width`` pixels wide listing ``(name, colour)`` entries as colour swatches with their names, left
    to right, in as many lines as needed."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_height = max((probe.textbbox((0, 0), name, font=font)[3] for name, _ in entries), default=0)
    row = max(text_height, 8) + 6
    pad = max(4, row // 3)
    swatch = row - 6
    places, x, y = [], pad, pad
    for name, colour in entries:
        item_width = int(swatch + pad + probe.textlength(name, font=font))
        if x > pad and x + item_width > width - pad:
            x, y = pad, y + row
        places.append((x, y, name, colour))
        x += item_width + 3 * pad
    panel = Image.new("RGB", (width, y + row + pad), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for x, y, name, colour in places:
        draw.rectangle((x, y, x + swatch, y + swatch), fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((x + swatch + pad, y + swatch / 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return panel


def overlay(
    image: Image.Image,
    result: SegmentationResult,
    num_classes: int | None = None,
    alpha: float = 0.55,
    outline_width: int | None = None,
    draw_labels: bool = True,
    legend: bool = True,
    font_size: int | None = None,
) -> Image.Image:
    """The image with its segments tinted in their class colours (:func:`class_colour`), white segment borders,
    class names (with scores where known) inside the segments, and a legend of the classes shown below.

    Args:
        image: the segmented image (any PIL mode; converted to RGB).
        result: its segmentation, of the image's size.
        num_classes: not used (colours follow class indices, :func:`class_colour`); accepted so that existing calls
            keep working.
        alpha: opacity of the tint (1 = segment colours only).
        outline_width: border thickness in pixels (default: 1 per 300 pixels of the shorter side, at least 1).
        draw_labels: write class names into the segments.
        legend: append the legend panel below (only when there are segments): the picture is taller than the image.
        font_size: text height of labels and legend in pixels (default: 1/40 of the shorter side, at least 11).
    """
    del num_classes
    rgb = np.asarray(to_rgb(image)).astype(np.float32)
    id_map = result.id_map
    if id_map.shape != rgb.shape[:2]:
        raise ValueError(f"id map {id_map.shape} and image {rgb.shape[:2]} differ in size")
    height, width = id_map.shape
    colours = _segment_colours(result.segments)
    lut = np.zeros((max([int(id_map.max(initial=0)), *colours]) + 1, 3), dtype=np.float32)
    has_colour = np.zeros(len(lut), dtype=bool)
    for seg_id, colour in colours.items():
        lut[seg_id] = colour
        has_colour[seg_id] = True
    coloured = has_colour[id_map]
    blended = rgb.copy()
    blended[coloured] = (1 - alpha) * rgb[coloured] + alpha * lut[id_map[coloured]]

    # Borders where the id changes to the right or below, thickened for large images.
    edge = np.zeros((height, width), dtype=bool)
    edge[:, :-1] |= id_map[:, :-1] != id_map[:, 1:]
    edge[:-1, :] |= id_map[:-1, :] != id_map[1:, :]
    thickness = outline_width or max(1, min(height, width) // 300)
    if thickness > 1:
        edge = ndimage.binary_dilation(edge, np.ones((thickness, thickness), dtype=bool))
    blended[edge] = 255.0
    picture = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))

    font = _font(font_size or max(11, min(height, width) // 40))
    if draw_labels and result.segments:
        _draw_labels(picture, result, colours, font)
    entries = legend_entries(result)
    if legend and entries:
        panel = draw_legend(entries, width, font)
        framed = Image.new("RGB", (width, height + panel.height), (255, 255, 255))
        framed.paste(picture, (0, 0))
        framed.paste(panel, (0, height))
        picture = framed
    return picture


def segment_dicts(result: SegmentationResult) -> list[dict[str, Any]]:
    """Plain dicts of the segments (for logging / JSON)."""
    return [asdict(s) for s in result.segments]
