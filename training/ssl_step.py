"""One Mean Teacher step of DEARLi's semi-supervised stage (paper Sec. 3, Eq. 1-2), shared by ``training/ssl.py`` and
``scripts/benchmarks/benchmark_training.py``.

Per step and process:

1. **weak view** (:class:`training.data.train_datasets.UnlabeledTrainDataset`: the loop's random scale, crop and
   flip; RGB in ``[0, 1]``) -> teacher (EMA weights, eval mode, ``no_grad``) -> ensembled posteriors
   (Eq. 6) -> panoptic inference -> hard pseudo-labels (:mod:`training.pseudo_labels`);
2. **strong view** of the same crop: colour jitter, grayscale, blur (:mod:`training.data.strong_augmentations`), padding
   reset to the CLIP mean, then CutMix (probability 0.5 per image): a box of a *separate unlabeled crop* (the data
   loader's ``cutmix_pixel_values``: another random unlabeled image with its own scale / crop / flip, its own strong
   jitter) is pasted together with that crop's pseudo-label, which the teacher computes in a second forward pass on
   the crops whose box is not empty -- as the reference does; the box lies inside the source crop's real content.
   ``cutmix_source="same_batch"`` pastes from the next image of the local batch instead (no second teacher pass and
   no extra image to load: about a third less teacher compute per step, but the pasted content and its label come
   from the same few images as the batch, and the box may cover the source's padding; with one unlabeled image per
   process CutMix is then skipped). Segment ids stay distinct, stuff segments are fused per class;
3. **losses**: ``L = L_sup(labeled) + L_unl(strong view, pseudo-labels)`` with the model's Mask2Former loss. The two
   terms are back-propagated one after the other (the first under ``accelerator.no_sync``), which gives exactly the
   gradient of their sum while keeping the activations of only one half-batch alive: the SSL step's peak memory
   stays close to the supervised step's;
4. guarded AdamW + poly step, then the EMA update of the teacher (identical on every process).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch

from modeling_dearli.ensembling import resolve_ensemble_alpha

from .data.collator import model_inputs
from .data.strong_augmentations import StrongAugmentation, boxes_to_masks, cutmix, cutmix_panoptic_labels
from .data.transforms import CLIP_MEAN, normalize_image
from .ema import MeanTeacher
from .loop import StepOutput, check_finite_loss, clip_and_check_gradients, final_layer_terms
from .pseudo_labels import PanopticPseudoLabels, panoptic_pseudo_labels, segments_to_targets

__all__ = [
    "CUTMIX_SOURCES",
    "SSLStepOutput",
    "StudentViewBuilder",
    "UnlabeledTargets",
    "ssl_train_step",
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


class StudentViewBuilder:
    """Weak view -> teacher pseudo-labels; strong view (+ CutMix) -> the student's unlabeled inputs and targets.

    Args:
        teacher: the EMA teacher.
        strong_augmentation: photometric strong augmentation and CutMix settings.
        stuff_classes: contiguous stuff class ids (fused in inference and CutMix).
        num_classes: number of classes (size of the stuff lookup).
        ensemble_alpha: Eq. 6 weight of the teacher's decoder posterior (1.0 = decoder only); ``None`` = the teacher
            model's ``config.ensemble_alpha``.
        threshold, overlap_threshold: panoptic inference of the teacher (paper 0.0 / 0.8).
        cutmix: enable CutMix.
        cutmix_source: ``"separate_image"`` (the reference: boxes from the separate crops given to ``__call__``,
            labelled by a second teacher pass) or ``"same_batch"`` (the next image of the batch; see the module
            docstring for the trade-off).
    """

    def __init__(
        self,
        teacher: MeanTeacher,
        strong_augmentation: StrongAugmentation,
        *,
        stuff_classes: Iterable[int],
        num_classes: int,
        ensemble_alpha: float | None = None,
        threshold: float = 0.0,
        overlap_threshold: float = 0.8,
        cutmix: bool = True,
        cutmix_source: str = "separate_image",
    ) -> None:
        if cutmix_source not in CUTMIX_SOURCES:
            raise ValueError(f"unknown cutmix_source {cutmix_source!r}; known: {CUTMIX_SOURCES}")
        self.teacher = teacher
        self.strong_augmentation = strong_augmentation
        self.stuff_classes = sorted(int(c) for c in stuff_classes)
        self.num_classes = int(num_classes)
        self.ensemble_alpha = resolve_ensemble_alpha(ensemble_alpha, teacher.teacher.config)
        self.threshold = threshold
        self.overlap_threshold = overlap_threshold
        self.cutmix = cutmix
        self.cutmix_source = cutmix_source
        self._warned_single = False

    def _pseudo_labels(
        self, images: torch.Tensor, pixel_mask: torch.Tensor | None, teacher_context: Callable[[], ContextManager] | None
    ) -> PanopticPseudoLabels:
        """Teacher forward on weak views ``(B, 3, H, W)`` in ``[0, 1]`` -> hard pseudo-labels at the input size."""
        with (teacher_context or contextlib.nullcontext)():
            teacher_outputs = self.teacher(
                pixel_values=normalize_image(images), pixel_mask=pixel_mask,
                output_clip_logits=self.ensemble_alpha < 1.0,
            )
        return panoptic_pseudo_labels(
            teacher_outputs,
            stuff_classes=self.stuff_classes,
            ensemble_alpha=self.ensemble_alpha,
            image_size=tuple(images.shape[-2:]),
            threshold=self.threshold,
            overlap_threshold=self.overlap_threshold,
        )

    def _strong(self, images: torch.Tensor, pixel_mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """Photometric strong view, padding reset to the CLIP mean."""
        strong = self.strong_augmentation(images, generator)
        if pixel_mask is not None:
            mean = torch.tensor(CLIP_MEAN, dtype=strong.dtype, device=strong.device).view(1, 3, 1, 1)
            strong = torch.where(pixel_mask[:, None].bool(), strong, mean)
        return strong

    @torch.no_grad()
    def __call__(
        self,
        weak_images: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        generator: torch.Generator,
        teacher_context: Callable[[], ContextManager] | None = None,
        cutmix_images: torch.Tensor | None = None,
        cutmix_pixel_mask: torch.Tensor | None = None,
    ) -> UnlabeledTargets:
        """Build the student's unlabeled batch from weak views ``(B, 3, H, W)`` in ``[0, 1]``.

        ``cutmix_images`` / ``cutmix_pixel_mask``: the separate CutMix source crops ``(B, 3, H, W)`` (weak views,
        one per image; needed with ``cutmix_source="separate_image"``). ``teacher_context`` (e.g.
        ``accelerator.autocast``) wraps the teacher forwards only; pseudo-labels and augmentations run in float32.
        """
        batch = weak_images.shape[0]
        pseudo = self._pseudo_labels(weak_images, pixel_mask, teacher_context)
        statistics = pseudo.statistics()
        strong = self._strong(weak_images, pixel_mask, generator)
        segmentation, labels = pseudo.segmentation, list(pseudo.labels)
        applied = 0
        if self.cutmix and self.cutmix_source == "separate_image":
            if cutmix_images is None:
                raise ValueError("cutmix_source='separate_image' needs the separate CutMix crops (cutmix_images): build "
                                 "the unlabeled data with UnlabeledTrainDataset(..., cutmix_source=True)")
            strong, segmentation, labels, applied = self._cutmix_separate(
                strong, segmentation, labels, cutmix_images, cutmix_pixel_mask, generator, teacher_context)
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
        is_stuff[self.stuff_classes] = True
        return is_stuff

    def _cutmix_separate(
        self,
        strong: torch.Tensor,
        segmentation: torch.Tensor,
        labels: list[torch.Tensor],
        source_images: torch.Tensor,
        source_mask: torch.Tensor | None,
        generator: torch.Generator,
        teacher_context: Callable[[], ContextManager] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]:
        """The reference's CutMix: a box inside each source crop's real content (probability ``cutmix_p``), the
        teacher's pseudo-label of the sources that got a box (second pass), their own strong view pasted."""
        batch, _, height, width = strong.shape
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
        source_pseudo = self._pseudo_labels(sources, sources_mask, teacher_context)
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


