"""DEARLi image processor: CLIP-normalised, padded inputs; Mask2Former targets; ensembled post-processing.

Shipped to the Hub as remote code next to the model (``register_for_auto_class("AutoImageProcessor")``), so it only
imports torch, numpy, PIL, transformers and its sibling modules.

Preprocessing follows detectron2's test-time ``ResizeShortestEdge``: the shorter side becomes
``size["shortest_edge"]`` unless the longer side would exceed ``size["longest_edge"]`` (defaults 640 / 2560, the
ADE20K setting; Mask2Former's COCO setting is 800 / 1333, the DEARLi reference evaluates COCO at 512 / 2048). Images
are scaled to [0, 1], normalised with the CLIP mean / std and padded bottom / right to a multiple of ``size_divisor``;
``pixel_mask`` marks valid pixels.

Post-processing ensembles the decoder and CLIP posteriors (paper Eq. 6, :mod:`ensembling`) and runs detectron2-style
Mask2Former inference (:mod:`segmentation_inference`) at the requested size after cropping the padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .configuration_dearli import DEFAULT_ENSEMBLE_ALPHA
from .ensembling import class_probabilities, output_field, resolve_ensemble_alpha
from .segmentation_inference import (
    INSTANCE_TOP_K,
    MASK_STRIDE,
    instance_inference,
    panoptic_inference,
    semantic_inference,
)

try:  # PIL is a transformers vision dependency; keep the module importable without it.
    from PIL import Image

    from .image_reading import to_rgb
except ImportError:  # pragma: no cover
    Image = None

__all__ = ["DearliImageProcessor", "CLIP_MEAN", "CLIP_STD", "id_to_rgb", "rgb_to_id"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DearliImageProcessorKwargs(ImagesKwargs, total=False):
    """Processor-specific keyword arguments (beyond transformers' ``ImagesKwargs``)."""

    size_divisor: int
    ignore_index: int
    num_labels: int
    label_ids_to_fuse: list[int]
    ensemble_alpha: float
    mask_stride: int


def rgb_to_id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours ``(H, W, 3+)`` -> segment ids ``R + 256 G + 256^2 B`` ``(H, W)`` (uint32 for uint8
    input, int64 otherwise); a 2-D array is already an id map and is returned as is.

    The one decoder of the colour encoding in the project (training data, PQ evaluation and this processor).
    """
    color = np.asarray(color)
    if color.ndim == 2:
        return color
    if color.dtype == np.uint8:
        h, w, c = color.shape
        if c == 3 and color.flags.c_contiguous and h * w > 1:
            # read each pixel's 3 bytes (plus the next pixel's first byte) as one little-endian uint32, then mask
            out = np.empty(h * w, dtype=np.uint32)
            view = np.ndarray(shape=(h * w - 1,), dtype="<u4", buffer=color, strides=(3,))
            np.bitwise_and(view, 0xFFFFFF, out=out[:-1])
            last = color[-1, -1].astype(np.uint32)
            out[-1] = last[0] | (last[1] << 8) | (last[2] << 16)
            return out.reshape(h, w)
        out = color[..., 2].astype(np.uint32)
        out <<= 8
        out |= color[..., 1]
        out <<= 8
        out |= color[..., 0]
        return out
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
    """Segment id map ``(H, W)`` -> COCO panoptic colours ``(H, W, 3)`` uint8 (the inverse of :func:`rgb_to_id`)."""
    id_map = np.asarray(id_map).astype(np.int64)
    out = np.empty(id_map.shape + (3,), dtype=np.uint8)
    out[..., 0] = id_map % 256
    out[..., 1] = (id_map // 256) % 256
    out[..., 2] = (id_map // (256 * 256)) % 256
    return out


class DearliImageProcessor(BaseImageProcessor):
    r"""Image processor for DEARLi (Mask2Former-style panoptic model with CLIP ensembling).

    Args:
        do_resize: resize so that the shorter side is ``size["shortest_edge"]`` and the longer at most
            ``size["longest_edge"]`` (or to exactly ``size["height"] x size["width"]``).
        size: resize target, default ``{"shortest_edge": 640, "longest_edge": 2560}``.
        do_rescale / rescale_factor: scale integer images (uint8 / uint16) to [0, 1]. Float inputs must already be in
            [0, 1].
        do_normalize / image_mean / image_std: normalisation (CLIP statistics by default).
        size_divisor: pad height and width to a multiple of this.
        ignore_index: void value of semantic segmentation maps (used when no ``instance_id_to_semantic_id``).
        num_labels: number of classes ``C`` of the model (checked against outputs when set).
        label_ids_to_fuse: stuff class indices, fused per class in panoptic output and dropped from instance output.
        ensemble_alpha: weight of the decoder posterior in Eq. 6 (``1 - ensemble_alpha`` for CLIP); 0.6 in the paper.
        mask_stride: input pixels per pixel of the predicted masks (4).
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    valid_kwargs = DearliImageProcessorKwargs

    def __init__(
        self,
        do_resize: bool = True,
        size: Mapping[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        size_divisor: int = 32,
        ignore_index: int = 255,
        num_labels: int | None = None,
        label_ids_to_fuse: Iterable[int] | None = None,
        ensemble_alpha: float = DEFAULT_ENSEMBLE_ALPHA,
        mask_stride: int = MASK_STRIDE,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.do_resize = bool(do_resize)
        self.size = _check_size(dict(size) if size is not None else {"shortest_edge": 640, "longest_edge": 2560})
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.size_divisor = int(size_divisor)
        self.ignore_index = int(ignore_index)
        self.num_labels = None if num_labels is None else int(num_labels)
        self.label_ids_to_fuse = None if label_ids_to_fuse is None else sorted({int(i) for i in label_ids_to_fuse})
        if not 0.0 <= float(ensemble_alpha) <= 1.0:
            raise ValueError(f"ensemble_alpha must lie in [0, 1], got {ensemble_alpha}")
        self.ensemble_alpha = float(ensemble_alpha)
        self.mask_stride = int(mask_stride)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need three (RGB) values")
        if self.size_divisor < 1:
            raise ValueError("size_divisor must be >= 1")

    @classmethod
    def from_model_config(cls, config: Any, **kwargs: Any) -> "DearliImageProcessor":
        """A processor matching a ``DearliConfig``: ``num_labels``, stuff classes (not in ``thing_ids``) to fuse and
        ``ensemble_alpha`` (``None`` or absent: the config's). ``kwargs`` override any setting (e.g. ``size``)."""
        num_labels = len(config.class_names)
        things = set(int(i) for i in getattr(config, "thing_ids", []) or [])
        defaults = {
            "num_labels": num_labels,
            "label_ids_to_fuse": [i for i in range(num_labels) if i not in things],
        }
        defaults.update(kwargs)
        defaults["ensemble_alpha"] = resolve_ensemble_alpha(kwargs.get("ensemble_alpha"), config)
        return cls(**defaults)

    def padded_size(self, height: int, width: int, size: Mapping[str, int] | None = None) -> tuple[int, int]:
        """The ``(H, W)`` of ``pixel_values`` for one ``height x width`` image on its own (resized, then padded to a
        multiple of ``size_divisor``). Images with the same padded size batch without extra padding, so a batch of
        them gives the same outputs as each image alone."""
        size = self.size if size is None else _check_size(dict(size))
        h, w = _output_size((height, width), size) if self.do_resize else (int(height), int(width))
        divisor = self.size_divisor
        return math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor

    # ----------------------------------------------------------------------------------------------------------------
    # Preprocessing

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        instance_id_to_semantic_id: Mapping[int, int] | Sequence[Mapping[int, int]] | None = None,
        *,
        do_resize: bool | None = None,
        size: Mapping[str, int] | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        size_divisor: int | None = None,
        ignore_index: int | None = None,
        input_data_format: str | None = None,
        return_tensors: str | None = "pt",
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Resize, normalise and pad images; optionally build Mask2Former targets.

        Args:
            images: a PIL image, numpy array (HW, HWC or CHW) or torch tensor (CHW or HW), or a list of them (or a
                4-D batch). Grayscale is replicated to RGB, alpha is dropped; PIL images of any mode (palette,
                16-bit, ...) are converted by :func:`image_reading.to_rgb`.
            segmentation_maps: per image, a panoptic id map (COCO RGB id-PNG as PIL image or ``(H, W, 3)`` uint8
                array, or an ``(H, W)`` integer array of segment ids), or a semantic map of class indices when
                ``instance_id_to_semantic_id`` is not given. Same size as its image.
            instance_id_to_semantic_id: segment id -> contiguous class index, one mapping per image (or one shared).
                Segment id 0 is void; map crowd (or otherwise ignored) segments to a negative class, e.g. -1.
                Any other id missing from the mapping is an error.
            input_data_format: ``"channels_first"`` / ``"channels_last"`` to disambiguate arrays.
            return_tensors: ``"pt"`` (default), ``"np"`` or ``None`` (same as ``"pt"``).

        Returns:
            ``BatchFeature`` with ``pixel_values`` ``(B, 3, H, W)``, ``pixel_mask`` ``(B, H, W)`` (1 = valid) and,
            with ``segmentation_maps``, lists ``mask_labels`` (``(n_i, H, W)`` float) and ``class_labels``
            (``(n_i,)`` long).
        """
        for key in ("do_convert_rgb", "data_format", "resample", "do_pad"):
            kwargs.pop(key, None)  # accepted for compatibility; behaviour is fixed
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        do_resize = self.do_resize if do_resize is None else do_resize
        size = self.size if size is None else _check_size(dict(size))
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        mean = torch.tensor(self.image_mean if image_mean is None else image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std if image_std is None else image_std, dtype=torch.float32)
        divisor = self.size_divisor if size_divisor is None else int(size_divisor)
        ignore_index = self.ignore_index if ignore_index is None else ignore_index

        image_list = _as_list(images, "images")
        tensors = [_image_to_tensor(im, input_data_format, do_rescale, rescale_factor) for im in image_list]
        maps = None
        if segmentation_maps is not None:
            maps = _as_list(segmentation_maps, "segmentation_maps", is_map=True)
            if len(maps) != len(tensors):
                raise ValueError(f"got {len(tensors)} images but {len(maps)} segmentation maps")
            maps = [_map_to_ids(m, instance_id_to_semantic_id is not None) for m in maps]
            for i, (t, m) in enumerate(zip(tensors, maps)):
                if tuple(m.shape) != tuple(t.shape[-2:]):
                    raise ValueError(
                        f"segmentation map {i} has size {tuple(m.shape)} but its image has {tuple(t.shape[-2:])}"
                    )
        mappings = _per_image_mappings(instance_id_to_semantic_id, len(tensors))

        resized, resized_maps = [], []
        for i, t in enumerate(tensors):
            out_hw = _output_size(t.shape[-2:], size) if do_resize else tuple(t.shape[-2:])
            if out_hw != tuple(t.shape[-2:]):
                t = F.interpolate(t[None], size=out_hw, mode="bilinear", align_corners=False, antialias=True)[0]
                t = t.clamp(0.0, 1.0)
            resized.append(t)
            if maps is not None:
                resized_maps.append(_resize_nearest(maps[i], out_hw))

        pad_h = max(t.shape[-2] for t in resized)
        pad_w = max(t.shape[-1] for t in resized)
        pad_h, pad_w = math.ceil(pad_h / divisor) * divisor, math.ceil(pad_w / divisor) * divisor
        pixel_values = torch.zeros((len(resized), 3, pad_h, pad_w), dtype=torch.float32)
        pixel_mask = torch.zeros((len(resized), pad_h, pad_w), dtype=torch.long)
        for i, t in enumerate(resized):
            if do_normalize:
                t = (t - mean[:, None, None]) / std[:, None, None]
            pixel_values[i, :, : t.shape[-2], : t.shape[-1]] = t
            pixel_mask[i, : t.shape[-2], : t.shape[-1]] = 1

        data: dict[str, Any] = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if device is not None:
            data = {k: v.to(device) for k, v in data.items()}
        if return_tensors == "np":
            data = {k: v.cpu().numpy() for k, v in data.items()}
        encoded = BatchFeature(data=data)
        if maps is not None:
            mask_labels, class_labels = [], []
            for i, ids in enumerate(resized_maps):
                padded = torch.full((pad_h, pad_w), -1, dtype=torch.long)
                padded[: ids.shape[0], : ids.shape[1]] = ids
                masks, labels = self._targets_from_ids(padded, mappings[i], ignore_index)
                if device is not None:
                    masks, labels = masks.to(device), labels.to(device)
                mask_labels.append(masks)
                class_labels.append(labels)
            encoded["mask_labels"] = mask_labels
            encoded["class_labels"] = class_labels
        return encoded

    def _targets_from_ids(
        self, ids: torch.Tensor, mapping: Mapping[int, int] | None, ignore_index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary masks ``(n, H, W)`` and class indices ``(n,)`` from an id map (-1 = padding)."""
        uniq = torch.unique(ids)
        uniq = uniq[uniq >= 0]
        if mapping is None:
            segment_ids = uniq[uniq != ignore_index]
            labels = segment_ids.clone()
        else:
            present = [int(i) for i in uniq.tolist() if int(i) != 0]
            missing = [i for i in present if i not in mapping]
            if missing:
                raise ValueError(
                    f"segment ids {missing[:10]} are not in instance_id_to_semantic_id; map ignored (e.g. crowd) "
                    "segments to -1"
                )
            kept = [i for i in present if int(mapping[i]) >= 0]
            segment_ids = torch.tensor(kept, dtype=torch.long)
            labels = torch.tensor([int(mapping[i]) for i in kept], dtype=torch.long)
        if self.num_labels is not None and labels.numel() and int(labels.max()) >= self.num_labels:
            raise ValueError(f"class index {int(labels.max())} out of range for num_labels={self.num_labels}")
        masks = (ids[None] == segment_ids[:, None, None]).float()
        return masks, labels

    # ----------------------------------------------------------------------------------------------------------------
    # Post-processing

    def _probs_and_sizes(self, outputs: Any, target_sizes: Any, ensemble_alpha: float | None):
        masks = output_field(outputs, "masks_queries_logits")
        if masks is None:
            raise ValueError("outputs have no `masks_queries_logits`")
        probs = class_probabilities(outputs, resolve_ensemble_alpha(ensemble_alpha, self))
        num_classes = probs.shape[-1] - 1
        if self.num_labels is not None and num_classes != self.num_labels:
            raise ValueError(f"outputs have {num_classes} classes but the processor expects {self.num_labels}")
        unpadded = output_field(outputs, "unpadded_sizes")
        if target_sizes is not None:
            if torch.is_tensor(target_sizes):
                target_sizes = target_sizes.tolist()
            target_sizes = [tuple(int(v) for v in s) for s in target_sizes]
            if len(target_sizes) != probs.shape[0]:
                raise ValueError(
                    f"got {len(target_sizes)} target sizes for a batch of {probs.shape[0]} (one (height, width) per "
                    "image)"
                )
        return probs, masks, unpadded, target_sizes

    def _stuff(self, label_ids_to_fuse: Iterable[int] | None) -> list[int] | None:
        if label_ids_to_fuse is None:
            return self.label_ids_to_fuse
        return sorted({int(i) for i in label_ids_to_fuse})

    def _inference_kwargs(self, mask_threshold: float, label_ids_to_fuse: Iterable[int] | None, target_sizes: Any,
                          unpadded: Any) -> dict[str, Any]:
        """The arguments panoptic and instance inference share: mask binarisation, stuff classes and sizes."""
        return {"mask_threshold": mask_threshold, "stuff_ids": self._stuff(label_ids_to_fuse),
                "output_sizes": target_sizes, "unpadded_sizes": unpadded, "mask_stride": self.mask_stride}

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.0,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: Iterable[int] | None = None,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        ensemble_alpha: float | None = None,
    ) -> list[dict[str, Any]]:
        """Panoptic segmentation per image (detectron2 Mask2Former convention, see :mod:`segmentation_inference`).

        Args:
            outputs: model outputs with ``class_queries_logits``, ``masks_queries_logits`` and optionally
                ``clip_class_logits`` (ensembled with Eq. 6) and ``unpadded_sizes`` (padding is cropped).
            threshold: minimal class probability of a query (DEARLi does not reject low-confidence segments: 0.0).
            mask_threshold: binarisation threshold of the mask probabilities.
            overlap_mask_area_threshold: minimal ratio of a segment's visible area to its full binary mask.
            label_ids_to_fuse: classes fused into one segment per class; ``None`` = the processor's stuff classes.
            target_sizes: ``(height, width)`` per image; ``None`` = the unpadded input size.
            ensemble_alpha: decoder weight in Eq. 6; ``None`` = ``self.ensemble_alpha``.

        Returns:
            Per image ``{"segmentation": (H, W) int32 tensor of segment ids (-1 = void), "segments_info": [{"id",
            "label_id", "was_fused", "score"}, ...]}``.
        """
        probs, masks, unpadded, target_sizes = self._probs_and_sizes(outputs, target_sizes, ensemble_alpha)
        results = panoptic_inference(
            probs, masks, threshold=threshold, overlap_threshold=overlap_mask_area_threshold,
            **self._inference_kwargs(mask_threshold, label_ids_to_fuse, target_sizes, unpadded),
        )
        formatted = []
        for r in results:
            info = [
                {"id": int(i), "label_id": int(lab), "was_fused": bool(fused), "score": float(score)}
                for i, lab, fused, score in zip(
                    r.ids.tolist(), r.labels.tolist(), r.was_fused.tolist(), r.scores.tolist()
                )
            ]
            formatted.append({"segmentation": r.segmentation.to(torch.int32), "segments_info": info})
        return formatted

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        ensemble_alpha: float | None = None,
    ) -> list[torch.Tensor]:
        """Semantic segmentation per image: ``(H, W)`` int64 class indices (``target_sizes`` as for panoptic)."""
        probs, masks, unpadded, target_sizes = self._probs_and_sizes(outputs, target_sizes, ensemble_alpha)
        return semantic_inference(
            probs, masks, output_sizes=target_sizes, unpadded_sizes=unpadded, mask_stride=self.mask_stride
        )

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.0,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_coco_annotation: bool = False,
        return_binary_maps: bool = False,
        ensemble_alpha: float | None = None,
        label_ids_to_fuse: Iterable[int] | None = None,
        top_k: int | None = INSTANCE_TOP_K,
        min_area: int = 0,
        mask_iou_threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """Instance segmentation per image (thing classes only when the processor knows the stuff classes), with
        detectron2 Mask2Former's defaults: the 100 best (query, class) pairs per image, no score threshold.

        Instances are sorted by decreasing score and numbered ``0..n-1``; in ``segmentation`` each pixel holds the
        best-scoring instance covering it (-1 = none). ``return_binary_maps`` gives ``(n, H, W)`` binary masks
        instead (overlaps kept), ``return_coco_annotation`` a list of COCO uncompressed RLE dicts (``{"size",
        "counts"}``, column-major, one per instance, usable with ``pycocotools.mask.frPyObjects``).

        Args:
            outputs: model outputs (as for :meth:`post_process_panoptic_segmentation`).
            threshold: minimal instance score (class probability x mean mask probability); 0.0 keeps every candidate.
            mask_threshold: binarisation threshold of the mask probabilities.
            overlap_mask_area_threshold: accepted for API compatibility with transformers, not used.
            target_sizes: ``(height, width)`` per image; ``None`` = the unpadded input size.
            return_coco_annotation: return COCO RLE dicts instead of the id map.
            return_binary_maps: return ``(n, H, W)`` binary masks instead of the id map.
            ensemble_alpha: decoder weight in Eq. 6; ``None`` = ``self.ensemble_alpha``.
            label_ids_to_fuse: classes to drop (default: the processor's stuff classes; pass ``[]`` to keep all).
            top_k: candidate (query, class) pairs per image; ``None`` = one per query.
            min_area: drop instances with fewer pixels at the target size (0 = keep all).
            mask_iou_threshold: drop an instance whose mask has an IoU above this with a higher-scoring instance of
                the same class (fewer duplicates); ``None`` = keep them.
        """
        del overlap_mask_area_threshold
        if return_coco_annotation and return_binary_maps:
            raise ValueError("return_coco_annotation and return_binary_maps can not both be True")
        probs, masks, unpadded, target_sizes = self._probs_and_sizes(outputs, target_sizes, ensemble_alpha)
        results = instance_inference(
            probs, masks, threshold=threshold, top_k=top_k, min_area=min_area, mask_iou_threshold=mask_iou_threshold,
            return_binary_masks=return_binary_maps or return_coco_annotation,
            **self._inference_kwargs(mask_threshold, label_ids_to_fuse, target_sizes, unpadded),
        )
        formatted = []
        for r in results:
            info = [
                {"id": i, "label_id": int(lab), "was_fused": False, "score": float(score)}
                for i, (lab, score) in enumerate(zip(r.labels.tolist(), r.scores.tolist()))
            ]
            if return_coco_annotation:
                segmentation: Any = [binary_mask_to_coco_rle(m) for m in r.binary_masks]
            elif return_binary_maps:
                segmentation = r.binary_masks
            else:
                segmentation = r.segmentation.to(torch.int32)
            formatted.append({"segmentation": segmentation, "segments_info": info})
        return formatted


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def binary_mask_to_coco_rle(mask: torch.Tensor) -> dict[str, Any]:
    """COCO uncompressed RLE (column-major runs, starting with background) of an ``(H, W)`` binary mask."""
    height, width = mask.shape
    flat = mask.t().reshape(-1).to(torch.int8)
    change = (flat[1:] != flat[:-1]).nonzero(as_tuple=True)[0] + 1
    end = torch.tensor([flat.numel()], device=flat.device)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long, device=flat.device), change, end])
    counts = torch.diff(bounds)
    if flat.numel() and int(flat[0]) == 1:
        counts = torch.cat([counts.new_zeros(1), counts])
    return {"size": [int(height), int(width)], "counts": counts.tolist()}


