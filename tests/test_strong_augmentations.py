"""Strong augmentations: photometric ops against torchvision, determinism, CutMix boxes and image/label alignment."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from training.data.strong_augmentations import (
    StrongAugmentation,
    StrongAugmentationConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    boxes_to_masks,
    color_jitter,
    cutmix,
    cutmix_panoptic_labels,
    gaussian_blur,
    random_grayscale,
    sample_cutmix_boxes,
)


@pytest.fixture()
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 24, 20, generator=g)


@pytest.mark.parametrize(
    "ours, theirs, factors",
    [
        (adjust_brightness, TF.adjust_brightness, [0.2, 0.9, 1.0, 1.8]),
        (adjust_contrast, TF.adjust_contrast, [0.2, 0.9, 1.0, 1.8]),
        (adjust_saturation, TF.adjust_saturation, [0.2, 0.9, 1.0, 1.8]),
        (adjust_hue, TF.adjust_hue, [-0.2, -0.05, 0.0, 0.2]),
    ],
)
def test_per_image_factors_match_torchvision(images, ours, theirs, factors):
    out = ours(images, torch.tensor(factors))
    for i, factor in enumerate(factors):
        torch.testing.assert_close(out[i], theirs(images[i], factor), rtol=1e-5, atol=1e-5)


def test_grayscale_matches_torchvision(images):
    g = torch.Generator().manual_seed(0)
    out = random_grayscale(images, g, p=1.0)
    for i in range(len(images)):
        torch.testing.assert_close(out[i], TF.rgb_to_grayscale(images[i], num_output_channels=3))
    assert torch.equal(random_grayscale(images, g, p=0.0), images)


def test_blur_matches_torchvision(images):
    sigmas = [0.5, 1.3, 0.0, 2.0]
    out = gaussian_blur(images, sigmas)
    radius = math.ceil(3 * max(sigmas))
    for i, sigma in enumerate(sigmas):
        if sigma == 0:
            torch.testing.assert_close(out[i], images[i])
            continue
        expected = TF.gaussian_blur(images[i], kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


def test_color_jitter_is_deterministic_and_in_range(images):
    a = color_jitter(images, torch.Generator().manual_seed(3))
    b = color_jitter(images, torch.Generator().manual_seed(3))
    c = color_jitter(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(color_jitter(images, torch.Generator().manual_seed(3), p=0.0), images)


def test_color_jitter_order_per_image_matches_sequential_torchvision():
    """With one image, our jitter equals torchvision's ops applied in the drawn order with the drawn factors."""
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(7)
    out = color_jitter(image, g, 0.8, 0.8, 0.8, 0.2)
    # Replay the draws in the same sequence as color_jitter.
    g = torch.Generator().manual_seed(7)
    torch.rand(1, generator=g)
    factors = [float(torch.rand(1, generator=g, dtype=torch.float64) * (hi - lo) + lo)
               for lo, hi in [(0.2, 1.8), (0.2, 1.8), (0.2, 1.8), (-0.2, 0.2)]]
    order = torch.randperm(4, generator=g).tolist()
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = image[0]
    for k in order:
        expected = ops[k](expected, factors[k])
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_strong_augmentation_composition_is_deterministic(images):
    aug = StrongAugmentation()
    a = aug(images, torch.Generator().manual_seed(0))
    b = aug(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == images.shape


def test_cutmix_boxes_respect_area_aspect_and_probability():
    g = torch.Generator().manual_seed(0)
    height, width = 64, 80
    boxes = sample_cutmix_boxes(2000, (height, width), g)
    drawn = (boxes[:, 2] > boxes[:, 0])
    assert 0.45 < drawn.float().mean() < 0.55
    b = boxes[drawn]
    h = (b[:, 2] - b[:, 0]).double()
    w = (b[:, 3] - b[:, 1]).double()
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= height).all() and (b[:, 3] <= width).all()
    area = h * w / (height * width)
    assert area.max() <= 0.4 + 1e-9 and area.min() >= 0.015  # int() truncation can only shrink
    assert (h / w).min() > 0.2 and (h / w).max() < 4.0
    masks = boxes_to_masks(boxes[:3], (height, width))
    for box, mask in zip(boxes[:3], masks):
        assert int(mask.sum()) == int((box[2] - box[0]) * (box[3] - box[1]))


