"""detectron2's SSD colour augmentation (COLOR_AUG_SSD of the released configs) on the images trained with ground truth.

The reference below is written from detectron2's ``ColorAugSSDTransform`` with the standard library's ``colorsys`` for
the HSV conversions, one pixel at a time."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from training.data.color_augmentation import ColorAugSSD, SSDColorParams


def _reference(image: np.ndarray, p: SSDColorParams) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> the SSD distortion with the given draws (convert() = clip + truncate to uint8)."""

    def convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)  # as detectron2

    def hsv_map(x: np.ndarray, fn) -> np.ndarray:
        out = np.empty_like(x)
        for (i, j), _ in np.ndenumerate(x[..., 0]):
            h, s, v = colorsys.rgb_to_hsv(*(x[i, j] / 255.0))
            out[i, j] = np.clip(np.round(np.array(colorsys.hsv_to_rgb(*fn(h, s, v))) * 255.0), 0, 255)
        return out

    def saturation(x):
        if p.saturation is None:
            return x
        return hsv_map(x, lambda h, s, v: (h, np.floor(np.clip(np.round(s * 255) * p.saturation, 0, 255)) / 255, v))

    def hue(x):
        return x if p.hue is None else hsv_map(x, lambda h, s, v: ((h + p.hue / 180.0) % 1.0, s, v))

    def contrast(x):
        return x if p.contrast is None else convert(x, alpha=p.contrast)

    x = image if p.brightness is None else convert(image, beta=p.brightness)
    for step in ((contrast, saturation, hue) if p.contrast_first else (saturation, hue, contrast)):
        x = step(x)
    return x


@pytest.mark.parametrize("params", [
    SSDColorParams(brightness=25.3),
    SSDColorParams(brightness=-31.0, contrast=1.4),
    SSDColorParams(contrast=0.6, saturation=1.45, hue=-17),
    SSDColorParams(contrast_first=False, saturation=0.55, hue=18, contrast=1.2),
    SSDColorParams(brightness=10.0, contrast_first=False, hue=5),
    SSDColorParams(),
])
def test_matches_detectron2s_algorithm(params):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    image[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 128, 128]]  # gray and extremes
    ours = ColorAugSSD.apply(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, params)
    ours = (ours * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = _reference(image, params)
    # brightness / contrast exactly; HSV round trips may differ by one 8-bit level (float rounding at .5)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1
    assert (ours == expected).mean() > 0.97


def test_draws_follow_detectron2s_probabilities_and_ranges():
    aug = ColorAugSSD()
    draws = [aug.sample(torch.Generator().manual_seed(s)) for s in range(2000)]
    assert draws[:5] == [aug.sample(torch.Generator().manual_seed(s)) for s in range(5)]
    for field in ("brightness", "contrast", "saturation", "hue"):
        applied = [getattr(d, field) for d in draws if getattr(d, field) is not None]
        assert 0.45 < len(applied) / len(draws) < 0.55, field
    assert 0.45 < np.mean([d.contrast_first for d in draws]) < 0.55
    brightness = [d.brightness for d in draws if d.brightness is not None]
    assert -32 <= min(brightness) < -30 and 30 < max(brightness) <= 32
    factors = [d.contrast for d in draws if d.contrast is not None] + [d.saturation for d in draws if d.saturation]
    assert 0.5 <= min(factors) < 0.52 and 1.48 < max(factors) <= 1.5
    hues = [d.hue for d in draws if d.hue is not None]
    assert set(hues) == set(range(-18, 19)) and all(isinstance(h, int) for h in hues)


def test_labeled_examples_get_it_on_their_content_only(coco_sample_dir):
    """Same seed with and without it: same geometry and targets, different pixels inside the image, padding untouched;
    the unlabeled dataset has no colour augmentation."""
    from training.data.panoptic_datasets import load_coco_panoptic
    from training.data.train_datasets import PanopticTrainDataset
    from training.data.transforms import ResizeShortestEdgeJitter

    ds = load_coco_panoptic(coco_sample_dir / "images", coco_sample_dir / "panoptic",
                            coco_sample_dir / "panoptic_annotations.json")
    transform = ResizeShortestEdgeJitter(512)
    plain = PanopticTrainDataset(ds, transform)
    colored = PanopticTrainDataset(ds, transform, color_augmentation=ColorAugSSD())
    changed = 0
    for seed in range(4):
        a, b = plain[(0, seed)], colored[(0, seed)]
        assert torch.equal(a["pixel_mask"], b["pixel_mask"]) and torch.equal(a["class_labels"], b["class_labels"])
        assert torch.equal(a["mask_labels"], b["mask_labels"])
        padding = ~a["pixel_mask"].bool()
        assert torch.equal(a["pixel_values"][:, padding], b["pixel_values"][:, padding])
        changed += not torch.allclose(a["pixel_values"], b["pixel_values"], atol=0.02)
    assert changed >= 2  # each adjustment has probability 1/2
