"""The miniature world: a generated panoptic dataset whose classes a tiny CLIP can learn on a CPU.

Design decisions (and why):

* **Classes are defined by colour and pattern, never by shape.** Measured on this hardware (``DESIGN.md``), a
  ConvNeXt-Atto CLIP trained contrastively for minutes learns colours and textures but not shapes. So every thing
  class is one (pattern, colour, colour) combination - solid, stripes, dots, checks or rings - with a real-world name
  that fits it (a zebra is black/white stripes, a ladybug red with black dots, a lemon solid yellow), and every stuff
  class a texture (sky gradient, grass noise, water waves, sand speckle, brick wall, asphalt). Shapes (ellipse,
  rotated rectangle, wobbly blob), sizes and pattern orientations are random per instance, so they carry no class
  information. No two classes share an appearance; several share one of their two cues (ladybug / strawberry: red
  with dots of another colour; tiger / bee / zebra: stripes), so recognising a class means combining cues.
* **A long tail.** Thing classes are drawn with Zipf-like probabilities ``p_k ∝ 1 / k**zipf_exponent`` over the
  taxonomy's order (``THING_CLASSES`` is listed from the most to the least frequent). With the defaults a 1/32
  labeled subset (~62 images) sees the head classes hundreds of times and the rarest ones about once or never, while
  the tiny CLIP's caption stream draws every class equally often: the regime in which the paper says CLIP ensembling
  pays off. The measured table is written with every world (``class_frequencies.md``).
* **Instances that panoptic segmentation can separate.** Every thing has a dark outline and its own shading and
  colour jitter, so touching instances of one class (a quarter of the instances come in groups of the same class,
  placed against each other) still show their boundary. Objects occlude each other in painting order; each
  segment is the *visible* part, and instances whose visible part is a small remnant (below ``min_visible_area``
  pixels or ``min_visible_fraction`` of the whole object) are removed and the image is re-rendered without them, so
  the ground truth has no void and no unlearnable crumbs.
* **Small images, learnable in minutes.** 256x256 by default (``image_size`` scales every length: object sizes,
  pattern periods, outlines), 3-8 things per image with diameters between 30 and 110 px (at 256), so that most
  things cover a cell centre of the CLIP's 8x8 stride-32 feature grid (measured: 86% of the thing masks; the others
  vanish when DEARLi resizes masks to that grid, and mask pooling cannot classify them).
* **Deterministic streams.** Image ``i`` of a split is drawn from ``numpy.random.SeedSequence([world_seed, stream,
  i])`` with its own stream tag (:data:`STREAMS`); the tiny CLIP's caption stream and its evaluation probe use other
  tags, so CLIP never sees a panoptic image. A world is the same bytes for the same seed and settings.
* **COCO panoptic format**, loaded by ``training.data.panoptic_datasets.load_coco_panoptic`` like COCO itself:
  ``images/{train,val}/*.jpg``, ``panoptic/{train,val}/*.png`` (RGB-encoded ids), ``annotations/panoptic_{train,
  val}.json`` with ``categories`` (``id``, ``name``, ``isthing``, ``color``), plus ``class_names.txt``
  (``id:name,synonym,...``, the format of the shipped COCO / ADE20K class-name files).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSES",
    "STREAMS",
    "STUFF_CLASSES",
    "THING_CLASSES",
    "ClassSpec",
    "Instance",
    "Scene",
    "WorldSettings",
    "class_frequencies",
    "class_names_lines",
    "generate_world",
    "generate_world_dataset",
    "labeled_indices",
    "render_scene",
    "sample_scene",
    "scene_rng",
    "thing_probabilities",
    "world_paths",
]

# Seed-stream tags: SeedSequence([seed, tag, index...]). The panoptic splits and the tiny CLIP's streams never meet.
STREAMS = {"train": 0, "val": 1, "clip_pretrain": 2, "clip_eval": 3, "clip_regions": 4}
BASE_SIZE = 256  # the scale at which every length below is given

# Colours (RGB). Names are used in captions as attributes.
RED, YELLOW, GREEN, BLUE = (215, 35, 35), (245, 215, 35), (55, 175, 55), (40, 80, 215)
ORANGE, PURPLE, PINK, WHITE = (245, 130, 25), (135, 50, 180), (245, 135, 195), (240, 240, 240)
BLACK, BROWN, DARK_GREEN = (25, 25, 25), (120, 70, 30), (25, 100, 40)


@dataclass(frozen=True)
class ClassSpec:
    """One class: id, names (first = primary), thing flag, appearance and the attribute words captions use."""

    category_id: int
    names: tuple[str, ...]
    isthing: bool
    pattern: str  # things: solid | stripes | dots | checks | rings; stuff: sky | grass | water | sand | brick | road
    colors: tuple[tuple[int, int, int], ...]
    attributes: tuple[str, ...]  # e.g. ("black and white", "striped")

    @property
    def name(self) -> str:
        return self.names[0]


def _thing(cid: int, names: str, pattern: str, colors: Sequence[tuple[int, int, int]], *attrs: str) -> ClassSpec:
    return ClassSpec(cid, tuple(n.strip() for n in names.split(",")), True, pattern, tuple(colors), attrs)


def _stuff(cid: int, names: str, pattern: str, color: tuple[int, int, int], *attrs: str) -> ClassSpec:
    return ClassSpec(cid, tuple(n.strip() for n in names.split(",")), False, pattern, (color,), attrs)


# Listed from the most to the least frequent (Zipf rank = position). Head: plain solids and the most distinct
# patterns; tail: the combinations that share a cue with a head class (strawberry vs tomato/ladybug, ...).
THING_CLASSES: tuple[ClassSpec, ...] = (
    _thing(1, "tomato,tomatoes", "solid", [RED], "red", "round"),
    _thing(2, "zebra,zebras", "stripes", [WHITE, BLACK], "black and white", "striped"),
    _thing(3, "lemon,lemons", "solid", [YELLOW], "yellow"),
    _thing(4, "ladybug,ladybird,beetle", "dots", [RED, BLACK], "red", "spotted", "with black dots"),
    _thing(5, "chessboard,chess board,checkerboard", "checks", [WHITE, BLACK], "black and white", "checkered"),
    _thing(6, "lime,limes", "solid", [GREEN], "green"),
    _thing(7, "tiger,tigers", "stripes", [ORANGE, BLACK], "orange and black", "striped"),
    _thing(8, "blueberry,blueberries", "solid", [BLUE], "blue"),
    _thing(9, "dalmatian,spotted dog", "dots", [WHITE, BLACK], "white", "spotted", "with black spots"),
    _thing(10, "target,bullseye,dartboard", "rings", [RED, WHITE], "red and white", "ringed"),
    _thing(11, "pumpkin,pumpkins", "solid", [ORANGE], "orange"),
    _thing(12, "bee,bumblebee,wasp", "stripes", [YELLOW, BLACK], "yellow and black", "striped"),
    _thing(13, "tablecloth,picnic blanket", "checks", [WHITE, RED], "red and white", "checkered"),
    _thing(14, "plum,plums", "solid", [PURPLE], "purple"),
    _thing(15, "frog,toad", "dots", [GREEN, BLACK], "green", "spotted", "with black dots"),
    _thing(16, "candy cane,peppermint stick", "stripes", [WHITE, RED], "red and white", "striped"),
    _thing(17, "flamingo,flamingos", "solid", [PINK], "pink"),
    _thing(18, "onion,red onion", "rings", [PURPLE, WHITE], "purple and white", "ringed"),
    _thing(19, "quilt,patchwork", "checks", [BLUE, YELLOW], "blue and yellow", "checkered"),
    _thing(20, "egg,eggs", "solid", [WHITE], "white"),
    _thing(21, "strawberry,strawberries", "dots", [RED, YELLOW], "red", "spotted", "with yellow seeds"),
    _thing(22, "watermelon,melon", "stripes", [GREEN, DARK_GREEN], "green", "striped"),
    _thing(23, "lollipop,candy", "rings", [PINK, WHITE], "pink and white", "swirled"),
    _thing(24, "giraffe,giraffes", "dots", [YELLOW, BROWN], "yellow and brown", "spotted", "with brown patches"),
)

STUFF_CLASSES: tuple[ClassSpec, ...] = (
    _stuff(25, "sky,clear sky", "sky", (110, 165, 235), "blue"),
    _stuff(26, "grass,lawn,meadow", "grass", (70, 145, 55), "green"),
    _stuff(27, "water,sea,lake", "water", (35, 100, 175), "blue", "wavy"),
    _stuff(28, "sand,beach,desert", "sand", (215, 190, 140), "sandy"),
    _stuff(29, "wall,brick wall", "brick", (165, 75, 55), "brick"),
    _stuff(30, "road,asphalt,pavement", "road", (95, 95, 100), "grey"),
)

CLASSES: tuple[ClassSpec, ...] = THING_CLASSES + STUFF_CLASSES
_BY_ID = {c.category_id: c for c in CLASSES}
TOP_STUFF = {25: 0.7, 29: 0.3}  # what fills the upper part of a scene, with probabilities
GROUND_STUFF = {26: 0.4, 28: 0.25, 27: 0.2, 30: 0.15}  # what fills the lower part
SHAPES = ("ellipse", "rectangle", "blob")


@dataclass
class WorldSettings:
    """Everything that defines a world besides its seed (recorded in ``world.json``).

    Args:
        image_size: Side of the square images; every length scales with ``image_size / 256``.
        num_things: Inclusive range of things placed per image (before removing hidden remnants).
        thing_diameter: Range of thing diameters in pixels at 256 (drawn log-uniformly).
        zipf_exponent: Long-tail exponent of the thing-class frequencies.
        group_probability: Chance that a thing is placed against the previous one and copies its class.
        min_visible_area: Things whose visible part is smaller (pixels at 256) are removed.
        min_visible_fraction: Things showing less than this fraction of themselves are removed.
        noise_std: Standard deviation of the per-pixel sensor noise (0-255 scale).
        jpeg_quality: Quality of the written JPEG images.
    """

    image_size: int = 256
    num_things: tuple[int, int] = (3, 8)
    thing_diameter: tuple[float, float] = (30.0, 110.0)
    zipf_exponent: float = 1.3
    group_probability: float = 0.25
    min_visible_area: float = 200.0
    min_visible_fraction: float = 0.3
    noise_std: float = 4.0
    jpeg_quality: int = 92


@dataclass
class Instance:
    """One thing to paint: class, centre, radius, shape and the pattern's random placement."""

    category_id: int
    center: tuple[float, float]  # (x, y) in pixels
    radius: float
    shape: str
    aspect: float
    angle: float
    pattern_angle: float
    pattern_phase: tuple[float, float]
    pattern_scale: float
    brightness: float
    color_jitter: tuple[float, float, float]
    wobble: tuple[float, ...] = ()  # blob: amplitudes and phases of the radius harmonics


