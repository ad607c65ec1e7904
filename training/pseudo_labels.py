"""Hard panoptic pseudo-labels from the teacher (paper Sec. 3.2): ensembled posteriors (Eq. 6) -> standard panoptic
inference -> id maps and segment classes -> Mask2Former ``mask_labels`` / ``class_labels`` for the student.

Nothing here re-implements inference: the posteriors come from :func:`modeling_dearli.ensembling.class_probabilities`
(the one Eq. 6 implementation, with the teacher's ``ensemble_alpha``) and the segments from
:func:`modeling_dearli.segmentation_inference.panoptic_inference` (detectron2 convention; DEARLi uses threshold 0.0,
overlap 0.8, stuff classes fused), evaluated on the device of the teacher outputs at the input resolution. Padding
(outside ``unpadded_sizes``) is void (``-1``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from modeling_dearli.ensembling import class_probabilities, output_field
from modeling_dearli.segmentation_inference import panoptic_inference

__all__ = ["PanopticPseudoLabels", "panoptic_pseudo_labels", "segments_to_targets"]

NO_SEGMENT = -1  # pixels no pseudo-label segment covers (void, padding)


@dataclass
class PanopticPseudoLabels:
    """Hard panoptic pseudo-labels of a batch.

    Attributes:
        segmentation: ``(B, H, W)`` int64 segment ids ``1..n_i`` per image, ``-1`` for void (and padding).
        labels: per image, ``(n_i,)`` contiguous class of segment ``k`` at index ``k - 1``.
        scores: per image, ``(n_i,)`` teacher confidence (max ensembled class probability of the segment's queries).
        valid: ``(B, H, W)`` bool, the non-padded region the teacher labelled.
    """

    segmentation: torch.Tensor
    labels: list[torch.Tensor]
    scores: list[torch.Tensor]
    valid: torch.Tensor

    def to_targets(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image ``mask_labels`` ``(n_i, H, W)`` float and ``class_labels`` ``(n_i,)`` int64."""
        return segments_to_targets(self.segmentation, self.labels)

    def statistics(self) -> dict[str, float]:
        """Batch statistics for logging: segments per image, mean segment confidence, void fraction of valid pixels."""
        num_segments = [int(labels.numel()) for labels in self.labels]
        scores = torch.cat([s.float().reshape(-1) for s in self.scores]) if self.scores else torch.zeros(0)
        valid = self.valid.sum().clamp_min(1)
        void = ((self.segmentation < 1) & self.valid).sum()
        return {
            "segments_per_image": sum(num_segments) / max(1, len(num_segments)),
            "mean_confidence": float(scores.mean()) if scores.numel() else 0.0,
            "void_fraction": float(void.float() / valid.float()),
        }


def segments_to_targets(
    segmentation: torch.Tensor, labels: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Binary masks ``(n_i, H, W)`` float (segment ids ``1..n_i``) and classes ``(n_i,)`` per image.

    Segments without pixels are dropped (a CutMix may have covered them).
    """
    mask_labels, class_labels = [], []
    for seg, lab in zip(segmentation, labels):
        ids = torch.arange(1, lab.numel() + 1, device=seg.device)
        masks = seg[None] == ids[:, None, None]
        present = masks.flatten(1).any(1)
        mask_labels.append(masks[present].float())
        class_labels.append(lab.to(seg.device)[present].long())
    return mask_labels, class_labels


@torch.no_grad()
def panoptic_pseudo_labels(
    outputs,
    *,
    stuff_ids: Iterable[int] | torch.Tensor | None,
    ensemble_alpha: float,
    image_size: tuple[int, int] | None = None,
    unpadded_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
    threshold: float = 0.0,
    overlap_threshold: float = 0.8,
    mask_threshold: float = 0.5,
) -> PanopticPseudoLabels:
    """Teacher outputs -> hard panoptic pseudo-labels at the input resolution.

    Args:
        outputs: teacher forward output with ``class_queries_logits`` ``(B, Q, C+1)``, ``masks_queries_logits``
            ``(B, Q, H/4, W/4)`` and ``clip_class_logits`` ``(B, Q, C)`` (``None`` -> plain M2F).
        stuff_ids: contiguous ids of stuff classes (fused into one segment per class).
        ensemble_alpha: Eq. 6 weight of the decoder posterior (1.0 = decoder only).
        image_size: padded input ``(H, W)``; default ``4 x`` the mask resolution.
        unpadded_sizes: ``(B, 2)`` valid region per image; default ``outputs.unpadded_sizes`` or the whole input.
        threshold / overlap_threshold / mask_threshold: panoptic inference parameters (DEARLi: 0.0 / 0.8 / 0.5).
    """
    mask_logits = output_field(outputs, "masks_queries_logits")
    probs = class_probabilities(outputs, ensemble_alpha)
    batch = mask_logits.shape[0]
    device = mask_logits.device
    if image_size is None:
        image_size = (mask_logits.shape[-2] * 4, mask_logits.shape[-1] * 4)
    height, width = int(image_size[0]), int(image_size[1])
    if unpadded_sizes is None:
        unpadded_sizes = output_field(outputs, "unpadded_sizes")
    if unpadded_sizes is None:
        sizes = [(height, width)] * batch
    else:
        listed = unpadded_sizes.tolist() if torch.is_tensor(unpadded_sizes) else unpadded_sizes
        sizes = [(int(h), int(w)) for h, w in listed]
    mask_stride = height / mask_logits.shape[-2]
    segments = panoptic_inference(
        probs,
        mask_logits,
        threshold=threshold,
        mask_threshold=mask_threshold,
        overlap_threshold=overlap_threshold,
        stuff_ids=stuff_ids,
        output_sizes=sizes,
        unpadded_sizes=sizes,
        mask_stride=mask_stride,
    )
    segmentation = torch.full((batch, height, width), NO_SEGMENT, dtype=torch.long, device=device)
    valid = torch.zeros((batch, height, width), dtype=torch.bool, device=device)
    labels, scores = [], []
    for b, (seg, (h, w)) in enumerate(zip(segments, sizes)):
        segmentation[b, :h, :w] = seg.segmentation
        valid[b, :h, :w] = True
        labels.append(seg.labels)
        scores.append(seg.scores)
    return PanopticPseudoLabels(segmentation, labels, scores, valid)
