"""Periodic validation of the training loops: panoptic inference on a validation set, PQ and mIoU.

:class:`PanopticEvalDataset` preprocesses each image with `DearliImageProcessor` (shortest edge, capped long edge, as
Mask2Former's test-time ``ResizeShortestEdge``) and carries its ground truth at the original size;
:func:`evaluate_panoptic` runs the model in eval mode and the processor's ``post_process_panoptic_segmentation`` /
``post_process_semantic_segmentation`` (ensembled posteriors, paper Eq. 6; standard panoptic inference) at the
original size, and accumulates `training.evaluation.panoptic_quality.PanopticQuality` across processes;
:func:`make_evaluator` turns it into the ``evaluate(step)`` of :func:`training.loop.run_training`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from modeling_dearli.image_processing_dearli import DearliImageProcessor

from ..data.collator import DearliDataCollator
from ..data.panoptic_targets import panoptic_target_from_row, semantic_target_from_row
from ..data.train_datasets import row_image, without_image_decoding
from .panoptic_quality import PanopticQuality

__all__ = ["PanopticEvalDataset", "build_eval_loader", "evaluate_panoptic", "flatten_metrics", "make_evaluator"]

logger = logging.getLogger(__name__)


class PanopticEvalDataset(Dataset):
    """Validation examples of a `training.data.panoptic_datasets` dataset.

    Items: ``pixel_values`` (resized and CLIP-normalised by `DearliImageProcessor`, unpadded), ``target_size`` (original
    (H, W)), ``gt_id_map`` (H, W) int64,
    ``gt_segments`` (contiguous ``category_id``, ``iscrowd``), ``gt_semantic`` (H, W) contiguous classes (255 ignore)
    when `with_semantic`, ``image_id``.
    """

    def __init__(
        self,
        dataset: Any,
        shortest_edge: int = 640,
        longest_edge: int | None = 2560,
        with_semantic: bool = True,
        class_names: Any = None,
    ) -> None:
        self.dataset = without_image_decoding(dataset)  # read by the project's image reader, which names bad files
        self.shortest_edge = shortest_edge
        self.longest_edge = longest_edge
        self.with_semantic = with_semantic
        self.class_names = class_names
        size = {"shortest_edge": int(shortest_edge)}
        if longest_edge is not None:
            size["longest_edge"] = int(longest_edge)
        self.processor = DearliImageProcessor(size=size, size_divisor=1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index[0] if isinstance(index, (tuple, list)) else index)]
        image = row_image(row)
        target = panoptic_target_from_row(row)
        height, width = target.id_map.shape
        item = {
            "pixel_values": self.processor.preprocess(image)["pixel_values"][0],
            "target_size": (height, width),
            "gt_id_map": target.id_map,
            "gt_segments": target.eval_segments(),
            "image_id": row.get("image_id"),
        }
        if self.with_semantic:
            item["gt_semantic"] = semantic_target_from_row(row, self.class_names)
        return item


@torch.no_grad()
def evaluate_panoptic(
    model: nn.Module,
    dataloader: Any,
    accelerator: Any = None,
    *,
    ensemble_alpha: float | None = None,
    threshold: float = 0.0,
    overlap_threshold: float = 0.8,
    with_semantic: bool = True,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """PQ (and mIoU) of `model` on batches of :class:`PanopticEvalDataset` collated by `DearliDataCollator`.

    Post-processing is `DearliImageProcessor.from_model_config(model.config)`'s (stuff classes fused).

    Args:
        ensemble_alpha: Eq. 6 weight of the decoder posterior (``None``: the model's ``config.ensemble_alpha``; 1.0 =
            decoder only).
        threshold, overlap_threshold: panoptic inference settings (DEARLi: 0.0 and 0.8).
        with_semantic: also compute mIoU from the semantic inference.
    Returns:
        `PanopticQuality.compute()` of all processes together (identical on every process).
    """
    config = extract_model_from_parallel(model).config
    processor = DearliImageProcessor.from_model_config(config, ensemble_alpha=ensemble_alpha)
    metric = PanopticQuality.from_class_names(config.class_names, config.thing_ids)
    was_training = model.training
    model.eval()
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    try:
        for i, batch in enumerate(tqdm(dataloader, desc="validation", disable=not show, leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch.get("pixel_mask"),
                            output_clip_logits=processor.ensemble_alpha < 1.0)
            sizes = [tuple(int(v) for v in s) for s in batch["target_size"]]
            panoptic = processor.post_process_panoptic_segmentation(
                outputs, threshold=threshold, overlap_mask_area_threshold=overlap_threshold, target_sizes=sizes
            )
            semantic = None
            if with_semantic and "gt_semantic" in batch:
                semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
            for b, prediction in enumerate(panoptic):
                segments = [{"id": s["id"], "category_id": s["label_id"]} for s in prediction["segments_info"]]
                image_id = batch["image_id"][b]
                metric.update(prediction["segmentation"].cpu().numpy(), segments, np.asarray(batch["gt_id_map"][b]),
                              batch["gt_segments"][b], image_id=image_id)
                if semantic is not None:
                    metric.update_semantic(semantic[b].cpu().numpy(), np.asarray(batch["gt_semantic"][b]),
                                           image_id=image_id)
    finally:
        model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        metric = metric.gather(accelerator)
    return metric.compute()


def flatten_metrics(report: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """Scalar metrics (in %) of a `PanopticQuality.compute()` report."""
    out = {f"{prefix}PQ": 100 * report["All"]["pq"], f"{prefix}SQ": 100 * report["All"]["sq"],
           f"{prefix}RQ": 100 * report["All"]["rq"], f"{prefix}PQ_th": 100 * report["Things"]["pq"],
           f"{prefix}PQ_st": 100 * report["Stuff"]["pq"]}
    if "mIoU" in report:
        out[f"{prefix}mIoU"] = 100 * float(report["mIoU"])
    return out


def build_eval_loader(
    accelerator: Any,
    dataset: Any,
    class_names: Any,
    shortest_edge: int,
    longest_edge: int | None,
    batch_size: int = 1,
    num_workers: int = 0,
    with_semantic: bool = True,
) -> Any:
    """A data loader of :class:`PanopticEvalDataset` items of `dataset`, sharded over `accelerator`'s processes."""
    items = PanopticEvalDataset(dataset, shortest_edge, longest_edge, with_semantic=with_semantic,
                                class_names=class_names)
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=DearliDataCollator())
    return accelerator.prepare_data_loader(loader, device_placement=True)


