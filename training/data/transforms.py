"""Geometric training augmentation applied identically to an image and its labels, and label -> target conversion.

Two scale schemes, both followed by a random crop of ``crop_size`` (the whole image along an axis where it is
smaller), a horizontal flip with probability ``flip_prob`` and padding of the bottom/right up to ``crop_size`` (image:
CLIP mean colour, i.e. 0 after normalisation; id map: void 0):

* :class:`ResizeShortestEdgeJitter` -- **the released DEARLi configs' scheme** (every stage: DeWa, labeled and
  unlabeled SSL images), detectron2's ``ResizeShortestEdge`` with ``"choice"`` sampling: the shorter side becomes one
  of ``int(x * 0.1 * C)`` for ``x = 5 .. 20`` (``0.5 C .. 2 C``, ``C`` the crop size; ADE20K ``320 .. 1280``, COCO
  ``256 .. 1024``), the longer side capped at ``longest_edge`` (ADE20K 2560, COCO 2048), then a uniform crop;
* :class:`LargeScaleJitter` -- detectron2's large-scale jitter (``ResizeScale`` + ``FixedSizeCrop``), which
  Mask2Former uses for COCO and the DEARLi *paper* describes ("random scaling (0.1 to 2.0)"): the image is resized
  to fit inside ``s * crop_size`` with ``s ~ U(min_scale, max_scale)``. Objects come out about 0.6x the size of the
  released scheme's, with much more padding. Kept as an option (``--scale_augmentation lsj``).

All randomness is drawn up front by ``sample`` from a ``torch.Generator`` into a :class:`GeometricParams`, which is
then applied to any number of aligned inputs: an RGB image (bilinear, antialiased), a panoptic id map and a stack of
binary masks (exact nearest neighbour by index gathering, so labels never mix and a label pixel always lies under the
image pixel it was sampled with). The same params can be applied to a weak and a strong view, or to a teacher
pseudo-label, and always give the same geometry.

Hand-written because torchvision's v2 transforms cannot pad a crop with a per-input fill while returning the valid
region, nor replay exactly the same random geometry on inputs that arrive at different times.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.nn import functional as F

from modeling_dearli.image_processing_dearli import CLIP_MEAN, CLIP_STD
from modeling_dearli.image_reading import to_rgb
from training.data.panoptic_format import VOID_ID

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SCALE_AUGMENTATIONS",
    "GeometricAugmentation",
    "GeometricParams",
    "LargeScaleJitter",
    "ResizeShortestEdgeJitter",
    "TransformedSample",
    "apply_to_image",
    "apply_to_id_map",
    "apply_to_masks",
    "build_geometric_augmentation",
    "fixed_params",
    "image_to_tensor",
    "mask_record_to_targets",
    "normalize_image",
    "panoptic_to_targets",
    "shortest_edge_output_shape",
    "shortest_edge_sizes",
    "valid_pixel_mask",
]

# CLIP_MEAN / CLIP_STD: the normalisation of DearliImageProcessor (one definition, imported above).
# --scale_augmentation choices: the released configs' scheme (default) and the paper text's large-scale jitter.
SCALE_AUGMENTATIONS = ("shortest_edge", "lsj")


# --------------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeometricParams:
    """One draw of the geometric augmentation, applicable to any input of size `input_size`.

    Attributes:
        input_size: (height, width) of the source image.
        resized_size: (height, width) after the random rescale.
        crop_top, crop_left: top-left corner of the crop window in resized coordinates.
        output_size: (height, width) of the output (the crop size; padded bottom/right where the crop is smaller).
        flip: whether the output is flipped horizontally.
    """

    input_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top: int
    crop_left: int
    output_size: tuple[int, int]
    flip: bool = False

    @property
    def valid_size(self) -> tuple[int, int]:
        """(height, width) of the real (not padded) content, which occupies the output's top-left corner (the flip
        mirrors the content only; padding is always bottom/right, as `pixel_mask` expects)."""
        return (
            min(self.output_size[0], self.resized_size[0] - self.crop_top),
            min(self.output_size[1], self.resized_size[1] - self.crop_left),
        )

    def source_indices(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Source row / column of every valid output pixel before the flip (nearest neighbour with pixel-centre
        alignment, i.e. ``floor((y + 0.5) * H / H')``, the convention of bilinear ``align_corners=False``)."""
        (h_in, w_in), (h_rs, w_rs) = self.input_size, self.resized_size
        h_valid, w_valid = self.valid_size
        rows = torch.arange(self.crop_top, self.crop_top + h_valid, device=device, dtype=torch.float64)
        cols = torch.arange(self.crop_left, self.crop_left + w_valid, device=device, dtype=torch.float64)
        rows = ((rows + 0.5) * (h_in / h_rs)).floor().long().clamp_(0, h_in - 1)
        cols = ((cols + 0.5) * (w_in / w_rs)).floor().long().clamp_(0, w_in - 1)
        return rows, cols