def _check_size(size: dict[str, int]) -> dict[str, int]:
    if "shortest_edge" in size:
        if int(size["shortest_edge"]) <= 0:
            raise ValueError("size['shortest_edge'] must be positive")
        out = {"shortest_edge": int(size["shortest_edge"])}
        if size.get("longest_edge") is not None:
            out["longest_edge"] = int(size["longest_edge"])
        return out
    if "height" in size and "width" in size:
        return {"height": int(size["height"]), "width": int(size["width"])}
    raise ValueError(f"size must have 'shortest_edge' (and optionally 'longest_edge') or 'height' and 'width': {size}")


def _output_size(hw: Sequence[int], size: Mapping[str, int]) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``, or a fixed size."""
    h, w = int(hw[0]), int(hw[1])
    if "height" in size:
        return int(size["height"]), int(size["width"])
    short = size["shortest_edge"]
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    longest = size.get("longest_edge")
    if longest is not None and max(new_h, new_w) > longest:
        scale = longest / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    # At least one pixel: an extreme aspect ratio (e.g. 3 x 1000) must not round a side to zero.
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def _resize_nearest(ids: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer map (pixel-centre aligned, exact for integer ids)."""
    h, w = ids.shape
    if (h, w) == tuple(out_hw):
        return ids
    rows = ((torch.arange(out_hw[0], dtype=torch.float64) + 0.5) * (h / out_hw[0])).floor().long().clamp_max(h - 1)
    cols = ((torch.arange(out_hw[1], dtype=torch.float64) + 0.5) * (w / out_hw[1])).floor().long().clamp_max(w - 1)
    return ids[rows][:, cols]


