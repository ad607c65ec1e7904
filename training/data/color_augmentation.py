"""detectron2's SSD colour augmentation (``INPUT.COLOR_AUG_SSD``), which the released DEARLi configs apply to every
image trained with ground truth: DeWa's SAM images and the labeled images of the semi-supervised stage (not the
unlabeled weak / strong views, not at test time).

Per image, on 8-bit values (detectron2's ``ColorAugSSDTransform``, from the SSD paper's photometric distortions):

1. brightness with probability 0.5: ``+ U(-32, 32)``;
2. then, with probability 0.5 each, either contrast -> saturation -> hue or saturation -> hue -> contrast, where
   contrast (p 0.5) multiplies by ``U(0.5, 1.5)``, saturation (p 0.5) multiplies the HSV saturation by
   ``U(0.5, 1.5)`` and hue (p 0.5) rotates the hue by an integer ``U{-18, ..., 18}`` on OpenCV's 0-179 scale
   (i.e. up to 36 degrees).

Brightness and contrast clip to [0, 255] and truncate to integers after each step, as detectron2 does. Saturation
and hue go through a float HSV conversion and round back to 8 bits; detectron2 uses OpenCV's 8-bit HSV (hue
quantised to 2 degrees), which changes colours by up to about one level more -- the one difference, not worth a
dependency on OpenCV. The random draws come from a ``torch.Generator`` (the example's seed), not Python's ``random``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .strong_augmentations import hsv_to_rgb, rgb_to_hsv

__all__ = ["COLOR_AUGMENTATIONS", "ColorAugSSD", "SSDColorParams"]

# --color_augmentation choices: the released configs' (ssd) and none.
COLOR_AUGMENTATIONS = ("ssd", "none")


@dataclass(frozen=True)
class SSDColorParams:
    """One draw of :class:`ColorAugSSD`; ``None`` = that adjustment is skipped."""

    brightness: float | None = None  # added to the 0-255 values
    contrast_first: bool = True  # contrast, saturation, hue (else saturation, hue, contrast)
    contrast: float | None = None  # factor
    saturation: float | None = None  # factor of the HSV saturation
    hue: int | None = None  # shift on the 0-179 hue scale


class ColorAugSSD:
    """SSD photometric distortion of float RGB images ``(3, H, W)`` in ``[0, 1]`` (see the module docstring).

    Args:
        brightness_delta, contrast_range, saturation_range, hue_delta: detectron2's defaults (32, 0.5-1.5, 0.5-1.5, 18).
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(brightness_delta={self.brightness_delta}, contrast_range={self.contrast_range}, "
            f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta})"
        )

    def sample(self, generator: torch.Generator | None = None) -> SSDColorParams:
        """Draw the adjustments of one image (uses 9 numbers of `generator`)."""
        u = torch.rand(9, generator=generator, dtype=torch.float64).tolist()

        def between(value: float, low: float, high: float) -> float:
            return low + (high - low) * value

        hue = min(int(u[8] * (2 * self.hue_delta + 1)), 2 * self.hue_delta) - self.hue_delta
        return SSDColorParams(
            brightness=between(u[1], -self.brightness_delta, self.brightness_delta) if u[0] < 0.5 else None,
            contrast_first=u[2] < 0.5,
            contrast=between(u[4], *self.contrast_range) if u[3] < 0.5 else None,
            saturation=between(u[6], *self.saturation_range) if u[5] < 0.5 else None,
            hue=hue if u[7] < 0.5 else None,
        )

    @staticmethod
    def apply(image: torch.Tensor, params: SSDColorParams) -> torch.Tensor:
        """Apply one draw to a float RGB image ``(3, H, W)`` in ``[0, 1]`` (quantised to 8 bits first)."""
        x = (image.float() * 255.0).round().clamp(0.0, 255.0)
        if params.brightness is not None:
            x = (x + params.brightness).clamp(0.0, 255.0).floor()

        def contrast(x: torch.Tensor) -> torch.Tensor:
            return x if params.contrast is None else (x * params.contrast).clamp(0.0, 255.0).floor()

        def saturation(x: torch.Tensor) -> torch.Tensor:
            if params.saturation is None:
                return x
            hsv = rgb_to_hsv(x / 255.0)
            s = (hsv[1] * 255.0).round()
            s = (s * params.saturation).clamp(0.0, 255.0).floor() / 255.0
            return (hsv_to_rgb(torch.stack((hsv[0], s, hsv[2]))) * 255.0).round().clamp(0.0, 255.0)

        def hue(x: torch.Tensor) -> torch.Tensor:
            if params.hue is None:
                return x
            hsv = rgb_to_hsv(x / 255.0)
            h = torch.remainder(hsv[0] + params.hue / 180.0, 1.0)
            return (hsv_to_rgb(torch.stack((h, hsv[1], hsv[2]))) * 255.0).round().clamp(0.0, 255.0)

        steps = (contrast, saturation, hue) if params.contrast_first else (saturation, hue, contrast)
        for step in steps:
            x = step(x)
        return (x / 255.0).to(image.dtype)

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw and apply the augmentation of one image."""
        return self.apply(image, self.sample(generator))
