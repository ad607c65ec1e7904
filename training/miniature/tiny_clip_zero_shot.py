"""Zero-shot evaluation of the tiny CLIP through the DEARLi model (:func:`zero_shot_report`).

Through ``DearliForPanopticSegmentation.from_open_clip`` - the path real weights take - (a) global accuracy on
held-out close-up crops, (b) accuracy of mask-pooled dense features on ground-truth masks of held-out world scenes,
through the model's own ``clip_classify_masks`` with the masks given at the decoder's mask resolution (1/4), for things
and stuff separately and per class.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import world as W
from .tiny_clip import (
    SHIPPED_CONFIG,
    SHIPPED_WEIGHTS,
    dearli_on_tiny_clip,
    masks_on_grid,
    quarter_resolution_masks,
    to_pixel_values,
)

logger = logging.getLogger(__name__)


def probe_crops(per_class: int = 8, seed: int = 0, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Held-out close-ups (``clip_eval`` stream): ``per_class`` single things (on a stuff background) per thing class
    and stuff-only crops per stuff class -> (uint8 images (N, size, size, 3), contiguous labels (N,))."""
    images, labels = [], []
    for label, spec in enumerate(W.CLASSES):
        for j in range(per_class):
            rng = W.scene_rng(seed, "clip_eval", 0, label, j)
            if spec.isthing:
                scene = W.sample_stuff(rng, size, scale=1.0)
                center = (size / 2 + rng.uniform(-0.15, 0.15) * size, size / 2 + rng.uniform(-0.15, 0.15) * size)
                scene.things.append(W.sample_instance(rng, spec.category_id, size, (40.0, 100.0), center, scale=1.0))
            else:
                scene = W.Scene(size=size, stuff=[spec.category_id], boundaries=[], scale=1.0)
            image, _, _ = W.render_scene(scene, rng)
            images.append(image)
            labels.append(label)
    return np.stack(images), np.array(labels)


def probe_scenes(num_scenes: int = 48, seed: int = 0, balanced: bool = True,
                 settings: W.WorldSettings | None = None) -> list[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]]:
    """Held-out world scenes (``clip_eval`` stream, never a panoptic image): (image, id map, segments) each; with
    ``balanced`` the thing classes are drawn uniformly (per-class numbers for the rare classes too), else with the
    world's long tail."""
    settings = settings or W.WorldSettings()
    p = np.full(len(W.THING_CLASSES), 1 / len(W.THING_CLASSES)) if balanced else None
    out = []
    for k in range(num_scenes):
        rng = W.scene_rng(seed, "clip_eval", 1, k)
        scene = W.sample_scene(rng, settings, class_probabilities=p)
        out.append(W.render_scene(scene, rng, settings))
    return out


@torch.no_grad()
def _classify_masks(model: Any, pixel_values: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes (n,) and whether each mask survived resizing to the feature grid, for binary ``masks``
    (n, H/4, W/4) of one image, through ``model.clip_classify_masks`` (the ensembling path)."""
    features = model.backbone(pixel_values)[-1]
    logits = torch.where(masks > 0.5, 20.0, -20.0)[None]
    clip_logits = model.clip_classify_masks(features, logits)[0]
    nonempty = masks_on_grid(masks, tuple(features.shape[-2:]), model.config.mask_pooling_threshold).flatten(1).any(-1)
    return clip_logits.argmax(-1), nonempty


def _accuracy_table(labels: np.ndarray, preds: np.ndarray) -> dict[str, Any]:
    is_thing = np.array([c.isthing for c in W.CLASSES])
    out: dict[str, Any] = {"n": len(labels)}
    for name, sel in (("all", np.ones(len(labels), bool)), ("things", is_thing[labels]), ("stuff", ~is_thing[labels])):
        out[name] = round(100 * float((preds[sel] == labels[sel]).mean()), 2) if sel.any() else None
    things = is_thing[labels]
    out["things_called_stuff"] = round(100 * float((~is_thing[preds[things]]).mean()), 2) if things.any() else None
    out["per_class"] = {
        c.name: round(100 * float((preds[labels == i] == i).mean()), 1) if (labels == i).any() else None
        for i, c in enumerate(W.CLASSES)
    }
    out["per_class_n"] = {c.name: int((labels == i).sum()) for i, c in enumerate(W.CLASSES)}
    return out


@torch.no_grad()
def evaluate_crops(model: Any, per_class: int = 8, seed: int = 0) -> dict[str, Any]:
    """Global zero-shot accuracy on held-out close-ups: the whole-image mask pooled = CLIP's ``encode_image``."""
    images, labels = probe_crops(per_class, seed)
    preds = []
    for start in range(0, len(images), 64):
        pixel_values = to_pixel_values(images[start:start + 64])
        features = model.backbone(pixel_values)[-1]
        full = torch.full((len(pixel_values), 1, *features.shape[-2:]), 20.0)
        preds.append(model.clip_classify_masks(features, full)[:, 0].argmax(-1))
    return _accuracy_table(labels, torch.cat(preds).numpy())


@torch.no_grad()
def evaluate_masks(model: Any, scenes: Sequence[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]],
                   input_scale: float = 1.0) -> dict[str, Any]:
    """Zero-shot accuracy of mask-pooled dense CLIP features on ground-truth masks (given at 1/4 resolution, like
    the decoder's masks); also the share of masks too small to cover a cell of the stride-32 grid. ``input_scale``
    resizes the images first (as a model run with a larger ``shortest_edge`` would see them: a finer CLIP grid)."""
    from PIL import Image

    index = {c.category_id: i for i, c in enumerate(W.CLASSES)}
    labels, preds, empty = [], [], []
    for image, ids, segments in scenes:
        if input_scale != 1.0:
            size = (round(image.shape[1] * input_scale), round(image.shape[0] * input_scale))
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
            ids = np.asarray(Image.fromarray(ids.astype(np.int32)).resize(size, Image.NEAREST))
            present = set(np.unique(ids).tolist())
            segments = [s for s in segments if s["id"] in present]
        masks = quarter_resolution_masks(ids, [s["id"] for s in segments]).float()
        pred, nonempty = _classify_masks(model, to_pixel_values([image]), masks)
        labels += [index[s["category_id"]] for s in segments]
        preds += pred.tolist()
        empty += (~nonempty).tolist()
    labels_a, preds_a, empty_a = np.array(labels), np.array(preds), np.array(empty)
    out = _accuracy_table(labels_a, preds_a)
    is_thing = np.array([c.isthing for c in W.CLASSES])[labels_a]
    out["empty_after_resize"] = {"things": int(empty_a[is_thing].sum()), "stuff": int(empty_a[~is_thing].sum())}
    kept = ~empty_a
    out["nonempty_only"] = {k: v for k, v in _accuracy_table(labels_a[kept], preds_a[kept]).items()
                            if k in ("n", "all", "things", "stuff")}
    return out