@dataclass
class Scene:
    """A scene to render: size, stuff layout and things in painting order."""

    size: int
    stuff: list[int]  # category ids, top to bottom
    boundaries: list[tuple[float, float, float, float]]  # per boundary: (y at 0..1, amplitude, wavelength, phase)
    things: list[Instance] = field(default_factory=list)
    vertical_split: bool = False  # ground split left/right instead of in bands
    scale: float | None = None  # pixels per pixel of the 256 world (default: size / 256)

    @property
    def pixel_scale(self) -> float:
        return self.scale if self.scale is not None else self.size / BASE_SIZE


def thing_probabilities(zipf_exponent: float = 1.3) -> np.ndarray:
    """Frequency of each thing class (in ``THING_CLASSES`` order): ``p_k ∝ k**-zipf_exponent``."""
    ranks = np.arange(1, len(THING_CLASSES) + 1, dtype=np.float64)
    p = ranks ** -float(zipf_exponent)
    return p / p.sum()


def scene_rng(seed: int, stream: str | int, *index: int) -> np.random.Generator:
    """The generator of one image of a stream (:data:`STREAMS`), independent of every other image."""
    tag = STREAMS[stream] if isinstance(stream, str) else int(stream)
    return np.random.default_rng(np.random.SeedSequence([int(seed), tag, *map(int, index)]))


