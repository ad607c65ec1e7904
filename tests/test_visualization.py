"""Overlay pictures: class colours, segment borders, labels inside their segments, the legend."""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.evaluation.visualization import (
    Segment,
    SegmentationResult,
    _finish,
    class_colour,
    legend_entries,
    overlay,
)


def _result(id_map: np.ndarray, segments: list[Segment]) -> SegmentationResult:
    return _finish(id_map, segments)


def _two_regions() -> SegmentationResult:
    id_map = np.zeros((60, 90), dtype=np.int64)
    id_map[10:50, 5:45] = 1
    id_map[10:50, 45:85] = 2
    return _result(id_map, [Segment(1, 0, "person", 0.9, True), Segment(2, 1, "sky", None, False)])


def test_tint_borders_and_void():
    result = _two_regions()
    image = Image.new("RGB", (90, 60), (0, 0, 0))
    picture = np.asarray(overlay(image, result, alpha=1.0, draw_labels=False, legend=False))
    assert picture.shape == (60, 90, 3)
    assert (picture[0:9, 0:4] == 0).all()  # void keeps the image
    assert (picture[30, 20] == class_colour(0)).all() and (picture[30, 60] == class_colour(1)).all()
    # Borders: white where the id changes (segment/segment and segment/void), nowhere inside a segment.
    assert (picture[15:45, 44] == 255).all()
    assert (picture[9, 10:40] == 255).all() and (picture[49, 10:40] == 255).all()
    white = (picture == 255).all(axis=-1)
    assert not white[12:48, 7:43].any() and not white[12:48, 47:83].any()
    # Half-transparent tint: between the image and the class colour.
    half = np.asarray(overlay(Image.new("RGB", (90, 60), (255, 255, 255)), result, alpha=0.5, draw_labels=False,
                              legend=False))
    assert np.allclose(half[30, 20], 0.5 * 255 + 0.5 * class_colour(0).astype(float), atol=1)


def test_colours_are_stable_across_images_and_distinct_for_small_vocabularies():
    # The same class under different segment ids, orders and images gets the same colour.
    first = _two_regions()
    id_map = np.zeros((40, 40), dtype=np.int64)
    id_map[:, :20] = 7
    id_map[:, 20:] = 3
    second = _result(id_map, [Segment(7, 1, "sky", None, False), Segment(3, 2, "grass", None, False)])
    a = np.asarray(overlay(Image.new("RGB", (90, 60)), first, alpha=1.0, draw_labels=False, legend=False))
    b = np.asarray(overlay(Image.new("RGB", (40, 40)), second, alpha=1.0, draw_labels=False, legend=False))
    assert (a[30, 60] == b[20, 10]).all() and (b[20, 10] == class_colour(1)).all()
    assert (b[20, 30] == class_colour(2)).all()
    # The first instance of a thing class has the class colour, the next ones shades of it.
    id_map = np.zeros((20, 60), dtype=np.int64)
    id_map[:, :20], id_map[:, 20:40], id_map[:, 40:] = 1, 2, 3
    people = _result(id_map, [Segment(i, 0, "person", 0.9, True) for i in (1, 2, 3)])
    c = np.asarray(overlay(Image.new("RGB", (60, 20)), people, alpha=1.0, draw_labels=False, legend=False))
    assert (c[10, 10] == class_colour(0)).all()
    assert not (c[10, 30] == class_colour(0)).all() and not (c[10, 50] == c[10, 30]).all()
    # A small vocabulary gets clearly different colours.
    colours = np.stack([class_colour(i) for i in range(8)]).astype(int)
    distances = np.abs(colours[:, None] - colours[None]).sum(-1)
    assert distances[~np.eye(8, dtype=bool)].min() >= 60


def test_legend_lists_exactly_the_classes_shown():
    id_map = np.zeros((120, 160), dtype=np.int64)
    id_map[:, :100] = 1  # grass, the largest
    id_map[20:60, 110:150] = 2  # two persons
    id_map[70:110, 110:150] = 3
    segments = [Segment(1, 3, "grass", None, False), Segment(2, 0, "person", 0.8, True),
                Segment(3, 0, "person", 0.7, True)]
    result = _result(id_map, segments)
    assert [name for name, _ in legend_entries(result)] == ["grass", "person"]
    image = Image.new("RGB", (160, 120), (0, 0, 0))
    picture = overlay(image, result)
    assert picture.width == 160 and picture.height > 120
    panel = np.asarray(picture)[120:].reshape(-1, 3)
    shown = {tuple(c) for c in panel}
    assert tuple(class_colour(3)) in shown and tuple(class_colour(0)) in shown
    assert tuple(class_colour(1)) not in shown and tuple(class_colour(2)) not in shown  # in the vocabulary, not shown
    # Nothing to show: no legend, the picture keeps the image's size.
    empty = _result(np.zeros((120, 160), dtype=np.int64), [])
    assert overlay(image, empty).size == (160, 120)


def test_labels_sit_inside_their_segments_and_small_ones_stay_unlabelled():
    # A U-shaped segment: its centroid lies in the gap between the arms, outside the segment.
    id_map = np.zeros((200, 200), dtype=np.int64)
    id_map[20:180, 20:80] = 1
    id_map[20:180, 120:180] = 1
    id_map[130:180, 20:180] = 1
    id_map[5:9, 190:194] = 2  # too small to hold a label
    segments = [Segment(1, 0, "person", None, True), Segment(2, 1, "sky", None, False)]
    result = _result(id_map, segments)
    ys, xs = np.nonzero(id_map == 1)
    assert id_map[int(ys.mean()), int(xs.mean())] == 0
    image = Image.new("RGB", (200, 200), (0, 0, 0))
    plain = np.asarray(overlay(image, result, alpha=1.0, draw_labels=False, legend=False))
    labelled = np.asarray(overlay(image, result, alpha=1.0, legend=False))
    changed = (plain != labelled).any(axis=-1)
    assert changed.sum() > 50  # a label was written
    assert (id_map[changed] == 1).all()  # entirely inside the U
    assert not changed[:15, 180:].any()  # the tiny segment got none
