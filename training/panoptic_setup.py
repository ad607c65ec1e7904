"""Panoptic data setup shared by supervised.py and ssl.py: data arguments, labeled/validation datasets, validation.

`add_panoptic_data_args` adds the dataset / partition / validation flags, `load_datasets` builds the labeled training
set, the validation set and the label space from them (`training.data.panoptic_datasets` loaders and partitions), and
`make_evaluator` wraps `training.evaluation.validation.evaluate_panoptic` for a loop's periodic validation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .data.collator import DearliDataCollator
from .evaluation.validation import PanopticEvalDataset, evaluate_panoptic

__all__ = [
    "DATASETS",
    "add_panoptic_data_args",
    "check_panoptic_data_args",
    "flatten_metrics",
    "load_datasets",
    "make_evaluator",
]

DATASETS = ("coco_panoptic", "coco_objects", "ade20k", "custom")


def add_panoptic_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags selecting a panoptic dataset, its labeled partition and its validation set (shared with ssl.py)."""
    g = parser.add_argument_group("panoptic data")
    g.add_argument("--dataset_name", type=str, default="coco_panoptic", choices=DATASETS,
                   help="Label space and loader: COCO panoptic (133 classes), COCO-Objects (81), ADE20K (150, "
                        "after scripts/prepare_ade20k.py) or 'custom' (classes from the annotation JSON).")
    g.add_argument("--ade20k_root", type=str, default=None,
                   help="ADEChallengeData2016 folder (for --dataset_name ade20k; replaces the --train_*/--val_* "
                        "folders).")
    g.add_argument("--train_images_dir", type=str, default=None, help="Training images folder (COCO format).")
    g.add_argument("--train_panoptic_dir", type=str, default=None, help="Training panoptic PNG folder.")
    g.add_argument("--train_annotations", type=str, default=None, help="Training panoptic annotation JSON.")
    g.add_argument("--val_images_dir", type=str, default=None, help="Validation images folder (COCO format).")
    g.add_argument("--val_panoptic_dir", type=str, default=None, help="Validation panoptic PNG folder.")
    g.add_argument("--val_annotations", type=str, default=None,
                   help="Validation panoptic annotation JSON (no validation when no validation data is given).")
    g.add_argument("--partition", type=str, default=None,
                   help="Standard labeled partition (e.g. 1_512 for COCO, 1_128 for ADE20K; shared/data/splits); "
                        "default: every training image is labeled.")
    g.add_argument("--labeled_fraction", type=float, default=None,
                   help="Instead of --partition: a random labeled subset of this fraction (drawn with --seed).")
    g.add_argument("--restrict_to_present_classes", action="store_true",
                   help="Use only the classes that occur in the labeled training images (small demos).")
    g.add_argument("--eval_steps", type=int, default=5_000, help="Validate every N steps (0: only at the end).")
    g.add_argument("--eval_shortest_edge", type=int, default=640,
                   help="Validation images are resized so that their shorter side has this length.")
    g.add_argument("--eval_max_size", type=int, default=2560, help="Cap of the longer side of validation images.")
    g.add_argument("--eval_alpha", type=float, default=None,
                   help="Ensembling weight alpha of Eq. 6 at validation (default: the model's, 0.6; 1 = decoder only).")
    g.add_argument("--eval_threshold", type=float, default=0.0,
                   help="Panoptic inference: keep queries whose best class probability exceeds this (paper: 0).")
    g.add_argument("--eval_overlap_threshold", type=float, default=0.8,
                   help="Panoptic inference: minimal visible fraction of a query's mask (paper: 0.8).")
    g.add_argument("--max_eval_images", type=int, default=None, help="Validate on at most this many images.")
    g.add_argument("--eval_batch_size", type=int, default=1, help="Validation images per process and batch.")
    return parser