def test_cutmix_keeps_image_and_label_aligned():
    """Every pixel's colour encodes (image, segment); after CutMix the pixel's label must decode to the same pair."""
    g = torch.Generator().manual_seed(0)
    batch, height, width = 4, 32, 40
    segs, labels, images = [], [], []
    num_classes = 64
    for b in range(batch):
        # Random blocky id map with ids 1..n and some void.
        coarse = torch.randint(-1, 6, (4, 5), generator=g)
        seg = coarse.repeat_interleave(8, 0).repeat_interleave(8, 1)
        seg = torch.where(seg <= 0, -1, seg)
        n = 5
        segs.append(seg)
        # Unique class per (image, segment): all things, so no fusion; class encodes the origin.
        labels.append(torch.arange(n) + b * 8)
        code = torch.where(seg > 0, (seg - 1) + b * 8, num_classes).float() / num_classes
        images.append(torch.stack([code, torch.full_like(code, b / 10), torch.rand(height, width, generator=g)]))
    segs, images = torch.stack(segs), torch.stack(images)
    boxes = sample_cutmix_boxes(batch, (height, width), g, p=1.0)
    source = torch.roll(torch.arange(batch), -1)
    mixed_images, box_masks = cutmix(images, boxes, images[source])
    is_stuff = torch.zeros(num_classes, dtype=torch.bool)
    for b in range(batch):
        seg, lab, _ = cutmix_panoptic_labels(
            segs[b], labels[b], segs[source[b]], labels[source[b]], box_masks[b], is_stuff
        )
        # ids are 1..m, each present.
        m = lab.numel()
        assert set(seg[seg > 0].unique().tolist()) == set(range(1, m + 1))
        pixel_class = torch.where(seg > 0, lab[(seg - 1).clamp_min(0)], num_classes)
        torch.testing.assert_close(mixed_images[b, 0], pixel_class.float() / num_classes)
        # Inside the box the pixels come from the source image, outside from the target.
        origin = torch.where(box_masks[b], source[b].float() / 10, b / 10)
        torch.testing.assert_close(mixed_images[b, 1], origin.float())


def test_cutmix_labels_fuse_stuff_and_drop_covered_segments():
    seg = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, -1, -1], [3, 3, -1, -1]])
    labels = torch.tensor([0, 1, 2])  # class 0 thing, 1 and 2 stuff
    source = torch.tensor([[1, 1, 1, 1], [2, 2, 2, 2], [2, 2, 3, 3], [4, 4, 4, 4]])
    source_labels = torch.tensor([0, 1, 0, 2])
    box = torch.zeros(4, 4, dtype=torch.bool)
    box[1:3, 1:3] = True
    is_stuff = torch.tensor([False, True, True])
    mixed, mixed_labels, scores = cutmix_panoptic_labels(
        seg, labels, source, source_labels, box, is_stuff,
        torch.tensor([0.5, 0.6, 0.7]), torch.tensor([0.1, 0.9, 0.2, 0.3]),
    )
    expected = torch.tensor([[1, 1, 2, 2], [1, 2, 2, 2], [3, 2, 4, -1], [3, 3, -1, -1]])
    assert torch.equal(mixed, expected)
    assert mixed_labels.tolist() == [0, 1, 2, 0]  # source stuff class 1 fused into the target's class-1 segment
    torch.testing.assert_close(scores, torch.tensor([0.5, 0.9, 0.7, 0.2]))


def test_config_defaults_follow_reference():
    c = StrongAugmentationConfig()
    assert (c.brightness, c.contrast, c.saturation, c.hue) == (0.8, 0.8, 0.8, 0.2)
    assert (c.grayscale_prob, c.blur_prob, c.blur_sigma, c.cutmix_prob) == (0.2, 0.5, (0.1, 2.0), 0.5)
    assert c.cutmix_area == (0.02, 0.4)


def test_config_accepts_the_earlier_probability_names():
    with pytest.warns(FutureWarning, match="cutmix_p= is now called cutmix_prob="):
        c = StrongAugmentationConfig(cutmix_p=1.0, grayscale_p=0.0)
    assert (c.cutmix_prob, c.grayscale_prob, c.blur_prob) == (1.0, 0.0, 0.5)
    with pytest.raises(TypeError, match="both cutmix_p= and cutmix_prob="):
        StrongAugmentationConfig(cutmix_p=1.0, cutmix_prob=0.5)
    with pytest.raises(TypeError, match="unknown arguments"):
        StrongAugmentationConfig(cutmix=1.0)
