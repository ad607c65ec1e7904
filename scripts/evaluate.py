"""Evaluate a DEARLi model on a validation set: PQ / SQ / RQ (All, Things, Stuff, per class) and mIoU.

    python scripts/evaluate.py --model_name_or_path PATH --dataset coco_panoptic --images_dir val2017 \\
        --gt_json panoptic_val2017.json --gt_folder panoptic_val2017 [--ensemble_alpha 0.6] [--output report.json]
    python scripts/evaluate.py --model_name_or_path PATH --dataset ade20k --dataset_root ADEChallengeData2016
    python scripts/evaluate.py --model_name_or_path PATH --from_disk saved_dataset   # saved with save_to_disk
    python scripts/evaluate.py --model_name_or_path PATH --dataset owner/name_or_folder [--split validation]

Inference is ensembled (paper Eq. 6) with ``--ensemble_alpha`` (default: the model's ``config.ensemble_alpha``).
Several values (``--ensemble_alpha 1.0 0.8 0.6 0.4 0.2 0.0``) are evaluated from the same forward passes and reported
side by side, PQ per α with the best marked: choose α on a held-out labeled split, not on the test set. Runs
on several processes with ``accelerate launch``: each evaluates a shard, statistics are merged at the end. A dataset
whose classes differ from the model's (in number, or by name) is refused; code in the model folder runs only with
``--trust_remote_code``. The report records the model (location, weights fingerprint, classes), which
``push_to_hub.py`` checks before it publishes the numbers.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from modeling_dearli.ensembling import resolve_ensemble_alpha
from training import cli
from training.arguments import add_dataset_source_args
from training.data.class_names import ClassNames, load_class_names
from training.data.hub_datasets import DatasetColumns, load_dataset_splits
from training.data.panoptic_datasets import NAMED_DATASETS, dataset_class_names, load_panoptic_dataset
from training.data.panoptic_targets import panoptic_target_from_row, semantic_target_from_row
from training.data.resolutions import EVALUATION_SIZES, evaluation_size
from training.data.train_datasets import row_image, without_image_decoding
from training.evaluation.panoptic_quality import PanopticQuality, print_report
from training.pretrained import add_model_arguments, load_model_and_processor

logger = logging.getLogger("evaluate")


def load_dataset(args: argparse.Namespace) -> tuple[Any, ClassNames]:
    """The validation dataset and its label space from the command line."""
    if args.dataset not in NAMED_DATASETS:  # a 🤗 dataset: Hub id or local folder
        splits, names = load_dataset_splits(
            args.dataset, {"split": args.split}, config_name=args.dataset_config_name,
            class_names_file=args.class_names_file,
            columns=DatasetColumns(args.image_column, args.panoptic_column, args.segments_info_column))
        return splits["split"], names
    if args.from_disk:
        import datasets

        ds = datasets.load_from_disk(args.from_disk)
        names = dataset_class_names(ds)
        if names is None:
            if args.dataset == "custom":
                raise cli.CliError(f"{args.from_disk} records no label space: pass --dataset")
            names = load_class_names(args.dataset, args.data_dir)
        return ds, names
    if args.dataset == "ade20k":
        if not args.dataset_root:
            raise cli.CliError("--dataset ade20k needs --dataset_root (ADEChallengeData2016 after prepare_ade20k.py)")
    else:
        missing = [f for f in ("images_dir", "gt_json", "gt_folder") if not getattr(args, f)]
        if missing:
            raise cli.CliError(f"--dataset {args.dataset} needs " + ", ".join("--" + m for m in missing))
    return load_panoptic_dataset(args.dataset, images_dir=args.images_dir, panoptic_dir=args.gt_folder,
                                 annotations_json=args.gt_json, ade20k_root=args.dataset_root, split=args.split,
                                 panoptic_root=args.panoptic_root, data_dir=args.data_dir,
                                 class_names_file=args.class_names_file)


def check_class_names(model_names: list[str], dataset_names: list[str]) -> None:
    """Refuse a dataset whose classes are not the model's, compared by name in order: class i matches when the
    model's and the dataset's names for it share a synonym (case and surrounding spaces ignored)."""
    def synonyms(name: str) -> set[str]:
        return {s.strip().lower() for s in str(name).split(",") if s.strip()}

    differing = [f"class {i}: model {m!r}, dataset {d!r}" for i, (m, d) in enumerate(zip(model_names, dataset_names))
                 if not synonyms(m) & synonyms(d)]
    if differing:
        raise ValueError(f"the model's classes are not the dataset's ({len(differing)} of {len(model_names)} differ by "
                         f"name; {'; '.join(differing[:3])}): evaluate a model on a dataset of its own label space")


def evaluate(
    model: Any,
    processor: Any,
    ds: Any,
    names: ClassNames,
    *,
    ensemble_alpha: float | None = None,
    batch_size: int = 1,
    accelerator: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``model`` over ``ds`` (this process's shard when ``accelerator`` spans several) and return the report
    (``ensemble_alpha``: Eq. 6 weight; ``None`` = the processor's)."""
    return evaluate_alphas(model, processor, ds, names, [ensemble_alpha], batch_size=batch_size,
                           accelerator=accelerator, progress=progress)[0]