def check_panoptic_data_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` on missing / conflicting data arguments (after `parse_args_with_config`)."""
    if args.dataset_name == "ade20k":
        if not args.ade20k_root:
            parser.error("--dataset_name ade20k needs --ade20k_root")
    elif not (args.train_images_dir and args.train_panoptic_dir and args.train_annotations):
        parser.error("--train_images_dir, --train_panoptic_dir and --train_annotations are required")
    if args.partition and args.labeled_fraction:
        parser.error("give at most one of --partition and --labeled_fraction")


def _restrict(ds: Any, class_names: Any) -> tuple[Any, Any]:
    """Keep only the classes present in `ds` (reloading would re-read files: remap the labels in place instead)."""
    from .data.panoptic_datasets import ClassNames

    present = sorted({s["category_id"] for segs in ds["segments_info"] for s in segs})
    index = class_names.id_to_label
    keep = [index[c] for c in present]
    restricted = ClassNames(tuple(present), tuple(class_names.names[i] for i in keep),
                            tuple(class_names.is_thing[i] for i in keep))
    new_label = restricted.id_to_label

    def remap(segments: list[dict[str, Any]]) -> dict[str, Any]:
        return {"segments_info": [{**s, "label": new_label[s["category_id"]]} for s in segments]}

    return ds.map(remap, input_columns="segments_info", desc="restrict classes"), restricted


def load_datasets(args: argparse.Namespace) -> tuple[Any, Any | None, Any]:
    """(labeled training set, validation set or None, ClassNames) from the data arguments."""
    from .data import panoptic_datasets as pd

    if args.dataset_name == "ade20k":
        train = pd.load_ade20k_panoptic(args.ade20k_root, "training", with_semantic=False)
        val = pd.load_ade20k_panoptic(args.ade20k_root, "validation")
        class_names = pd.load_class_names("ade20k")
    else:
        if args.dataset_name == "coco_objects":
            loader, class_names = pd.load_coco_objects, pd.load_class_names("coco_objects")
            kwargs: dict[str, Any] = {}
        else:
            loader = pd.load_coco_panoptic
            class_names = pd.load_class_names("coco_panoptic") if args.dataset_name == "coco_panoptic" else None
            kwargs = {"class_names": class_names}
        train = loader(args.train_images_dir, args.train_panoptic_dir, args.train_annotations, **kwargs)
        val = None
        if args.val_annotations:
            val = loader(args.val_images_dir or args.train_images_dir, args.val_panoptic_dir or args.train_panoptic_dir,
                         args.val_annotations, **kwargs)
        if class_names is None:
            class_names = pd.dataset_class_names(train)
    if args.partition:
        split_name = "coco" if args.dataset_name.startswith("coco") else args.dataset_name
        train, _ = pd.split_labeled_unlabeled(train, dataset=split_name, partition=args.partition)
    elif args.labeled_fraction:
        train, _ = pd.split_labeled_unlabeled(train, fraction=args.labeled_fraction, seed=args.seed)
    if args.restrict_to_present_classes:
        train, restricted = _restrict(train, class_names)
        if val is not None:
            present = set(restricted.category_ids)
            val = val.map(lambda segs: {"segments_info": [s for s in segs if s["category_id"] in present]},
                          input_columns="segments_info")
            val, _ = _restrict(val, restricted)
        class_names = restricted
    if args.max_eval_images is not None and val is not None:
        val = val.select(range(min(args.max_eval_images, len(val))))
    return train, val, class_names


def flatten_metrics(report: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """Scalar metrics (in %) of a `PanopticQuality.compute()` report."""
    out = {f"{prefix}PQ": 100 * report["All"]["pq"], f"{prefix}SQ": 100 * report["All"]["sq"],
           f"{prefix}RQ": 100 * report["All"]["rq"], f"{prefix}PQ_th": 100 * report["Things"]["pq"],
           f"{prefix}PQ_st": 100 * report["Stuff"]["pq"]}
    if "mIoU" in report:
        out[f"{prefix}mIoU"] = 100 * float(report["mIoU"])
    return out


def make_evaluator(args: argparse.Namespace, accelerator: Any, val: Any, class_names: Any):
    """`evaluate(model, step)` for the loop (None without validation data); also writes eval_results.json."""
    if val is None or len(val) == 0:
        return None
    dataset = PanopticEvalDataset(val, args.eval_shortest_edge, args.eval_max_size, with_semantic=True,
                                  class_names=class_names)
    loader = DataLoader(dataset, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.num_workers,
                        collate_fn=DearliDataCollator())
    loader = accelerator.prepare_data_loader(loader, device_placement=True)

    def evaluate(model: Any, step: int) -> dict[str, float]:
        report = evaluate_panoptic(model, loader, accelerator, alpha=args.eval_alpha, threshold=args.eval_threshold,
                                   overlap_threshold=args.eval_overlap_threshold)
        metrics = flatten_metrics(report)
        if accelerator.is_main_process:
            path = Path(args.output_dir) / "eval_results.json"
            path.write_text(json.dumps({"step": step, **metrics, "report": report}, indent=1, default=str))
        return metrics

    return evaluate