@dataclass
class SSLStepOutput:
    """Detached results of one SSL step."""

    loss: float
    labeled_loss: float
    unlabeled_loss: float
    grad_norm: float
    ema_decay: float
    labeled_terms: dict[str, float]
    unlabeled_terms: dict[str, float]
    pseudo_label_statistics: dict[str, float]

    def step_output(self) -> StepOutput:
        """The loop's view: losses and pseudo-label statistics averaged for logging; the rest as it is."""
        metrics = {"loss": self.loss, "loss_labeled": self.labeled_loss, "loss_unlabeled": self.unlabeled_loss}
        metrics.update({f"pseudo/{k}": v for k, v in self.pseudo_label_statistics.items()})
        last = {"grad_norm": self.grad_norm, "ema_decay": self.ema_decay}
        last.update({f"labeled/{k}": v for k, v in self.labeled_terms.items()})
        last.update({f"unlabeled/{k}": v for k, v in self.unlabeled_terms.items()})
        return StepOutput(metrics, last)


def strong_augmentation_generator(seed: int, step: int, process_index: int) -> torch.Generator:
    """The strong-augmentation RNG of one step and process (a pure function: a resumed run draws the same)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + process_index)


def ssl_train_step(
    accelerator: Any,
    model: torch.nn.Module,
    teacher: MeanTeacher,
    view_builder: StudentViewBuilder,
    optimizer: Any,
    scheduler: Any,
    labeled_batch: Mapping[str, Any],
    unlabeled_batch: Mapping[str, Any],
    generator: torch.Generator,
    step: int,
    *,
    parameters: list[torch.nn.Parameter] | None = None,
    gradient_clip: float = 0.0,
    unlabeled_weight: float = 1.0,
    separate_backward: bool = True,
) -> SSLStepOutput:
    """One optimisation step ``L_sup + unlabeled_weight * L_unl`` followed by the EMA update of the teacher.

    ``separate_backward`` (default) back-propagates the two terms one after the other (same gradients, half the
    activation memory); ``False`` does one backward of the sum.

    Non-finite losses or gradient norms raise :class:`training.checkpointing.NonFiniteError` on every process before
    the weights change.
    """
    if parameters is None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    cutmix_images = unlabeled_batch.get("cutmix_pixel_values")
    cutmix_mask = unlabeled_batch.get("cutmix_pixel_mask")
    targets = view_builder(
        unlabeled_batch["pixel_values"].float(), unlabeled_batch.get("pixel_mask"), generator,
        teacher_context=accelerator.autocast,
        cutmix_images=None if cutmix_images is None else torch.stack(list(cutmix_images)).float(),
        cutmix_pixel_mask=None if cutmix_mask is None else torch.stack(list(cutmix_mask)),
    )

    labeled_inputs = model_inputs(labeled_batch)
    unlabeled_inputs = {"pixel_values": targets.pixel_values, "mask_labels": targets.mask_labels,
                        "class_labels": targets.class_labels}
    if separate_backward:
        # Labeled half: no gradient synchronisation yet (gradients accumulate locally).
        with accelerator.no_sync(model):
            labeled = model(**labeled_inputs)
            labeled_loss = labeled.loss
            check_finite_loss(accelerator, labeled_loss, step, labeled.loss_dict)
            accelerator.backward(labeled_loss)
            labeled_value, labeled_terms = float(labeled_loss.detach().float()), final_layer_terms(labeled.loss_dict)
            del labeled, labeled_loss
        # Unlabeled half: strong views with pseudo-labels; this backward synchronises the summed gradients.
        unlabeled = model(**unlabeled_inputs)
        unlabeled_loss = unlabeled.loss * unlabeled_weight
        check_finite_loss(accelerator, unlabeled_loss, step, unlabeled.loss_dict)
        accelerator.backward(unlabeled_loss)
        unlabeled_value = float(unlabeled_loss.detach().float())
        unlabeled_terms = final_layer_terms(unlabeled.loss_dict)
        del unlabeled, unlabeled_loss
    else:
        # One backward of the summed loss (both halves' activations alive at once; for comparison / benchmarks).
        labeled = model(**labeled_inputs)
        unlabeled = model(**unlabeled_inputs)
        loss = labeled.loss + unlabeled.loss * unlabeled_weight
        check_finite_loss(accelerator, loss, step, {**(labeled.loss_dict or {}), **{
            f"unlabeled_{k}": v for k, v in (unlabeled.loss_dict or {}).items()}})
        accelerator.backward(loss)
        labeled_value, labeled_terms = float(labeled.loss.detach().float()), final_layer_terms(labeled.loss_dict)
        unlabeled_value = float(unlabeled.loss.detach().float()) * unlabeled_weight
        unlabeled_terms = final_layer_terms(unlabeled.loss_dict)
        del labeled, unlabeled, loss

    grad_norm = clip_and_check_gradients(accelerator, parameters, gradient_clip, step)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    decay = teacher.update(model)
    return SSLStepOutput(
        loss=labeled_value + unlabeled_value,
        labeled_loss=labeled_value,
        unlabeled_loss=unlabeled_value,
        grad_norm=grad_norm,
        ema_decay=decay,
        labeled_terms=labeled_terms,
        unlabeled_terms=unlabeled_terms,
        pseudo_label_statistics=targets.statistics,
    )