def evaluate_alphas(
    model: Any,
    processor: Any,
    ds: Any,
    names: ClassNames,
    ensemble_alphas: Sequence[float | None],
    *,
    batch_size: int = 1,
    accelerator: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One report per Eq. 6 weight in ``ensemble_alphas`` (``None`` = the processor's), all from one forward pass per
    batch; otherwise as :func:`evaluate`."""
    config = model.config
    if len(config.class_names) != len(names):
        raise ValueError(f"the model has {len(config.class_names)} classes, the dataset {len(names)}: evaluate a model "
                         "on a dataset of its own label space")
    check_class_names(list(config.class_names), list(names.names))
    if len(ds) == 0:
        raise ValueError("the dataset has no images to evaluate")
    if sorted(config.thing_ids or []) != names.thing_ids:
        logger.warning("model thing_ids %s differ from the dataset's %s; using the model's",
                       config.thing_ids, names.thing_ids)
    stuff = [i for i in range(len(names)) if i not in set(config.thing_ids or [])]
    accumulators = [PanopticQuality.from_class_names(list(config.class_names), config.thing_ids or [])
                    for _ in ensemble_alphas]
    if accelerator is not None and accelerator.num_processes > 1:
        ds = ds.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)
    ds = without_image_decoding(ds)  # images read by the project's reader, which names an unreadable file
    device = next(model.parameters()).device
    bar = tqdm(total=len(ds), desc="evaluating", unit="img", disable=not progress)
    for start in range(0, len(ds), batch_size):
        rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        images = [row_image(r) for r in rows]
        sizes = [(im.height, im.width) for im in images]
        inputs = processor(images, return_tensors="pt")
        with torch.no_grad():
            outputs = model(pixel_values=inputs["pixel_values"].to(device), pixel_mask=inputs["pixel_mask"].to(device))
        targets = [(panoptic_target_from_row(row), semantic_target_from_row(row, names)) for row in rows]
        for acc, ensemble_alpha in zip(accumulators, ensemble_alphas):
            panoptic = processor.post_process_panoptic_segmentation(
                outputs, threshold=0.0, label_ids_to_fuse=stuff, target_sizes=sizes, ensemble_alpha=ensemble_alpha
            )
            semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes,
                                                                     ensemble_alpha=ensemble_alpha)
            for row, (target, semantic_target), pan, sem in zip(rows, targets, panoptic, semantic):
                acc.update(pan["segmentation"].cpu(), pan["segments_info"], target.id_map, target.eval_segments(),
                           image_id=row["image_id"])
                acc.update_semantic(sem.cpu(), semantic_target, image_id=row["image_id"])
        bar.update(len(rows))
    bar.close()
    if accelerator is not None:
        for acc in accumulators:
            acc.gather(accelerator)
    return [acc.compute() for acc in accumulators]


def format_alpha_table(reports: Sequence[dict[str, Any]]) -> str:
    """PQ / PQ_th / PQ_st / mIoU (percent) per Eq. 6 weight, the best PQ marked."""
    best = max(range(len(reports)), key=lambda i: reports[i]["All"]["pq"])
    lines = [f"{'ensemble_alpha':>14s}  {'PQ':>5s}  {'PQ_th':>5s}  {'PQ_st':>5s}  {'mIoU':>5s}"]
    for i, r in enumerate(reports):
        values = [100 * r["All"]["pq"], 100 * r["Things"]["pq"], 100 * r["Stuff"]["pq"], 100 * r.get("mIoU", 0.0)]
        lines.append(f"{r['ensemble_alpha']:>14.2f}  " + "  ".join(f"{v:5.1f}" for v in values)
                     + ("  <- best PQ" if i == best else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--dataset", default="coco_panoptic",
                        help="label space and layout: coco_panoptic, coco_objects, ade20k, 'custom' (any COCO "
                        "panoptic folder, classes from its JSON), or a 🤗 dataset: a Hub id (owner/name) or a local "
                        "folder, with its classes in a categories.json (see README, '🤗 datasets')")
    parser.add_argument("--dataset_root", default=None, help="ADEChallengeData2016 folder (--dataset ade20k)")
    parser.add_argument("--panoptic_root", default=None, help="where prepare_ade20k.py wrote its output "
                        "(default: --dataset_root)")
    parser.add_argument("--split", default="validation",
                        help="the split evaluated: of ADE20K (training / validation) or of a 🤗 dataset")
    add_dataset_source_args(parser)
    parser.add_argument("--class_names_file", default=None,
                        help="class names with synonyms replacing the dataset's: 'id:name,synonym,...' lines "
                        "(coco_panoptic, custom, 🤗 datasets), or a COCO categories JSON (🤗 datasets)")
    parser.add_argument("--images_dir", default=None, help="images folder (COCO panoptic format)")
    parser.add_argument("--gt_json", default=None, help="ground-truth panoptic JSON (COCO panoptic format)")
    parser.add_argument("--gt_folder", default=None, help="ground-truth panoptic PNG folder")
    parser.add_argument("--from_disk", default=None, help="a datasets.Dataset saved with save_to_disk instead")
    parser.add_argument("--data_dir", default=None, help="folder with class_names/ and splits/ of your own "
                        "(default: the data that ships in training/data/assets)")
    parser.add_argument("--ensemble_alpha", type=cli.probability, nargs="+", default=None,
                        help="Eq. 6 weight of the decoder posterior in [0, 1] (1 = decoder only, 0 = CLIP only); "
                        "several values are evaluated from the same forward passes and reported side by side; "
                        "default: the model's config.ensemble_alpha")
    parser.add_argument("--batch_size", type=cli.positive_int, default=1, help="images per forward pass")
    parser.add_argument("--size", type=cli.positive_int, nargs=2, default=None, metavar=("SHORTEST", "LONGEST"),
                        help="resize the shorter image side to SHORTEST (longer side at most LONGEST); default: the "
                        "dataset's test size (ADE20K 640 2560, COCO 512 2048), the saved processor's for 'custom' "
                        "and 🤗 datasets")
    parser.add_argument("--device", default=None, help="torch device (default: accelerate's choice)")
    parser.add_argument("--limit", type=cli.positive_int, default=None, help="evaluate only the first N images")
    cli.add_report_arguments(parser)
    parser.add_argument("--per_class", action="store_true", help="print per-class results")
    parser.add_argument("--no_progress", action="store_true", help="disable the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from accelerate import Accelerator

    args.output = cli.report_path(args, inputs={flag: getattr(args, flag.lstrip("-")) for flag in (
        "--model_name_or_path", "--dataset_root", "--panoptic_root", "--images_dir", "--gt_json", "--gt_folder",
        "--from_disk", "--data_dir")})
    accelerator = Accelerator(cpu=args.device == "cpu")
    device = torch.device(args.device) if args.device else accelerator.device
    ds, names = load_dataset(args)
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    model, processor = load_model_and_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    from training.publishing.hub import model_fingerprint

    fingerprint = model_fingerprint(model)  # before any device move: what push_to_hub.py compares
    model.to(device)
    if args.size is not None:
        processor.size = {"shortest_edge": args.size[0], "longest_edge": args.size[1]}
    elif args.dataset in EVALUATION_SIZES:  # the paper's test resolution of a standard dataset
        processor.size = evaluation_size(args.dataset)
    alphas = [resolve_ensemble_alpha(a, model.config) for a in (args.ensemble_alpha or [None])]
    progress = not args.no_progress and accelerator.is_local_main_process
    # What push_to_hub.py checks before it publishes a report: the model's location, weights and classes.
    identity = {"model": args.model_name_or_path, "model_fingerprint": fingerprint,
                "num_classes": len(model.config.class_names), "class_names": list(model.config.class_names)}
    start = time.perf_counter()
    if len(alphas) == 1:
        report = evaluate(model, processor, ds, names, ensemble_alpha=alphas[0], batch_size=args.batch_size,
                          accelerator=accelerator, progress=progress)
        report["ensemble_alpha"] = alphas[0]
        report.update(identity)
        report["seconds"] = time.perf_counter() - start
        if accelerator.is_main_process:
            summary = f"{report['num_images']} images, ensemble_alpha={alphas[0]}, {report['seconds']:.1f} s"
            print_report(report, summary, per_class=args.per_class, output=args.output)
        return 0
    reports = evaluate_alphas(model, processor, ds, names, alphas, batch_size=args.batch_size,
                              accelerator=accelerator, progress=progress)
    for alpha, report in zip(alphas, reports):
        report["ensemble_alpha"] = alpha
        report.update(identity)
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        for report in reports:
            print(f"\nensemble_alpha={report['ensemble_alpha']}:")
            print_report(report, per_class=args.per_class)
        best = max(reports, key=lambda r: r["All"]["pq"])
        print(f"\n{format_alpha_table(reports)}\n{reports[0]['num_images']} images, {len(alphas)} values of "
              f"ensemble_alpha from one forward pass each, {seconds:.1f} s")
        if args.output:
            sweep = {**identity, "seconds": seconds, "ensemble_alphas": alphas,
                     "best_ensemble_alpha": best["ensemble_alpha"], "reports": reports}
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(sweep, indent=1))
            print(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