def fixed_params(input_size: tuple[int, int], output_size: tuple[int, int] | None = None) -> GeometricParams:
    """Identity geometry (resize to `output_size`, default the input size; no crop, no flip)."""
    output_size = tuple(output_size or input_size)
    return GeometricParams(tuple(input_size), output_size, 0, 0, output_size, False)


def _crop_size(crop_size: int | Sequence[int]) -> tuple[int, int]:
    size = [crop_size] if isinstance(crop_size, int) else list(crop_size)
    if len(size) not in (1, 2):
        raise ValueError(f"crop_size must be one or two ints, got {crop_size}")
    if min(size) < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    return int(size[0]), int(size[-1])


def _check_flip_prob(flip_prob: float) -> float:
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    return float(flip_prob)


class GeometricAugmentation(Protocol):
    """What the training datasets need of a scale scheme: a geometry per input size, drawn from a generator."""

    crop_size: tuple[int, int]

    def sample(self, height: int, width: int, generator: torch.Generator | None = None) -> GeometricParams: ...


class _Augmentation:
    """``__call__`` shared by the scale schemes: sample a geometry and apply it to an image and its labels."""

    def sample(self, height: int, width: int, generator: torch.Generator | None = None) -> GeometricParams:
        raise NotImplementedError

    def __call__(
        self,
        image: Any,
        id_map: torch.Tensor | np.ndarray | None = None,
        masks: torch.Tensor | np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> TransformedSample:
        """Sample a geometry for `image` and apply it to the image and, when given, the id map / mask stack."""
        image = image_to_tensor(image)
        params = self.sample(image.shape[-2], image.shape[-1], generator)
        return TransformedSample(
            image=apply_to_image(image, params),
            id_map=None if id_map is None else apply_to_id_map(id_map, params),
            masks=None if masks is None else apply_to_masks(masks, params),
            params=params,
        )


def shortest_edge_sizes(crop: int, min_scale: float = 0.5, max_scale: float = 2.0) -> list[int]:
    """The released configs' shortest-edge choices ``[int(x * 0.1 * crop) for x in range(5, 21)]`` for the default
    scales (``x`` runs over ``10 * min_scale .. 10 * max_scale``): 640 -> 320, 384, ..., 1280; 512 -> 256, 307, ...,
    1024 (truncated, as the reference's Python expression)."""
    low, high = round(min_scale * 10), round(max_scale * 10)
    if not 0 < low <= high:
        raise ValueError(f"need 0.1 <= min_scale <= max_scale (steps of 0.1), got {min_scale}, {max_scale}")
    return [int(x * 0.1 * crop) for x in range(low, high + 1)]


def shortest_edge_output_shape(height: int, width: int, short_edge: int, longest_edge: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: the shorter side becomes `short_edge`, then both are
    scaled down if the longer exceeds `longest_edge`, and rounded half up."""
    scale = short_edge / min(height, width)
    new_h, new_w = (short_edge, scale * width) if height < width else (scale * height, short_edge)
    if max(new_h, new_w) > longest_edge:
        shrink = longest_edge / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


class ResizeShortestEdgeJitter(_Augmentation):
    """The released configs' scale augmentation: shorter side from a discrete list, longer side capped, uniform crop,
    horizontal flip (padding up to the crop size when the resized image is smaller).

    Args:
        crop_size: output (height, width), or one int (or a one-element list) for a square crop.
        min_scale, max_scale: the shorter side is drawn uniformly from :func:`shortest_edge_sizes` of the (smaller)
            crop side, i.e. ``min_scale .. max_scale`` times the crop in steps of 0.1 (released: 0.5 .. 2.0).
        longest_edge: cap of the longer side after resizing (released: 4 x the crop, ADE20K 2560 and COCO 2048;
        default).
        flip_prob: probability of a horizontal flip.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        longest_edge: int | None = None,
        flip_prob: float = 0.5,
    ) -> None:
        self.crop_size = _crop_size(crop_size)
        self.sizes = shortest_edge_sizes(min(self.crop_size), min_scale, max_scale)
        self.longest_edge = int(longest_edge) if longest_edge else 4 * max(self.crop_size)
        if self.longest_edge < max(self.sizes):
            raise ValueError(f"longest_edge {self.longest_edge} is below the largest shortest edge {max(self.sizes)}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.flip_prob = _check_flip_prob(flip_prob)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_size={self.crop_size}, sizes={self.sizes[0]}..{self.sizes[-1]} "
            f"({len(self.sizes)}), longest_edge={self.longest_edge}, flip_prob={self.flip_prob})"
        )

    def sample(self, height: int, width: int, generator: torch.Generator | None = None) -> GeometricParams:
        """Draw the geometry for a (height, width) input (uses 4 numbers of `generator`)."""
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        short_edge = self.sizes[min(int(u[0] * len(self.sizes)), len(self.sizes) - 1)]
        new_h, new_w = shortest_edge_output_shape(height, width, short_edge, self.longest_edge)
        crop_h, crop_w = self.crop_size
        range_h, range_w = max(new_h - crop_h, 0), max(new_w - crop_w, 0)
        top = min(int(u[1] * (range_h + 1)), range_h)
        left = min(int(u[2] * (range_w + 1)), range_w)
        return GeometricParams((height, width), (new_h, new_w), top, left, (crop_h, crop_w), u[3] < self.flip_prob)


class LargeScaleJitter(_Augmentation):
    """Random rescale (of the crop size) + crop/pad + horizontal flip, shared by images and their labels.

    Args:
        crop_size: output (height, width), or one int (or a one-element list, as ``--crop_size 640`` parses) for a
            square crop.
        min_scale, max_scale: range of the random scale of the crop size the image is resized to fit in.
        flip_prob: probability of a horizontal flip.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        flip_prob: float = 0.5,
    ) -> None:
        self.crop_size = _crop_size(crop_size)
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.flip_prob = _check_flip_prob(flip_prob)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_size={self.crop_size}, min_scale={self.min_scale}, "
            f"max_scale={self.max_scale}, flip_prob={self.flip_prob})"
        )

    def sample(self, height: int, width: int, generator: torch.Generator | None = None) -> GeometricParams:
        """Draw the geometry for a (height, width) input (uses 4 numbers of `generator`)."""
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        scale = self.min_scale + (self.max_scale - self.min_scale) * u[0]
        crop_h, crop_w = self.crop_size
        factor = min(scale * crop_h / height, scale * crop_w / width)
        new_h, new_w = max(1, int(round(height * factor))), max(1, int(round(width * factor)))
        top = int(round(max(new_h - crop_h, 0) * u[1]))
        left = int(round(max(new_w - crop_w, 0) * u[2]))
        return GeometricParams((height, width), (new_h, new_w), top, left, (crop_h, crop_w), u[3] < self.flip_prob)


def build_geometric_augmentation(
    scheme: str,
    crop_size: int | Sequence[int],
    min_scale: float | None = None,
    max_scale: float | None = None,
    longest_edge: int | None = None,
    flip_prob: float = 0.5,
) -> ResizeShortestEdgeJitter | LargeScaleJitter:
    """The scale scheme ``"shortest_edge"`` (released configs; scales default 0.5 .. 2.0, `longest_edge` 4 x crop) or
    ``"lsj"`` (paper text; scales default 0.1 .. 2.0, `longest_edge` unused)."""
    if scheme == "shortest_edge":
        return ResizeShortestEdgeJitter(crop_size, 0.5 if min_scale is None else min_scale,
                                        2.0 if max_scale is None else max_scale, longest_edge, flip_prob)
    if scheme == "lsj":
        return LargeScaleJitter(crop_size, 0.1 if min_scale is None else min_scale,
                                2.0 if max_scale is None else max_scale, flip_prob)
    raise ValueError(f"unknown scale augmentation {scheme!r}; known: {SCALE_AUGMENTATIONS}")


class TransformedSample(NamedTuple):
    """Result of a scale scheme's ``__call__``: float image (3, h, w) in [0, 1], optional id map / masks, the params."""

    image: torch.Tensor
    id_map: torch.Tensor | None
    masks: torch.Tensor | None
    params: GeometricParams


# --------------------------------------------------------------------------------------------------------------------
# Application
# --------------------------------------------------------------------------------------------------------------------
def image_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image, (H, W, 3) uint8 array or (3, H, W) tensor as a float (3, H, W) tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        tensor = image
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(tensor.shape)}")
    else:
        if hasattr(image, "convert"):  # PIL, any mode
            image = to_rgb(image)
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"image array must be (H, W, 3) RGB, got {array.shape}")
        tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    return tensor.float()