def _is_image_like(x: Any) -> bool:
    return (Image is not None and isinstance(x, Image.Image)) or isinstance(x, (np.ndarray, torch.Tensor))


def _as_list(x: Any, name: str, is_map: bool = False) -> list[Any]:
    """Single image / batch array / list -> list of single items."""
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name} is empty")
        items = list(x)
    elif isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 4 and not is_map:
        items = list(x)
    elif isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3 and is_map and x.shape[-1] not in (3, 4):
        items = list(x)  # batch of (H, W) id maps
    else:
        items = [x]
    for i, item in enumerate(items):
        if not _is_image_like(item):
            raise TypeError(
                f"{name}[{i}] has unsupported type {type(item).__name__}; expected a PIL image, a numpy array or a "
                "torch tensor (load files with PIL.Image.open)"
            )
    return items


def _image_to_tensor(image: Any, data_format: str | None, do_rescale: bool, rescale_factor: float) -> torch.Tensor:
    """Any supported image -> float32 ``(3, H, W)`` in [0, 1]."""
    prefer_first = False
    if Image is not None and isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image))  # every PIL mode as the project's image reader sees it
    elif isinstance(image, np.ndarray):
        array = image
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        prefer_first = True
    else:  # pragma: no cover - filtered by _as_list
        raise TypeError(f"unsupported image type {type(image).__name__}")
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    else:
        tensor = array
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3:
        if data_format is not None:
            data_format = str(getattr(data_format, "value", data_format))
            if data_format not in ("channels_first", "channels_last"):
                raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {data_format}")
            channels_first = data_format == "channels_first"
        else:
            first_ok, last_ok = tensor.shape[0] in (1, 3, 4), tensor.shape[-1] in (1, 3, 4)
            if not (first_ok or last_ok):
                raise ValueError(
                    f"cannot find the channel dimension of an image with shape {tuple(tensor.shape)}; expected 1, 3 "
                    "or 4 channels"
                )
            channels_first = first_ok if (prefer_first or not last_ok) else False
        if not channels_first:
            tensor = tensor.permute(2, 0, 1)
    else:
        raise ValueError(f"images must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}")
    channels = tensor.shape[0]
    if channels not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels, got {channels}")
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ValueError(f"image has an empty dimension: {tuple(tensor.shape)}")
    if channels == 1:
        tensor = tensor.expand(3, -1, -1)
    elif channels == 4:
        tensor = tensor[:3]
    if tensor.dtype == torch.bool:
        return tensor.float().contiguous()
    if tensor.is_floating_point():
        tensor = tensor.float()
        lo, hi = float(tensor.min()), float(tensor.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"float images must have values in [0, 1] (got [{lo:.3g}, {hi:.3g}]); pass uint8 images or divide "
                "by 255"
            )
        return tensor.clamp(0.0, 1.0).contiguous()
    if tensor.dtype == torch.uint8:
        scale = rescale_factor
    elif tensor.dtype == getattr(torch, "uint16", None):
        scale = 1 / 65535
    else:
        raise ValueError(f"unsupported image dtype {tensor.dtype}; use uint8, uint16, bool or float in [0, 1]")
    tensor = tensor.float()
    return (tensor * scale if do_rescale else tensor).contiguous()