def class_names_lines() -> list[str]:
    """The class-name file: ``0:invalid_class_id`` then ``id:name,synonym,...`` per category id."""
    return ["0:invalid_class_id"] + [f"{c.category_id}:{','.join(c.names)}" for c in CLASSES]


def categories() -> list[dict[str, Any]]:
    """COCO panoptic categories (``id``, ``name``, ``supercategory``, ``isthing``, ``color``)."""
    return [
        {"id": c.category_id, "name": c.name, "supercategory": "thing" if c.isthing else "stuff",
         "isthing": int(c.isthing), "color": list(c.colors[0])}
        for c in CLASSES
    ]


# --------------------------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, weights: dict[int, float], exclude: Sequence[int] = ()) -> int:
    keys = [k for k in weights if k not in exclude]
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return int(keys[rng.choice(len(keys), p=p / p.sum())])


def sample_stuff(rng: np.random.Generator, size: int, scale: float | None = None) -> Scene:
    """The stuff layout: a top region (sky or wall) above one or two ground regions, or ground only (1 in 5)."""
    stuff: list[int] = []
    if rng.random() >= 0.2:
        stuff.append(_pick(rng, TOP_STUFF))
    ground = _pick(rng, GROUND_STUFF)
    stuff.append(ground)
    if rng.random() < 0.5 or len(stuff) == 1:
        stuff.append(_pick(rng, GROUND_STUFF, exclude=[ground]))
    n_bounds = len(stuff) - 1
    vertical = len(stuff) == 2 and stuff[0] in GROUND_STUFF  # ground only: split left / right
    levels = np.sort(rng.uniform(0.3, 0.7, n_bounds)) if n_bounds == 1 else np.array(
        [rng.uniform(0.25, 0.45), rng.uniform(0.6, 0.8)])
    boundaries = [
        (float(y), float(rng.uniform(0.01, 0.06)), float(rng.uniform(0.4, 1.5)), float(rng.uniform(0, 2 * np.pi)))
        for y in levels
    ]
    return Scene(size=size, stuff=stuff, boundaries=boundaries, vertical_split=vertical, scale=scale)