def make_evaluator(
    args: Any, accelerator: Any, validation: Any, class_names: Any, models: Mapping[str, nn.Module]
) -> Callable[[int], dict[str, float]] | None:
    """``evaluate(step)`` for :func:`training.loop.run_training` (``None`` without validation data): PQ / mIoU of
    each of `models` (``eval/<name>/PQ``, ...; ``eval/PQ`` for the name ``""``) with ``--eval_shortest_edge``,
    ``--eval_longest_edge``, ``--eval_threshold``, ``--eval_overlap_threshold``, ``--eval_batch_size``; the reports are
    written to ``<output_dir>/eval_results.json`` and the metrics appended to ``<output_dir>/eval_history.jsonl`` (one
    line per evaluation; after a resume a step may appear twice, the later line counts)."""
    if validation is None or len(validation) == 0:
        return None
    loader = build_eval_loader(accelerator, validation, class_names, args.eval_shortest_edge, args.eval_longest_edge,
                               args.eval_batch_size, args.num_workers)

    def evaluate(step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        reports = {}
        for name, model in models.items():
            reports[name] = evaluate_panoptic(model, loader, accelerator, threshold=args.eval_threshold,
                                              overlap_threshold=args.eval_overlap_threshold)
            metrics.update(flatten_metrics(reports[name], prefix=f"eval/{name}/" if name else "eval/"))
        if accelerator.is_main_process:
            results = {"step": step, **metrics, **({"report": reports[""]} if "" in reports else {"reports": reports})}
            (Path(args.output_dir) / "eval_results.json").write_text(json.dumps(results, indent=1, default=str))
            with open(Path(args.output_dir) / "eval_history.jsonl", "a") as history:  # the PQ-vs-step curve
                history.write(json.dumps({"step": step, **metrics}) + "\n")
        return metrics

    return evaluate