def _check_size(shape: torch.Size, params: GeometricParams, what: str) -> None:
    if tuple(shape[-2:]) != tuple(params.input_size):
        raise ValueError(f"{what} has size {tuple(shape[-2:])}, the geometry was drawn for {params.input_size}")


def _place(valid: torch.Tensor, params: GeometricParams, fill: torch.Tensor | float | int) -> torch.Tensor:
    """Flip the valid content (..., h, w) if drawn, then pad it bottom/right to the output size with `fill`."""
    if params.flip:
        valid = valid.flip(-1)
    out_h, out_w = params.output_size
    h, w = valid.shape[-2:]
    if (h, w) != (out_h, out_w):
        out = valid.new_empty((*valid.shape[:-2], out_h, out_w))
        if isinstance(fill, torch.Tensor):
            out.copy_(fill.to(out.dtype).reshape(-1, 1, 1).expand_as(out))
        else:
            out.fill_(fill)
        out[..., :h, :w] = valid
        valid = out
    return valid


def apply_to_image(
    image: Any, params: GeometricParams, pad_value: Iterable[float] | float | None = None
) -> torch.Tensor:
    """Apply the geometry to an image: float (3, h, w) in the input's value range (uint8/PIL -> [0, 1]).

    Resizing is bilinear with antialiasing; padding uses `pad_value` (default the CLIP mean in [0, 1], which becomes
    0 after :func:`normalize_image`; pass 0.0 for already normalised images).
    """
    image = image_to_tensor(image)
    _check_size(image.shape, params, "image")
    if tuple(params.resized_size) != tuple(params.input_size):
        image = F.interpolate(
            image[None], size=params.resized_size, mode="bilinear", align_corners=False, antialias=True
        )[0]
    h, w = params.valid_size
    image = image[:, params.crop_top : params.crop_top + h, params.crop_left : params.crop_left + w]
    fill = torch.tensor(CLIP_MEAN if pad_value is None else pad_value, dtype=torch.float32)
    if fill.numel() == 1:
        fill = fill.expand(3)
    return _place(image, params, fill).contiguous()


