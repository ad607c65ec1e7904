"""The student's unlabeled batch of DEARLi's semi-supervised stage (paper Sec. 3): the teacher's hard pseudo-labels
of the weak view, and the strong view they supervise. One step (``L = L_sup + L_unl``) is
:class:`training.ssl.MeanTeacherStep`; this module is its unlabeled half.

Per step and process, :class:`StudentViewBuilder` takes the unlabeled batch of
:class:`training.data.train_datasets.UnlabeledTrainDataset`:

1. **weak view** (the loop's random scale, crop and flip; RGB in ``[0, 1]``) -> teacher (EMA weights, eval mode,
   ``no_grad``) -> ensembled posteriors (Eq. 6) -> panoptic inference -> hard pseudo-labels
   (:func:`training.pseudo_labels.panoptic_pseudo_labels`);
2. **strong view** of the same crop: colour jitter, grayscale, blur (:mod:`training.data.strong_augmentations`), padding
   reset to the CLIP mean, then CutMix (probability 0.5 per image): a box of a *separate unlabeled crop* (the data
   loader's ``cutmix_pixel_values``: another random unlabeled image with its own scale / crop / flip, its own strong
   jitter) is pasted together with that crop's pseudo-label, which the teacher computes in a second forward pass on
   the crops whose box is not empty -- as the reference does; the box lies inside the source crop's real content.
   ``cutmix_source="same_batch"`` pastes from the next image of the local batch instead (no second teacher pass and
   no extra image to load: about a third less teacher compute per step, but the pasted content and its label come
   from the same few images as the batch, and the box may cover the source's padding; with one unlabeled image per
   process CutMix is then skipped). Segment ids stay distinct, stuff segments are fused per class;
3. Mask2Former targets (``mask_labels``, ``class_labels``) of the mixed pseudo-labels, and the normalised strong
   view: :meth:`UnlabeledTargets.model_inputs`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch

from modeling_dearli.ensembling import resolve_ensemble_alpha

from .data.collator import pad_to_size
from .data.strong_augmentations import StrongAugmentation, boxes_to_masks, cutmix, cutmix_panoptic_labels
from .data.transforms import CLIP_MEAN, normalize_image
from .ema import MeanTeacher
from .pseudo_labels import PanopticPseudoLabels, panoptic_pseudo_labels, segments_to_targets

__all__ = [
    "CUTMIX_SOURCES",
    "StudentViewBuilder",
    "UnlabeledTargets",
    "strong_augmentation_generator",
]

logger = logging.getLogger(__name__)

# Where CutMix boxes come from: a separate unlabeled crop labelled by a second teacher pass (the reference), or the
# next image of the batch.
CUTMIX_SOURCES = ("separate_image", "same_batch")


@dataclass
class UnlabeledTargets:
    """The student's unlabeled inputs: normalised strong views and Mask2Former targets from the pseudo-labels."""

    pixel_values: torch.Tensor
    mask_labels: list[torch.Tensor]
    class_labels: list[torch.Tensor]
    pseudo_labels: PanopticPseudoLabels
    cutmix_applied: int
    statistics: dict[str, float] = field(default_factory=dict)

    def model_inputs(self) -> dict[str, Any]:
        """The student's forward arguments (strong views and their pseudo-label targets)."""
        return {"pixel_values": self.pixel_values, "mask_labels": self.mask_labels, "class_labels": self.class_labels}


