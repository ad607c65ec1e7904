"""Does a strong view keep the class an image region shows? Measured in the miniature world with its frozen tiny CLIP.

The Mean Teacher's student learns the teacher's pseudo-label of the *weak* view on the *strong* view. That only
teaches the right thing when the strong perturbation keeps each region's class: on photographs the paper's colour
jitter (hue up to +-72 degrees) and grayscale keep a chair a chair, but the miniature world defines many classes by
their colour (a red disc is a tomato, a yellow one a lemon; water and sky by their blue). This module measures it: the
tiny CLIP's mask-pooled zero-shot accuracy on the ground-truth segments of images, once as they are (the weak view)
and once per strong view (each perturbation alone, and combinations), with the same random draws for every image.
A perturbation that keeps identity leaves the accuracy where it is; one that changes it lowers the accuracy towards
chance. It is measured on held-out training images (:func:`training.miniature.reproduction.development_split`), so
that the strong view chosen from it is not chosen on the split the table reports.

    python scripts/evaluate_tiny_clip.py --world_dir WORLD --strong_views     (see there)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.strong_augmentations import StrongAugmentation, StrongAugmentationConfig
from ..data.transforms import normalize_image

__all__ = ["STRONG_VIEWS", "class_identity_report", "format_class_identity"]

_NONE = {"color_jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0, "cutmix_prob": 0.0}


def _view(**changes: Any) -> StrongAugmentationConfig:
    return StrongAugmentationConfig(**{**_NONE, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
                                       **changes})


# Each perturbation of the reference's strong view alone, at the reference's strength and weaker ones; the reference's
# photometric view; and the view the miniature presets use (training/configs/miniature_ssl.yaml), which keeps the
# perturbations at strengths that keep a region's class here.
STRONG_VIEWS: dict[str, StrongAugmentationConfig] = {
    "weak view (none)": _view(),
    **{f"{name} {x:g}": _view(**{name: x}, color_jitter_prob=1.0)
       for name, strengths in (("brightness", (0.1, 0.2, 0.4, 0.8)), ("contrast", (0.1, 0.2, 0.4, 0.8)),
                               ("saturation", (0.2, 0.4, 0.8)), ("hue", (0.02, 0.05, 0.1, 0.2)))
       for x in strengths},
    "grayscale": _view(grayscale_prob=1.0),
    "blur sigma 0.1-2": _view(blur_prob=1.0),
    "reference (jitter 0.8/0.8/0.8/0.2, grayscale 0.2, blur 0.5)": StrongAugmentationConfig(cutmix_prob=0.0),
    # Each jitter at the largest strength above that costs no more accuracy than blur (the reference's perturbation
    # that keeps identity here); no grayscale.
    "class-keeping (jitter 0.1/0.2/0.4/0.02, blur 0.5)": StrongAugmentationConfig(
        brightness=0.1, contrast=0.2, saturation=0.4, hue=0.02, grayscale_prob=0.0, cutmix_prob=0.0),
}


def read_scenes(paths: Mapping[str, Path], max_images: int | None = None
                ) -> list[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]]:
    """(image, id map, segments) of the annotation file ``paths["annotations"]`` (images and PNGs in its folders)."""
    from modeling_dearli.image_processing_dearli import rgb_to_id
    from modeling_dearli.image_reading import read_image

    data = json.loads(Path(paths["annotations"]).read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    scenes = []
    for ann in data["annotations"][:max_images]:
        image = np.asarray(read_image(Path(paths["images"]) / files[ann["image_id"]]))
        ids = rgb_to_id(np.asarray(read_image(Path(paths["panoptic"]) / ann["file_name"]))).astype(np.int64)
        scenes.append((image, ids, ann["segments_info"]))
    return scenes


@torch.no_grad()
def class_identity_report(model: Any, scenes: Sequence[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]],
                          views: Mapping[str, StrongAugmentationConfig] | None = None, seed: int = 0
                          ) -> dict[str, Any]:
    """Per strong view: the mask-pooled zero-shot accuracy (%, all / things / stuff, per class) of `model` (a DEARLi
    model on the tiny CLIP) on the segments of `scenes` seen through that view; image ``i`` draws its perturbation
    from seed ``seed + i`` in every view."""
    from . import world as W
    from .tiny_clip import quarter_resolution_masks
    from .tiny_clip_zero_shot import _accuracy_table, _classify_masks

    index = {c.category_id: i for i, c in enumerate(W.CLASSES)}
    report: dict[str, Any] = {"images": len(scenes), "chance": round(100 / len(W.CLASSES), 2), "views": {}}
    for name, config in (views or STRONG_VIEWS).items():
        augment = StrongAugmentation(config)
        labels, preds = [], []
        for i, (image, ids, segments) in enumerate(scenes):
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div_(255)
            strong = augment(pixels, torch.Generator().manual_seed(seed + i))
            masks = quarter_resolution_masks(ids, [s["id"] for s in segments]).float()
            pred, _ = _classify_masks(model, normalize_image(strong), masks)
            labels += [index[s["category_id"]] for s in segments]
            preds += pred.tolist()
        table = _accuracy_table(np.array(labels), np.array(preds))
        report["views"][name] = {"config": asdict(config), **{k: table[k] for k in ("n", "all", "things", "stuff",
                                                                                   "per_class")}}
    return report


def format_class_identity(report: Mapping[str, Any]) -> str:
    """The report as a table (accuracy in %, and the change from the weak view)."""
    views = report["views"]
    base = next(iter(views.values()))
    lines = [f"Tiny CLIP mask-pooled zero-shot accuracy (%) on {report['images']} images' ground-truth segments, seen "
             f"through each strong view (chance {report['chance']}%; change from the weak view in brackets)",
             "| view | all | things | stuff |", "|---|---:|---:|---:|"]
    for name, v in views.items():
        cells = [f"{v[k]:.1f} ({v[k] - base[k]:+.1f})" for k in ("all", "things", "stuff")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