def zero_shot_report(
    config_path: str | os.PathLike[str] = SHIPPED_CONFIG,
    weights_path: str | os.PathLike[str] = SHIPPED_WEIGHTS,
    crops_per_class: int = 8,
    num_scenes: int = 48,
    seed: int = 0,
    world_dir: str | os.PathLike[str] | None = None,
    max_world_images: int = 200,
    input_scale: float = 1.0,
) -> dict[str, Any]:
    """The zero-shot report: ``crops`` (global), ``masks_balanced`` (mask-pooled GT masks of held-out scenes with
    uniformly drawn classes) and, with ``world_dir``, ``masks_world_val`` (a written world's validation split);
    ``input_scale`` resizes the scenes before mask pooling (:func:`evaluate_masks`)."""
    model = dearli_on_tiny_clip(config_path, weights_path)
    report: dict[str, Any] = {"chance": round(100 / len(W.CLASSES), 2), "input_scale": input_scale,
                              "crops": evaluate_crops(model, crops_per_class, seed),
                              "masks_balanced": evaluate_masks(model, probe_scenes(num_scenes, seed), input_scale)}
    if world_dir is not None:
        report["masks_world_val"] = evaluate_masks(model, world_split_scenes(world_dir, "val", max_world_images),
                                                   input_scale)
    return report


def world_split_scenes(world_dir: str | os.PathLike[str], split: str = "val", max_images: int | None = None
                       ) -> list[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]]:
    """(image, id map, segments) of a written world's split (read from its files)."""
    from PIL import Image

    from modeling_dearli.image_processing_dearli import rgb_to_id

    paths = W.world_paths(world_dir, split)
    data = json.loads(paths["annotations"].read_text())
    images = {im["id"]: im for im in data["images"]}
    out = []
    for ann in data["annotations"][:max_images]:
        image = np.asarray(Image.open(paths["images"] / images[ann["image_id"]]["file_name"]).convert("RGB"))
        ids = rgb_to_id(np.asarray(Image.open(paths["panoptic"] / ann["file_name"]).convert("RGB"))).astype(np.int64)
        out.append((image, ids, ann["segments_info"]))
    return out


def format_report(report: dict[str, Any], per_class: bool = True) -> str:
    """The zero-shot report as text."""
    lines = [(f"zero-shot accuracy (%) of the tiny CLIP, {len(W.CLASSES)} classes (chance {report['chance']}%); "
              f"scenes resized x{report.get('input_scale', 1.0)} for mask pooling")]
    for key, title in (("crops", "global, held-out close-up crops"),
                       ("masks_balanced", "mask-pooled GT masks, held-out scenes (classes drawn uniformly)"),
                       ("masks_world_val", "mask-pooled GT masks, world validation split (long tail)")):
        r = report.get(key)
        if r is None:
            continue
        lines.append(f"{title}: n={r['n']}  all {r['all']}  things {r['things']}  stuff {r['stuff']}  "
                     f"(things called stuff: {r['things_called_stuff']})")
        if "empty_after_resize" in r:
            e = r["empty_after_resize"]
            lines.append(
                f"  masks that miss every cell of the stride-32 grid: things {e['things']}, stuff {e['stuff']}; "
                f"accuracy without them: things {r['nonempty_only']['things']} stuff "
                f"{r['nonempty_only']['stuff']}"
            )
    if per_class:
        keys = [k for k in ("crops", "masks_balanced", "masks_world_val") if k in report]
        lines.append("per class: " + " | ".join(keys))
        for c in W.CLASSES:
            cells = [f"{report[k]['per_class'][c.name]} (n={report[k]['per_class_n'][c.name]})" for k in keys]
            lines.append(f"  {c.category_id:>2} {c.name:<12} {'thing' if c.isthing else 'stuff'}  " + " | ".join(cells))
    return "\n".join(lines)