def apply_to_id_map(id_map: torch.Tensor | np.ndarray, params: GeometricParams, pad_id: int = VOID_ID) -> torch.Tensor:
    """Apply the geometry to a label map (H, W) of any integer dtype (nearest neighbour), padding with `pad_id`."""
    id_map = torch.as_tensor(np.asarray(id_map) if not isinstance(id_map, torch.Tensor) else id_map)
    _check_size(id_map.shape, params, "id map")
    rows, cols = params.source_indices(id_map.device)
    return _place(id_map[rows][:, cols], params, pad_id).contiguous()


def apply_to_masks(
    masks: torch.Tensor | np.ndarray, params: GeometricParams, pad_value: float | int = 0
) -> torch.Tensor:
    """Apply the geometry to a stack of masks (n, H, W) (nearest neighbour; dtype kept; padding = `pad_value`)."""
    masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (n, H, W), got {tuple(masks.shape)}")
    _check_size(masks.shape, params, "masks")
    rows, cols = params.source_indices(masks.device)
    return _place(masks[:, rows][:, :, cols], params, pad_value).contiguous()


def valid_pixel_mask(params: GeometricParams) -> torch.Tensor:
    """(h, w) int64 mask of the output: 1 on real image content, 0 on padding."""
    mask = torch.zeros(params.output_size, dtype=torch.long)
    h, w = params.valid_size
    mask[:h, :w] = 1
    return mask