def sample_instance(
    rng: np.random.Generator,
    category_id: int,
    size: int,
    diameter: tuple[float, float] = (30.0, 110.0),
    center: tuple[float, float] | None = None,
    scale: float | None = None,
) -> Instance:
    """A thing of class ``category_id`` with random shape, size (``diameter`` at 256, times ``scale``, default
    ``size / 256``), placement in a ``size`` canvas and pattern orientation."""
    s = size / BASE_SIZE if scale is None else scale
    d = math.exp(rng.uniform(math.log(diameter[0]), math.log(diameter[1]))) * s
    if center is None:
        center = (float(rng.uniform(0, size)), float(rng.uniform(0, size)))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    wobble = tuple(float(x) for x in np.concatenate([rng.uniform(0, 0.13, 3), rng.uniform(0, 2 * np.pi, 3)]))
    return Instance(
        category_id=int(category_id),
        center=(float(center[0]), float(center[1])),
        radius=d / 2,
        shape=shape,
        aspect=float(rng.uniform(0.55, 1.0)),
        angle=float(rng.uniform(0, np.pi)),
        pattern_angle=float(rng.uniform(0, np.pi)),
        pattern_phase=(float(rng.uniform(0, 1)), float(rng.uniform(0, 1))),
        pattern_scale=float(rng.uniform(0.85, 1.15)),
        brightness=float(rng.uniform(0.85, 1.1)),
        color_jitter=tuple(float(x) for x in rng.normal(0, 8, 3)),
        wobble=wobble,
    )


def sample_scene(
    rng: np.random.Generator,
    settings: WorldSettings | None = None,
    class_probabilities: np.ndarray | None = None,
    size: int | None = None,
    scale: float | None = None,
) -> Scene:
    """A random scene: stuff layout plus 3-8 things (classes from ``class_probabilities``, default the long tail)."""
    settings = settings or WorldSettings()
    size = size or settings.image_size
    p = thing_probabilities(settings.zipf_exponent) if class_probabilities is None else class_probabilities
    scene = sample_stuff(rng, size, scale)
    n = int(rng.integers(settings.num_things[0], settings.num_things[1] + 1))
    for _ in range(n):
        previous = scene.things[-1] if scene.things else None
        if previous is not None and rng.random() < settings.group_probability:
            # A neighbour of the same class, touching or overlapping the previous one.
            inst = sample_instance(rng, previous.category_id, size, settings.thing_diameter, scale=scale)
            direction = rng.uniform(0, 2 * np.pi)
            dist = (previous.radius + inst.radius) * rng.uniform(0.6, 0.95)
            inst.center = (previous.center[0] + dist * math.cos(direction),
                           previous.center[1] + dist * math.sin(direction))
        else:
            cid = THING_CLASSES[int(rng.choice(len(THING_CLASSES), p=p))].category_id
            inst = sample_instance(rng, cid, size, settings.thing_diameter, scale=scale)
        scene.things.append(inst)
    return scene


