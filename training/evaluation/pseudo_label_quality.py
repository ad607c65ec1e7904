"""Pseudo-label quality, watched during semi-supervised training.

When the unlabeled images have ground truth (every benchmark partition's do, and so do the miniature world's), the SSL
loop can score, every ``--pseudo_label_eval_steps`` steps on a fixed subset of them (``--pseudo_label_eval_images``,
drawn once with ``--seed``):

- ``pseudo_labels/*``: PQ / PQ_th / PQ_st / SQ / RQ of the teacher's pseudo-labels: the teacher's ensembled
  posteriors (Eq. 6, the pseudo-labels' ``ensemble_alpha``) through the same panoptic inference and thresholds that
  label the weak views, on the whole image at the validation size;
- ``pseudo_labels_decoder_only/*``: the same teacher with its decoder posteriors only (absent when the pseudo-labels
  are decoder-only already);
- ``student_decoder_only/*``: the student's decoder posteriors.

The values (percent) are logged to the trackers, returned to the loop and appended to
``<output_dir>/pseudo_label_quality.jsonl`` (one line per evaluation; after a resume a step may appear twice, the later
line counts).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from torch import nn

from .validation import build_eval_loader, evaluate_panoptic, flatten_metrics

__all__ = ["PseudoLabelMonitor", "fixed_subset"]

METRICS = ("PQ", "PQ_th", "PQ_st", "SQ", "RQ")


def fixed_subset(dataset: Any, num_images: int, seed: int) -> Any:
    """`num_images` rows of `dataset` drawn once with `seed` (all of them when it has fewer), in index order."""
    if num_images >= len(dataset):
        return dataset
    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), num_images)))


class PseudoLabelMonitor:
    """``monitor(step)`` -> the pseudo-label and student metrics described in the module docstring.

    Args:
        accelerator: the run's accelerator (the subset is sharded over its processes, the counts gathered).
        unlabeled: the unlabeled training dataset (rows with their panoptic ground truth).
        class_names: its class names (:class:`training.data.panoptic_datasets.ClassNames`).
        teacher: the EMA teacher's model; student: the (prepared) student.
        ensemble_alpha / threshold / overlap_threshold: how the teacher labels the weak views.
        shortest_edge / longest_edge: the images' test-time resize (the validation size).
        num_images / seed: the fixed subset.
        output_dir: where ``pseudo_label_quality.jsonl`` is written (main process).
    """

    def __init__(
        self,
        accelerator: Any,
        unlabeled: Any,
        class_names: Any,
        teacher: nn.Module,
        student: nn.Module,
        *,
        ensemble_alpha: float,
        threshold: float,
        overlap_threshold: float,
        shortest_edge: int,
        longest_edge: int | None,
        num_images: int = 64,
        seed: int = 0,
        output_dir: str | Path | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if unlabeled is None or len(unlabeled) == 0:
            raise ValueError("pseudo-label quality needs unlabeled images")
        if "panoptic" not in unlabeled.column_names or "segments_info" not in unlabeled.column_names:
            raise ValueError("pseudo-label quality needs the ground truth of the unlabeled images (a panoptic "
                             "annotation per image); turn --pseudo_label_eval_steps off for images without one")
        self.accelerator = accelerator
        self.subset = fixed_subset(unlabeled, num_images, seed)
        self.loader = build_eval_loader(accelerator, self.subset, class_names, shortest_edge, longest_edge, batch_size,
                                        num_workers, with_semantic=False)
        self.models = {"pseudo_labels": (teacher, ensemble_alpha), "student_decoder_only": (student, 1.0)}
        if ensemble_alpha < 1.0:
            self.models["pseudo_labels_decoder_only"] = (teacher, 1.0)
        self.threshold, self.overlap_threshold = threshold, overlap_threshold
        self.history = None if output_dir is None else Path(output_dir) / "pseudo_label_quality.jsonl"

    def __call__(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, (model, alpha) in self.models.items():
            report = evaluate_panoptic(model, self.loader, self.accelerator, ensemble_alpha=alpha,
                                       threshold=self.threshold, overlap_threshold=self.overlap_threshold,
                                       with_semantic=False, progress=False)
            values = flatten_metrics(report, prefix="")
            metrics.update({f"{name}/{k}": values[k] for k in METRICS})
        if self.history is not None and self.accelerator.is_main_process:
            with open(self.history, "a") as history:
                history.write(json.dumps({"step": step, "images": len(self.subset), **metrics}) + "\n")
        return metrics