class StudentViewBuilder:
    """Weak view -> teacher pseudo-labels; strong view (+ CutMix) -> the student's unlabeled inputs and targets.

    Args:
        teacher: the EMA teacher.
        strong_augmentation: photometric strong augmentation and CutMix settings.
        stuff_ids: contiguous stuff class ids (fused in inference and CutMix).
        num_classes: number of classes (size of the stuff lookup).
        ensemble_alpha: Eq. 6 weight of the teacher's decoder posterior (1.0 = decoder only); ``None`` = the teacher
            model's ``config.ensemble_alpha``.
        threshold, overlap_threshold: panoptic inference of the teacher (paper 0.0 / 0.8).
        cutmix: enable CutMix.
        cutmix_source: ``"separate_image"`` (the reference: boxes from the separate crops given to ``__call__``,
            labelled by a second teacher pass) or ``"same_batch"`` (the next image of the batch; see the module
            docstring for the trade-off).
        teacher_autocast: context manager factory wrapping the teacher's forwards only (e.g. ``accelerator.autocast``);
            pseudo-labels and augmentations run in float32.
    """

    def __init__(
        self,
        teacher: MeanTeacher,
        strong_augmentation: StrongAugmentation,
        *,
        stuff_ids: Iterable[int],
        num_classes: int,
        ensemble_alpha: float | None = None,
        threshold: float = 0.0,
        overlap_threshold: float = 0.8,
        cutmix: bool = True,
        cutmix_source: str = "separate_image",
        teacher_autocast: Callable[[], ContextManager] | None = None,
    ) -> None:
        if cutmix_source not in CUTMIX_SOURCES:
            raise ValueError(f"unknown cutmix_source {cutmix_source!r}; known: {CUTMIX_SOURCES}")
        self.teacher = teacher
        self.strong_augmentation = strong_augmentation
        self.stuff_ids = sorted(int(c) for c in stuff_ids)
        self.num_classes = int(num_classes)
        self.ensemble_alpha = resolve_ensemble_alpha(ensemble_alpha, teacher.teacher.config)
        self.threshold = threshold
        self.overlap_threshold = overlap_threshold
        self.cutmix = cutmix
        self.cutmix_source = cutmix_source
        self.teacher_autocast = teacher_autocast or contextlib.nullcontext
        self._warned_single = False

    def pseudo_labels(self, images: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> PanopticPseudoLabels:
        """Teacher forward on weak views ``(B, 3, H, W)`` in ``[0, 1]`` -> hard pseudo-labels at the input size."""
        with self.teacher_autocast():
            teacher_outputs = self.teacher(
                pixel_values=normalize_image(images), pixel_mask=pixel_mask,
                output_clip_logits=self.ensemble_alpha < 1.0,
            )
        return panoptic_pseudo_labels(
            teacher_outputs,
            stuff_ids=self.stuff_ids,
            ensemble_alpha=self.ensemble_alpha,
            image_size=tuple(images.shape[-2:]),
            threshold=self.threshold,
            overlap_threshold=self.overlap_threshold,
        )

    def _strong(self, images: torch.Tensor, pixel_mask: torch.Tensor | None, generator: torch.Generator
                ) -> torch.Tensor:
        """Photometric strong view, padding reset to the CLIP mean."""
        strong = self.strong_augmentation(images, generator)
        if pixel_mask is not None:
            mean = torch.tensor(CLIP_MEAN, dtype=strong.dtype, device=strong.device).view(1, 3, 1, 1)
            strong = torch.where(pixel_mask[:, None].bool(), strong, mean)
        return strong

    @torch.no_grad()
    def __call__(self, unlabeled_batch: Mapping[str, Any], generator: torch.Generator) -> UnlabeledTargets:
        """The student's unlabeled inputs and targets from a batch of weak views.

        ``unlabeled_batch``: ``pixel_values`` ``(B, 3, H, W)`` in ``[0, 1]``, optional ``pixel_mask`` ``(B, H, W)``,
        and with ``cutmix_source="separate_image"`` the separate CutMix crops ``cutmix_pixel_values`` /
        ``cutmix_pixel_mask`` (one per image, as tensors or lists of tensors). `generator` draws every random choice.
        """
        weak_images = unlabeled_batch["pixel_values"].float()
        pixel_mask = unlabeled_batch.get("pixel_mask")
        cutmix_images, cutmix_pixel_mask = (_stacked(unlabeled_batch.get(key))
                                            for key in ("cutmix_pixel_values", "cutmix_pixel_mask"))
        batch = weak_images.shape[0]
        pseudo = self.pseudo_labels(weak_images, pixel_mask)
        statistics = pseudo.statistics()
        strong = self._strong(weak_images, pixel_mask, generator)
        segmentation, labels = pseudo.segmentation, list(pseudo.labels)
        applied = 0
        if self.cutmix and self.cutmix_source == "separate_image":
            if cutmix_images is None:
                raise ValueError("cutmix_source='separate_image' needs the separate CutMix crops (cutmix_images): "
                                 "build the unlabeled data with UnlabeledTrainDataset(..., cutmix_source=True)")
            strong, segmentation, labels, applied = self._cutmix_separate(
                strong, segmentation, labels, cutmix_images.float(), cutmix_pixel_mask, generator)
        elif self.cutmix and batch > 1:
            strong, segmentation, labels, applied = self._cutmix_same_batch(strong, segmentation, labels, generator)
        elif self.cutmix and not self._warned_single:
            logger.warning("CutMix from the same batch needs at least 2 unlabeled images per process; it is skipped")
            self._warned_single = True
        mask_labels, class_labels = segments_to_targets(segmentation, labels)
        statistics["cutmix_fraction"] = applied / max(1, batch)
        return UnlabeledTargets(normalize_image(strong), mask_labels, class_labels, pseudo, applied, statistics)

    def _is_stuff(self, device: torch.device) -> torch.Tensor:
        is_stuff = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        is_stuff[self.stuff_ids] = True
        return is_stuff

    def _cutmix_separate(
        self,
        strong: torch.Tensor,
        segmentation: torch.Tensor,
        labels: list[torch.Tensor],
        source_images: torch.Tensor,
        source_mask: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]:
        """The reference's CutMix: a box inside each source crop's real content (probability ``cutmix_prob``), the
        teacher's pseudo-label of the sources that got a box (second pass), their own strong view pasted."""
        batch, _, height, width = strong.shape
        crop_height, crop_width = source_images.shape[-2:]
        if (crop_height, crop_width) != (height, width) and crop_height <= height and crop_width <= width:
            # The collator pads the batch's own crops to a multiple of 32 (a --crop_size of 48 gives 64), not these
            # separate ones: padded alike, with their padding outside the mask, they paste the same content.
            if source_mask is None:
                source_mask = torch.ones(batch, crop_height, crop_width, dtype=torch.long)
            source_images = pad_to_size(source_images, height, width, 0.0)
            source_mask = pad_to_size(source_mask, height, width, 0)
        if tuple(source_images.shape) != tuple(strong.shape):
            raise ValueError(f"CutMix crops {tuple(source_images.shape)} must match the batch {tuple(strong.shape)}")
        boxes = torch.zeros(batch, 4, dtype=torch.long)
        for b in range(batch):
            valid = (height, width)
            if source_mask is not None:
                rows, cols = source_mask[b].bool().any(1), source_mask[b].bool().any(0)
                valid = (int(rows.sum()), int(cols.sum()))
            boxes[b] = self.strong_augmentation.cutmix_boxes(1, valid, generator)[0]
        selected = [b for b in range(batch) if bool((boxes[b, 2:] > boxes[b, :2]).all())]
        if not selected:
            return strong, segmentation, labels, 0
        index = torch.tensor(selected, device=source_images.device)
        sources = source_images.index_select(0, index)
        sources_mask = None if source_mask is None else source_mask.index_select(0, index)
        source_pseudo = self.pseudo_labels(sources, sources_mask)
        source_strong = self._strong(sources, sources_mask, generator)
        box_masks = boxes_to_masks(boxes[selected], (height, width), strong.device)
        is_stuff = self._is_stuff(segmentation.device)
        strong, mixed = strong.clone(), segmentation.clone()
        for k, b in enumerate(selected):
            strong[b] = torch.where(box_masks[k][None], source_strong[k], strong[b])
            mixed[b], labels[b], _ = cutmix_panoptic_labels(
                segmentation[b], labels[b], source_pseudo.segmentation[k], source_pseudo.labels[k], box_masks[k],
                is_stuff,
            )
        return strong, mixed, labels, len(selected)

    def _cutmix_same_batch(
        self, strong: torch.Tensor, segmentation: torch.Tensor, labels: list[torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]:
        """CutMix with the next image of the batch as the source (no extra image, no second teacher pass)."""
        batch, _, height, width = strong.shape
        boxes = self.strong_augmentation.cutmix_boxes(batch, (height, width), generator)
        source = torch.roll(torch.arange(batch), -1)
        strong, box_masks = cutmix(strong, boxes, strong[source.to(strong.device)])
        is_stuff = self._is_stuff(segmentation.device)
        mixed, original = segmentation.clone(), list(labels)
        applied = 0
        for b in range(batch):
            if not bool(box_masks[b].any()):
                continue
            j = int(source[b])
            mixed[b], labels[b], _ = cutmix_panoptic_labels(
                segmentation[b], original[b], segmentation[j], original[j], box_masks[b], is_stuff
            )
            applied += 1
        return strong, mixed, labels, applied


def strong_augmentation_generator(seed: int, step: int, process_index: int) -> torch.Generator:
    """The strong-augmentation RNG of one step and process (a pure function: a resumed run draws the same)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + process_index)


def _stacked(value: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor | None:
    """A batch tensor from a tensor or the collator's list of per-image tensors."""
    if value is None or torch.is_tensor(value):
        return value
    return torch.stack(list(value))