# --------------------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [-1, 1]: random values on a grid of ``cell`` pixels, bilinearly upsampled."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.uniform(-1, 1, (gh, gw))
    ys, xs = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def stuff_texture(rng: np.random.Generator, spec: ClassSpec, h: int, w: int, scale: float = 1.0) -> np.ndarray:
    """(h, w, 3) float texture of a stuff class."""
    base = np.array(spec.colors[0], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def cell(n: float) -> int:
        return max(1, round(n * scale))

    if spec.pattern == "sky":  # vertical gradient, lighter towards the horizon, faint clouds
        t = (yy / max(h - 1, 1))[..., None]
        img = base * (1 - t) + np.array([200, 225, 250], np.float32) * t
        clouds = np.clip(_smooth_noise(rng, h, w, cell(40)), 0.3, 1.0) - 0.3
        img = img + clouds[..., None] * 60
    elif spec.pattern == "grass":  # green with fine and medium noise
        n = 0.6 * rng.uniform(-1, 1, (h, w)) + 0.4 * _smooth_noise(rng, h, w, cell(6))
        img = base * (1 + 0.35 * n[..., None])
    elif spec.pattern == "water":  # blue with light, wavy horizontal crests
        period, wavelength = 9.0 * scale, 40.0 * scale
        phase = rng.uniform(0, 2 * np.pi, 2)
        wave = np.sin(2 * np.pi * (yy / period + 0.35 * np.sin(2 * np.pi * xx / wavelength + phase[0])) + phase[1])
        crest = np.clip((wave - 0.6) / 0.4, 0, 1)[..., None]
        img = base * (1 - crest) + np.array([150, 200, 240], np.float32) * crest
    elif spec.pattern == "sand":  # tan with sparse dark and light specks
        speck = rng.random((h, w))
        shade = 1 + 0.05 * _smooth_noise(rng, h, w, cell(10))
        img = np.repeat(base[None, None], h, 0).repeat(w, 1) * shade[..., None]
        img[speck < 0.08] *= 0.7
        img[speck > 0.94] = img[speck > 0.94] * 0.4 + 255 * 0.6
    elif spec.pattern == "brick":  # staggered bricks with light mortar
        bh, bw = 9.0 * scale, 20.0 * scale
        off = rng.uniform(0, bw, 2)
        row = np.floor((yy + off[0]) / bh)
        xs = xx + off[1] + (row % 2) * bw / 2
        col = np.floor(xs / bw)
        brick_id = (row * 1009 + col).astype(np.int64)
        shade = 1 + 0.12 * np.sin(brick_id * 12.9898 + rng.uniform(0, 100)) * np.cos(brick_id * 4.1414)
        mortar = (((yy + off[0]) % bh) < 1.6 * scale) | ((xs % bw) < 1.6 * scale)
        img = base * shade[..., None]
        img[mortar] = (205, 195, 185)
    elif spec.pattern == "road":  # dark grey asphalt grain
        n = 0.7 * rng.uniform(-1, 1, (h, w)) + 0.3 * _smooth_noise(rng, h, w, cell(4))
        img = base * (1 + 0.18 * n[..., None])
    else:
        raise ValueError(f"unknown stuff pattern {spec.pattern!r}")
    return img


def _stuff_label_map(scene: Scene) -> np.ndarray:
    """(size, size) index into ``scene.stuff`` per pixel."""
    h = w = scene.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    region = np.zeros((h, w), dtype=np.int64)
    for level, amp, wavelength, phase in scene.boundaries:
        if scene.vertical_split:
            edge = (level + amp * np.sin(2 * np.pi * yy / (wavelength * h) + phase)) * w
            region += xx >= edge
        else:
            edge = (level + amp * np.sin(2 * np.pi * xx / (wavelength * w) + phase)) * h
            region += yy >= edge
    return region


def _instance_patch(inst: Instance, size: int, s: float) -> tuple[tuple[int, int, int, int], np.ndarray,
                                                                np.ndarray] | None:
    """(bbox y0, y1, x0, x1), boolean mask and float RGB texture (with outline and shading) of a thing in a ``size``
    canvas at pixel scale ``s``."""
    spec = _BY_ID[inst.category_id]
    r = inst.radius
    cx, cy = inst.center
    y0, y1 = max(0, math.floor(cy - r - 1)), min(size, math.ceil(cy + r + 2))
    x0, x1 = max(0, math.floor(cx - r - 1)), min(size, math.ceil(cx + r + 2))
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    ca, sa = math.cos(inst.angle), math.sin(inst.angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    if inst.shape == "ellipse":
        a, b = r, r * inst.aspect
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the boundary
    elif inst.shape == "rectangle":
        a = r * 0.85
        b = a * inst.aspect
        rho = np.maximum(np.abs(u) / a, np.abs(v) / b)
    else:  # blob: radius modulated by three harmonics
        amps, phases = inst.wobble[:3], inst.wobble[3:]
        theta = np.arctan2(v, u)
        radius = r * (1 - sum(amps) / 2 + sum(a_ * np.cos((k + 2) * theta + p_) for k, (a_, p_) in
                                                enumerate(zip(amps, phases))))
        rho = np.sqrt(u**2 + v**2) / radius
    mask = rho <= 1.0
    if not mask.any():
        return None

    # pattern in its own rotated frame
    period = 9.0 * s * inst.pattern_scale
    cp, sp = math.cos(inst.pattern_angle), math.sin(inst.pattern_angle)
    p_, q_ = dx * cp + dy * sp, -dx * sp + dy * cp
    ph0, ph1 = inst.pattern_phase
    c1 = np.array(spec.colors[0], np.float32)
    c2 = np.array(spec.colors[-1], np.float32)
    if spec.pattern == "solid":
        second = np.zeros(mask.shape, bool)
    elif spec.pattern == "stripes":
        second = ((p_ / period + ph0) % 1.0) >= 0.5
    elif spec.pattern == "dots":
        spacing = 11.0 * s * inst.pattern_scale
        radius_dot = (3.6 if spec.category_id == 24 else 2.8) * s * inst.pattern_scale
        du = ((p_ / spacing + ph0) % 1.0 - 0.5) * spacing
        dv = ((q_ / spacing + ph1) % 1.0 - 0.5) * spacing
        second = du**2 + dv**2 <= radius_dot**2
    elif spec.pattern == "checks":
        cell = 0.75 * period
        second = ((np.floor(p_ / cell + ph0) + np.floor(q_ / cell + ph1)) % 2) == 1
    elif spec.pattern == "rings":
        second = ((np.sqrt(dx**2 + dy**2) / period + ph0) % 1.0) >= 0.5
    else:
        raise ValueError(f"unknown thing pattern {spec.pattern!r}")
    tex = np.where(second[..., None], c2, c1) + np.array(inst.color_jitter, np.float32)
    # per-instance shading: brightness and a soft light from the upper left
    light = 1.0 - 0.18 * np.clip(rho, 0, 1) ** 2 + 0.06 * np.clip((-dx - dy) / (r * 1.5), -1, 1)
    tex = tex * (inst.brightness * light)[..., None]
    # dark outline: the outer band of the shape
    outline = rho > 1.0 - 2.0 * s / max(r * min(1.0, inst.aspect if inst.shape != "blob" else 0.8), 1.0)
    tex[outline] *= 0.3
    return (y0, y1, x0, x1), mask, tex


def render_scene(
    scene: Scene,
    rng: np.random.Generator,
    settings: WorldSettings | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Paint a scene -> (uint8 image (H, W, 3), int32 segment-id map, segments).

    Segments are ``{"id", "category_id", "area", "bbox", "iscrowd", "isthing"}``; stuff segment ids are
    ``category_id * 1000``, things ``category_id * 1000 + k``. Things whose visible part is a small remnant are
    removed (and not painted); ``scene.things`` is updated to the kept ones.
    """
    settings = settings or WorldSettings()
    size, scale = scene.size, scene.pixel_scale
    s2 = scale**2
    region = _stuff_label_map(scene)
    image = np.zeros((size, size, 3), np.float32)
    ids = np.zeros((size, size), np.int32)
    for k, cid in enumerate(scene.stuff):
        sel = region == k
        if sel.any():
            image[sel] = stuff_texture(rng, _BY_ID[cid], size, size, scale)[sel]
            ids[sel] = cid * 1000

    patches = [_instance_patch(inst, size, scale) for inst in scene.things]
    kept = [i for i, p in enumerate(patches) if p is not None]
    while True:  # drop hidden remnants; removing one only uncovers others, so this ends after few passes
        owner = np.full((size, size), -1, np.int32)
        for i in kept:
            (y0, y1, x0, x1), mask, _ = patches[i]
            owner[y0:y1, x0:x1][mask] = i
        areas = np.bincount(owner[owner >= 0], minlength=len(patches))
        drop = [i for i in kept if areas[i] < settings.min_visible_area * s2
                or areas[i] < settings.min_visible_fraction * patches[i][1].sum()]
        if not drop:
            break
        kept = [i for i in kept if i not in drop]
    counters: dict[int, int] = {}
    things = []
    for i in kept:
        (y0, y1, x0, x1), mask, tex = patches[i]
        inst = scene.things[i]
        vis = owner[y0:y1, x0:x1] == i
        image[y0:y1, x0:x1][vis] = tex[vis]
        counters[inst.category_id] = counters.get(inst.category_id, 0) + 1
        ids[y0:y1, x0:x1][vis] = inst.category_id * 1000 + counters[inst.category_id]
        things.append(inst)
    scene.things = things

    if settings.noise_std > 0:
        image += rng.normal(0, settings.noise_std, image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, ids, segments_of(ids)


def segments_of(ids: np.ndarray) -> list[dict[str, Any]]:
    """COCO ``segments_info`` of a segment-id map whose ids encode the class (``category_id * 1000 + k``)."""
    segments = []
    for sid in np.unique(ids).tolist():
        if sid == 0:
            continue
        ys, xs = np.nonzero(ids == sid)
        cid = sid // 1000
        segments.append({
            "id": int(sid), "category_id": int(cid), "iscrowd": 0, "isthing": int(_BY_ID[cid].isthing),
            "area": len(ys),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
        })
    return segments


def render_world_image(
    world_seed: int, split: str, index: int, settings: WorldSettings | None = None
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Image ``index`` of a split of the world with seed ``world_seed`` (the same every time)."""
    settings = settings or WorldSettings()
    rng = scene_rng(world_seed, split, index)
    scene = sample_scene(rng, settings)
    return render_scene(scene, rng, settings)


# --------------------------------------------------------------------------------------------------------------------
# writing a world
# --------------------------------------------------------------------------------------------------------------------
def world_paths(output_dir: str | os.PathLike[str], split: str) -> dict[str, Path]:
    """Where a split lives: ``images``, ``panoptic`` folders and the ``annotations`` JSON; plus ``class_names``."""
    root = Path(output_dir)
    return {
        "images": root / "images" / split,
        "panoptic": root / "panoptic" / split,
        "annotations": root / "annotations" / f"panoptic_{split}.json",
        "class_names": root / "class_names.txt",
    }


def _write_image(output_dir: Path, split: str, index: int, world_seed: int, settings: WorldSettings
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Render image ``index`` of a split, write its JPEG and panoptic PNG; its COCO image and annotation entries."""
    from PIL import Image

    from modeling_dearli.image_processing_dearli import id_to_rgb

    paths = world_paths(output_dir, split)
    image, ids, segments = render_world_image(world_seed, split, index, settings)
    stem = f"{split}_{index:06d}"
    Image.fromarray(image).save(paths["images"] / f"{stem}.jpg", quality=settings.jpeg_quality)
    Image.fromarray(id_to_rgb(ids)).save(paths["panoptic"] / f"{stem}.png")
    return ({"id": index, "file_name": f"{stem}.jpg", "width": image.shape[1], "height": image.shape[0]},
            {"image_id": index, "file_name": f"{stem}.png",
             "segments_info": [{k: v for k, v in s.items() if k != "isthing"} for s in segments]})


def _logged(items: Any, total: int, what: str, times: int = 10) -> Any:
    """`items`, with a log line at every tenth (``times``) of `total`: progress where no bar is shown."""
    start = time.perf_counter()
    marks = {max(1, round(total * k / times)) for k in range(1, times + 1)}
    for done, item in enumerate(items, 1):
        yield item
        if done in marks:
            logger.info("%s: %d of %d images (%.0f s)", what, done, total, time.perf_counter() - start)


def _write_split(output_dir: Path, split: str, num_images: int, world_seed: int, settings: WorldSettings,
                 progress: bool, num_workers: int = 1) -> dict[str, Any]:
    paths = world_paths(output_dir, split)
    paths["images"].mkdir(parents=True, exist_ok=True)
    paths["panoptic"].mkdir(parents=True, exist_ok=True)
    paths["annotations"].parent.mkdir(parents=True, exist_ok=True)
    write = functools.partial(_write_image, output_dir, split, world_seed=world_seed, settings=settings)
    if num_workers > 1:  # every image is a pure function of (seed, split, index): the same files in any order
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(num_workers)
        entries: Any = pool.map(write, range(num_images), chunksize=max(1, num_images // (8 * num_workers)))
    else:
        pool, entries = None, map(write, range(num_images))
    if progress:
        from tqdm.auto import tqdm

        entries = tqdm(entries, total=num_images, desc=f"world {split}", unit="img")
    else:
        entries = _logged(entries, num_images, f"world: {split} split")
    try:
        images, annotations = (list(column) for column in zip(*entries)) if num_images else ([], [])
    finally:
        if pool is not None:
            pool.shutdown()
    data = {
        "info": {"description": f"DEARLi miniature world, seed {world_seed}, split {split}"},
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }
    paths["annotations"].write_text(json.dumps(data))
    return data


def labeled_indices(num_images: int, fraction: float, seed: int) -> list[int]:
    """Indices of the labeled subset that ``split_labeled_unlabeled(ds, fraction=..., seed=...)`` draws from a
    dataset of ``num_images`` rows in annotation order (the same draw, without loading the dataset)."""
    n = max(1, round(fraction * num_images))
    return sorted(random.Random(seed).sample(range(num_images), n))


def class_frequencies(annotations: dict[str, Any], indices: Sequence[int] | None = None) -> dict[int, dict[str, int]]:
    """Per category id: ``instances`` (segments) and ``images`` containing it, over ``indices`` (default: all)."""
    anns = annotations["annotations"]
    chosen = range(len(anns)) if indices is None else indices
    out = {c.category_id: {"instances": 0, "images": 0} for c in CLASSES}
    for i in chosen:
        seen = set()
        for s in anns[i]["segments_info"]:
            out[s["category_id"]]["instances"] += 1
            seen.add(s["category_id"])
        for cid in seen:
            out[cid]["images"] += 1
    return out


def frequency_table(train: dict[str, Any], val: dict[str, Any], fractions: Sequence[float],
                    split_seed: int) -> dict[str, Any]:
    """Class frequencies of the training and validation splits and of labeled subsets of the training split."""
    n = len(train["annotations"])
    columns: dict[str, Any] = {"train": class_frequencies(train), "val": class_frequencies(val)}
    subsets = {}
    for f in fractions:
        idx = labeled_indices(n, f, split_seed)
        name = f"labeled_1/{round(1 / f)}" if abs(1 / f - round(1 / f)) < 1e-6 else f"labeled_{f:g}"
        columns[name] = class_frequencies(train, idx)
        subsets[name] = {"fraction": f, "seed": split_seed, "num_images": len(idx)}
    return {"columns": columns, "subsets": subsets}


def frequency_markdown(table: dict[str, Any]) -> str:
    """A markdown table: per class, instances (images) per column."""
    cols = list(table["columns"])
    lines = ["| id | class | kind | " + " | ".join(f"{c} inst. (img.)" for c in cols) + " |",
             "|---:|---|---|" + "---:|" * len(cols)]
    for c in CLASSES:
        cells = [f"{table['columns'][k][c.category_id]['instances']} ({table['columns'][k][c.category_id]['images']})"
                 for k in cols]
        kind = "thing" if c.isthing else "stuff"
        lines.append(f"| {c.category_id} | {c.name} | {kind} | " + " | ".join(cells) + " |")
    subsets = ", ".join(f"{k}: {v['num_images']} images (seed {v['seed']})" for k, v in table["subsets"].items())
    return "\n".join(lines) + f"\n\nLabeled subsets as drawn by `--labeled_fraction` with `--seed`: {subsets}.\n"


def _world_config(world_seed: int, num_train: int, num_val: int, settings: WorldSettings) -> dict[str, Any]:
    """What ``world.json`` records as a world's ``config`` (a finished world with the same config is reused)."""
    return {"world_seed": int(world_seed), "num_train": int(num_train), "num_val": int(num_val),
            "settings": asdict(settings)}


def generate_world(
    output_dir: str | os.PathLike[str],
    world_seed: int = 0,
    num_train: int = 2000,
    num_val: int = 200,
    settings: WorldSettings | None = None,
    labeled_fractions: Sequence[float] = (1 / 32, 1 / 8),
    split_seed: int = 0,
    progress: bool = True,
    num_workers: int = 1,
) -> dict[str, Any]:
    """Write a world (module docstring) to ``output_dir``; refuses a folder that already holds a different world.
    ``num_workers`` processes render the images (the files do not depend on it).

    Returns the record also written to ``world.json`` (settings, counts, seconds, frequency table).
    """
    settings = settings or WorldSettings()
    output_dir = Path(output_dir)
    record_path = output_dir / "world.json"
    config = _world_config(world_seed, num_train, num_val, settings)
    if record_path.is_file():
        old = json.loads(record_path.read_text())
        if old.get("config") == json.loads(json.dumps(config)):
            return old
        raise FileExistsError(f"{output_dir} already holds a different world ({record_path}); use another folder")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty and holds no world.json; use an empty or new folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info("world: generating %d training and %d validation images in %s (seed %d)", num_train, num_val,
                output_dir, world_seed)
    train = _write_split(output_dir, "train", num_train, world_seed, settings, progress, num_workers)
    val = _write_split(output_dir, "val", num_val, world_seed, settings, progress, num_workers)
    seconds = time.perf_counter() - start
    world_paths(output_dir, "train")["class_names"].write_text("\n".join(class_names_lines()) + "\n")
    table = frequency_table(train, val, labeled_fractions, split_seed)
    (output_dir / "class_frequencies.md").write_text(frequency_markdown(table))
    record = {"config": config, "seconds": round(seconds, 2), "num_classes": len(CLASSES),
              "thing_probabilities": thing_probabilities(settings.zipf_exponent).round(5).tolist(),
              "frequencies": table}
    # world.json last: its presence marks a complete world
    record_path.write_text(json.dumps(record, indent=1))
    return json.loads(record_path.read_text())


WORLD_CARD = """# The miniature world

A generated panoptic segmentation dataset (the DEARLi project's miniature world, `world_seed` {world_seed}):
{num_train} training and {num_val} validation images of {image_size}x{image_size} px, {num_classes} classes
({num_things} things with a long-tailed frequency, {num_stuff} stuff textures), defined by colour and pattern.

## Columns

- `image`: the image (JPEG).
- `panoptic`: the panoptic PNG, segment ids RGB-encoded as in COCO panoptic (`id = R + 256 G + 256^2 B`).
- `segments_info`: the segments of the PNG, `{{id, category_id, iscrowd, area, bbox}}` (COCO panoptic).
- `image_id`, `file_name`: as in the COCO annotation files.

The classes, with synonyms and the thing/stuff split, are in `categories.json` (COCO categories; a name lists its
synonyms comma-separated). `world.json` records the settings; `class_frequencies.md` the per-class counts.

## Training on it

From a clone of the DEARLi project, on the tiny CLIP that ships with it:

    python training/supervised.py --config miniature_supervised --dataset_name <this folder or Hub id> \\
        --clip_model_name training/miniature/assets/tiny_clip_config.json \\
        --clip_pretrained training/miniature/assets/tiny_clip.safetensors --max_train_steps 600 --output_dir out
"""


def generate_world_dataset(
    output_dir: str | os.PathLike[str],
    world_seed: int = 0,
    num_train: int = 2000,
    num_val: int = 200,
    settings: WorldSettings | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The world of :func:`generate_world` (same arguments, same images and annotations) written as a 🤗 dataset
    folder (``training.data.hub_datasets.write_dataset_folder``: parquet shards of the splits ``train`` and
    ``validation``, ``categories.json``, a dataset card), with ``world.json`` and ``class_frequencies.md``. Rerunning
    with the same settings on a finished folder does nothing; a folder holding anything else is refused."""
    import shutil
    import tempfile

    from training.data.class_names import read_class_names
    from training.data.hub_datasets import write_dataset_folder
    from training.data.panoptic_datasets import load_coco_panoptic

    output_dir = Path(output_dir)
    record_path = output_dir / "world.json"
    if record_path.is_file():
        old = json.loads(record_path.read_text())
        config = {**_world_config(world_seed, num_train, num_val, settings or WorldSettings()), "format": "datasets"}
        if old.get("config") == json.loads(json.dumps(config)):
            return old
        raise FileExistsError(f"{output_dir} already holds a different world ({record_path}); use another folder")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty and holds no world.json; use an empty or new folder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.coco-") as tmp:
        record = generate_world(Path(tmp) / "world", world_seed=world_seed, num_train=num_train, num_val=num_val,
                                settings=settings, **kwargs)
        world = Path(tmp) / "world"
        train, val = world_paths(world, "train"), world_paths(world, "val")
        names = read_class_names(train["class_names"], categories_json=train["annotations"])
        splits = {split: load_coco_panoptic(p["images"], p["panoptic"], p["annotations"], class_names=names)
                  for split, p in (("train", train), ("validation", val))}
        config = record["config"]
        card = WORLD_CARD.format(world_seed=config["world_seed"], num_train=config["num_train"],
                                 num_val=config["num_val"], image_size=config["settings"]["image_size"],
                                 num_classes=len(CLASSES), num_things=len(THING_CLASSES),
                                 num_stuff=len(STUFF_CLASSES))
        write_dataset_folder(splits, names, output_dir, card=card)
        shutil.copy(world / "class_frequencies.md", output_dir / "class_frequencies.md")
    record["config"]["format"] = "datasets"
    # world.json last: its presence marks a complete world
    record_path.write_text(json.dumps(record, indent=1))
    return json.loads(record_path.read_text())