def normalize_image(
    image: torch.Tensor, mean: Iterable[float] = CLIP_MEAN, std: Iterable[float] = CLIP_STD
) -> torch.Tensor:
    """CLIP normalisation of a float image (..., 3, H, W) in [0, 1]."""
    mean_t = torch.as_tensor(tuple(mean), dtype=image.dtype, device=image.device).reshape(3, 1, 1)
    std_t = torch.as_tensor(tuple(std), dtype=image.dtype, device=image.device).reshape(3, 1, 1)
    return (image - mean_t) / std_t


# --------------------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------------------
def panoptic_to_targets(
    id_map: torch.Tensor | np.ndarray,
    segment_classes: Mapping[int, int],
    crowd_ids: Iterable[int] = (),
    void_id: int = VOID_ID,
    drop_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask2Former targets of a panoptic id map.

    Args:
        id_map: (H, W) integer segment ids.
        segment_classes: segment id -> contiguous class index (0..C-1). Ids of the map not listed here, `void_id`
            and `crowd_ids` are ignored (they are covered by no target, as in Mask2Former).
        crowd_ids: segment ids of crowd regions.
        void_id: the unlabeled id.
        drop_empty: drop listed segments without pixels in the map (e.g. cropped away).

    Returns:
        mask_labels: float32 (n, H, W) of 0/1, in the order of `segment_classes`; class_labels: int64 (n,).
    """
    id_map = torch.as_tensor(np.asarray(id_map) if not isinstance(id_map, torch.Tensor) else id_map)
    crowd = {int(c) for c in crowd_ids}
    pairs = [(int(s), int(c)) for s, c in segment_classes.items() if int(s) != void_id and int(s) not in crowd]
    if not pairs:
        return torch.zeros((0, *id_map.shape[-2:]), dtype=torch.float32), torch.zeros(0, dtype=torch.long)
    ids = torch.tensor([s for s, _ in pairs], dtype=id_map.dtype if id_map.is_floating_point() else torch.long)
    classes = torch.tensor([c for _, c in pairs], dtype=torch.long)
    masks = id_map.long()[None] == ids.long()[:, None, None].to(id_map.device)
    if drop_empty:
        keep = masks.flatten(1).any(dim=1)
        masks, classes = masks[keep], classes[keep.to(classes.device)]
    return masks.float(), classes


def mask_record_to_targets(
    record: Mapping[str, Any], params: GeometricParams, drop_empty: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic DeWa targets of a SAM record under a geometry: every mask is one target of class 0 (overlaps
    kept, no area filter; masks cropped away dropped unless ``drop_empty=False``). Decoding is
    `training.data.mask_reading.masks_to_targets`."""
    from .mask_reading import masks_to_targets

    return masks_to_targets(record, transform=lambda masks: apply_to_masks(masks, params), drop_empty=drop_empty)