def _map_to_ids(seg: Any, panoptic: bool) -> torch.Tensor:
    """A segmentation map -> int64 ``(H, W)`` ids (COCO RGB id-PNGs decoded with :func:`rgb_to_id`)."""
    if Image is not None and isinstance(seg, Image.Image):
        if seg.mode in ("RGB", "RGBA"):
            return torch.from_numpy(rgb_to_id(np.asarray(seg.convert("RGB"))).astype(np.int64))
        array = np.asarray(seg)
    elif isinstance(seg, torch.Tensor):
        array = seg.detach().cpu().numpy()
    else:
        array = np.asarray(seg)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if array.dtype != np.uint8:
            raise ValueError("RGB-encoded segmentation maps must be uint8 (COCO panoptic PNG colours)")
        if not panoptic:
            raise ValueError("RGB panoptic id maps need instance_id_to_semantic_id")
        return torch.from_numpy(rgb_to_id(array[..., :3]).astype(np.int64))
    if array.ndim != 2:
        raise ValueError(f"segmentation maps must be (H, W) ids or (H, W, 3) COCO colours, got {array.shape}")
    if array.dtype.kind == "f":
        if not np.all(np.mod(array, 1) == 0):
            raise ValueError("segmentation maps must hold integer ids")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"unsupported segmentation map dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.int64))


def _per_image_mappings(mapping: Any, batch: int) -> list[Mapping[int, int] | None]:
    if mapping is None:
        return [None] * batch
    if isinstance(mapping, Mapping):
        return [{int(k): int(v) for k, v in mapping.items()}] * batch
    mappings = list(mapping)
    if len(mappings) != batch:
        raise ValueError(f"got {len(mappings)} instance_id_to_semantic_id mappings for {batch} images")
    return [{int(k): int(v) for k, v in m.items()} for m in mappings]


# Saved processors carry `auto_map` and a copy of this file (and its sibling imports), so that
# `AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)` works where this package is not installed.
DearliImageProcessor.register_for_auto_class("AutoImageProcessor")
