"""Strong perturbations of the student's view of unlabeled images (paper Sec. 4): colour jitter, grayscale, Gaussian
blur and CutMix with the pasted image's panoptic pseudo-label.

All photometric operations act on a batch of RGB images in ``[0, 1]`` (``(B, 3, H, W)`` float, before CLIP
normalisation) with per-image random parameters, as batched torch ops on the images' device. Every random draw comes
from an explicit ``torch.Generator`` (on the CPU; the few drawn parameters are then moved to the device), so a fixed
seed reproduces the same augmentation on any device.

Defaults follow the DEARLi reference implementation (helen1c/DEARLi, ``MaskFormerPanopticSemiSupDatasetMapper`` and
``add_semi_sup_config``): ``ColorJitter(0.8, 0.8, 0.8, hue=0.2)`` applied to every image (no ``RandomApply``, i.e.
``p = 1``) with torchvision's per-call random order of the four adjustments, ``RandomGrayscale(p=0.2)``, Gaussian blur
with ``sigma ~ U(0.1, 2.0)`` at ``p = 0.5``, and a CutMix box at ``p = 0.5`` covering ``U(0.02, 0.4)`` of the image
with aspect ratio ``U(0.3, 1/0.3)``, placed uniformly so that it fits. Photometric formulas match torchvision's
``adjust_brightness / adjust_contrast / adjust_saturation / adjust_hue / rgb_to_grayscale`` (tested against them);
hand-written because torchvision applies one factor per call, not one per image of a batch.

CutMix: the box region of image ``i`` is replaced by the same region of a source image (the reference pastes a second
unlabeled crop; :func:`cutmix` takes any source batch, ``training/ssl.py`` uses the next image of the batch, see
there), and the pseudo-label inside the box is replaced by the source's pseudo-label. Segment ids of the pasted part
are offset so that they stay distinct from the target's; segments of the same *stuff* class are fused into one (one
target mask per stuff class, as in the reference's ``obtain_cutmixed_panseg``); segments left without pixels are
dropped and ids are renumbered ``1..n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.nn import functional as F

from training.earlier_names import renamed_keywords

__all__ = [
    "StrongAugmentationConfig",
    "StrongAugmentation",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "color_jitter",
    "random_grayscale",
    "gaussian_blur",
    "sample_cutmix_boxes",
    "boxes_to_masks",
    "cutmix",
    "cutmix_panoptic_labels",
]

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


@dataclass(init=False)
class StrongAugmentationConfig:
    """Parameters of the strong view (defaults: the DEARLi reference); probabilities are ``*_prob`` as the flags."""

    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    color_jitter_prob: float = 1.0
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutmix_prob: float = 0.5
    cutmix_area: tuple[float, float] = (0.02, 0.4)
    cutmix_aspect: tuple[float, float] = (0.3, 1 / 0.3)

    def __init__(self, **kwargs: Any) -> None:
        kwargs = renamed_keywords(kwargs, "StrongAugmentationConfig")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"StrongAugmentationConfig got unknown arguments {unknown}")
        for name in known:
            setattr(self, name, kwargs.get(name, getattr(type(self), name)))


# --------------------------------------------------------------------------------------------------------------------
# Photometric operations with one factor per image


def _per_image(factor: torch.Tensor | float, images: torch.Tensor) -> torch.Tensor:
    factor = torch.as_tensor(factor, dtype=images.dtype, device=images.device)
    if factor.dim() == 0:
        factor = factor.expand(images.shape[0])
    return factor.reshape(-1, *([1] * (images.dim() - 1)))


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma ``(B, 1, H, W)`` of RGB images ``(B, 3, H, W)``."""
    r, g, b = images.unbind(dim=-3)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * images + (1.0 - ratio) * other).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """``clamp(image * factor)`` per image."""
    return (images * _per_image(factor, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend with the mean luma of each image."""
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, _per_image(factor, images))


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Blend with each image's grayscale version."""
    return _blend(images, rgb_to_grayscale(images), _per_image(factor, images))


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """HSV ``(..., 3, H, W)`` (all in ``[0, 1]``) of RGB images in ``[0, 1]`` (torchvision's formulas)."""
    r, g, b = images.unbind(dim=-3)
    maxc, _ = images.max(dim=-3)
    minc = images.min(dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp_(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp_(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp_(0.0, 1.0)
    mask = i.unsqueeze(dim=-3) == torch.arange(6, device=i.device).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    a4 = torch.stack((a1, a2, a3), dim=-4)
    return torch.einsum("...ijk,...xijk->...xjk", mask.to(hsv.dtype), a4)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Rotate the hue of each image by ``factor`` (in turns, ``[-0.5, 0.5]``)."""
    hsv = rgb_to_hsv(images)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + _per_image(factor, images)[:, 0]) % 1.0
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def color_jitter(
    images: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.8,
    contrast: float = 0.8,
    saturation: float = 0.8,
    hue: float = 0.2,
    p: float = 1.0,
) -> torch.Tensor:
    """torchvision ``ColorJitter`` semantics with independent factors and a random order per image.

    Factors: brightness/contrast/saturation ``U(max(0, 1 - x), 1 + x)``, hue ``U(-hue, hue)``. Images not selected
    (probability ``1 - p``) are unchanged.
    """
    n = images.shape[0]
    apply = torch.rand(n, generator=generator) < p
    factors = [
        _uniform(generator, n, max(0.0, 1.0 - brightness), 1.0 + brightness),
        _uniform(generator, n, max(0.0, 1.0 - contrast), 1.0 + contrast),
        _uniform(generator, n, max(0.0, 1.0 - saturation), 1.0 + saturation),
        _uniform(generator, n, -hue, hue),
    ]
    order = torch.stack([torch.randperm(4, generator=generator) for _ in range(n)]) if n else torch.zeros(0, 4)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    out = images.clone()
    for position in range(4):
        for op_index, op in enumerate(ops):
            selected = (apply & (order[:, position] == op_index)).nonzero(as_tuple=True)[0]
            if selected.numel() == 0:
                continue
            index = selected.to(images.device)
            out[index] = op(out[index], factors[op_index][selected].to(images.device, images.dtype))
    return out


def random_grayscale(images: torch.Tensor, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Replace each image by its 3-channel luma with probability ``p``."""
    apply = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)
    gray = rgb_to_grayscale(images).expand_as(images)
    return torch.where(apply.view(-1, 1, 1, 1), gray, images)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per image (``0`` = unchanged), reflect padding.

    The kernel of every image spans ``ceil(3 * max(sigma))`` pixels on each side (a common support for the batch)
    and is normalised to sum to one.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    if sigma.numel() != images.shape[0]:
        raise ValueError(f"need one sigma per image, got {sigma.numel()} for {images.shape[0]} images")
    active = sigma > 0
    if not bool(active.any()):
        return images
    batch, channels, height, width = images.shape
    radius = int(math.ceil(3.0 * float(sigma.max())))
    radius = max(1, min(radius, height - 1, width - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    safe_sigma = torch.where(active, sigma, torch.ones_like(sigma))
    kernel = torch.exp(-0.5 * (offsets[None] / safe_sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(torch.float64).expand_as(kernel)
    kernel = torch.where(active[:, None], kernel, identity)
    kernel = kernel.to(images.device, images.dtype).repeat_interleave(channels, dim=0)  # (B*C, K)
    x = images.reshape(1, batch * channels, height, width)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=batch * channels)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def random_gaussian_blur(
    images: torch.Tensor, generator: torch.Generator, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0)
) -> torch.Tensor:
    """Blur each image with probability ``p`` and ``sigma ~ U(sigma)``."""
    n = images.shape[0]
    apply = torch.rand(n, generator=generator) < p
    sigmas = _uniform(generator, n, *sigma)
    return gaussian_blur(images, torch.where(apply, sigmas, torch.zeros_like(sigmas)))


# --------------------------------------------------------------------------------------------------------------------
# CutMix


def sample_cutmix_boxes(
    batch: int,
    size: tuple[int, int],
    generator: torch.Generator,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 100,
) -> torch.Tensor:
    """CutMix boxes ``(B, 4)`` int64 ``(y0, x0, y1, x1)`` (exclusive ends); all zeros where no box is drawn.

    With probability ``p`` per image: target area ``U(area) * H * W``, aspect ``r ~ U(aspect)``, width
    ``int(sqrt(A / r))``, height ``int(sqrt(A * r))``, top-left corner uniform, redrawn until the box fits.
    """
    height, width = size
    boxes = torch.zeros(batch, 4, dtype=torch.long)
    for i in range(batch):
        if float(torch.rand(1, generator=generator)) >= p:
            continue
        box_area = float(_uniform(generator, 1, *area)) * height * width
        for _ in range(max_tries):
            ratio = float(_uniform(generator, 1, *aspect))
            box_w = int(math.sqrt(box_area / ratio))
            box_h = int(math.sqrt(box_area * ratio))
            x = int(torch.randint(0, width, (1,), generator=generator))
            y = int(torch.randint(0, height, (1,), generator=generator))
            if x + box_w <= width and y + box_h <= height:
                boxes[i] = torch.tensor([y, x, y + box_h, x + box_w])
                break
    return boxes


def boxes_to_masks(
    boxes: torch.Tensor, size: tuple[int, int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean masks ``(B, H, W)`` of ``(y0, x0, y1, x1)`` boxes."""
    boxes = boxes.to(device)
    ys = torch.arange(size[0], device=device)
    xs = torch.arange(size[1], device=device)
    in_y = (ys[None] >= boxes[:, 0:1]) & (ys[None] < boxes[:, 2:3])
    in_x = (xs[None] >= boxes[:, 1:2]) & (xs[None] < boxes[:, 3:4])
    return in_y[:, :, None] & in_x[:, None, :]


def cutmix_panoptic_labels(
    segmentation: torch.Tensor,
    labels: torch.Tensor,
    source_segmentation: torch.Tensor,
    source_labels: torch.Tensor,
    mask: torch.Tensor,
    is_stuff: torch.Tensor,
    scores: torch.Tensor | None = None,
    source_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Paste ``source`` panoptic labels inside ``mask`` into one image's panoptic labels.

    Id maps ``(H, W)`` hold segment ids ``1..n`` (segment ``k`` has class ``labels[k-1]``) and ``-1`` (or ``0``) for
    void. Returns the mixed id map (ids ``1..m`` in order: the target's surviving segments, then the source's), the
    ``(m,)`` classes and, when given, the segments' scores (max over fused segments). Stuff segments of one class
    become one segment; segments without pixels are dropped.
    """
    device = segmentation.device
    n_target = labels.numel()
    offset_source = torch.where(source_segmentation > 0, source_segmentation + n_target, -1)
    mixed = torch.where(mask, offset_source, torch.where(segmentation > 0, segmentation, -1))
    all_labels = torch.cat([labels.to(device), source_labels.to(device)])
    all_scores = None
    if scores is not None and source_scores is not None:
        all_scores = torch.cat([scores.to(device), source_scores.to(device)]).float()
    total = all_labels.numel()
    if total == 0:
        return mixed, all_labels, all_scores
    counts = torch.bincount(mixed[mixed > 0] - 1, minlength=total)
    present = counts > 0
    position = torch.arange(total, device=device)
    # One group per stuff class and per thing segment; segments without pixels go to group key -1 (dropped).
    key = torch.where(is_stuff.to(device)[all_labels], all_labels, int(is_stuff.numel()) + position)
    key = torch.where(present, key, -1)
    unique_keys, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((unique_keys.numel(),), total, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, position, "amin")
    kept = unique_keys >= 0
    # New ids 1..m follow the first old segment of each kept group.
    order = torch.argsort(torch.where(kept, first, 2 * total + first))
    new_id_of_group = torch.empty_like(order)
    new_id_of_group[order] = torch.arange(1, order.numel() + 1, device=device)
    new_id_of_old = torch.where(present, new_id_of_group[inverse], -1)
    lut = torch.cat([new_id_of_old.new_full((1,), -1), new_id_of_old])
    new_segmentation = lut[mixed.clamp_min(0)]
    num_new = int(kept.sum())
    new_labels = all_labels[first[order[:num_new]]]
    new_scores = None
    if all_scores is not None:
        new_scores = torch.full((num_new,), float("-inf"), device=device)
        new_scores = new_scores.scatter_reduce(0, new_id_of_old[present] - 1, all_scores[present], "amax")
    return new_segmentation, new_labels, new_scores


def cutmix(
    images: torch.Tensor,
    boxes: torch.Tensor,
    source_images: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste the ``boxes`` regions of ``source_images`` into ``images`` (both ``(B, C, H, W)``).

    Returns the mixed images and the ``(B, H, W)`` box masks (use them with :func:`cutmix_panoptic_labels`).
    """
    masks = boxes_to_masks(boxes, images.shape[-2:], images.device)
    return torch.where(masks[:, None], source_images, images), masks


# --------------------------------------------------------------------------------------------------------------------
# Composition


class StrongAugmentation:
    """The student's strong view: colour jitter, grayscale and blur of a batch (CutMix is applied separately because
    it needs the pseudo-labels; see :func:`cutmix` and :func:`sample_cutmix_boxes`)."""

    def __init__(self, config: StrongAugmentationConfig | None = None) -> None:
        self.config = config or StrongAugmentationConfig()

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Photometric strong augmentation of ``(B, 3, H, W)`` images in ``[0, 1]``."""
        c = self.config
        images = color_jitter(images, generator, c.brightness, c.contrast, c.saturation, c.hue, c.color_jitter_prob)
        images = random_grayscale(images, generator, c.grayscale_prob)
        images = random_gaussian_blur(images, generator, c.blur_prob, c.blur_sigma)
        return images

    def cutmix_boxes(self, batch: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """CutMix boxes for a batch with this configuration."""
        c = self.config
        return sample_cutmix_boxes(batch, size, generator, c.cutmix_prob, c.cutmix_area, c.cutmix_aspect)
