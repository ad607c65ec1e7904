"""Segment images with a DEARLi model: per image a COCO panoptic PNG, a JSON segments file and an overlay picture.

    python scripts/predict.py --model_name_or_path path/or/hub-id photos/ "more/*.jpg" one.png --output_dir predictions

Inputs are files, folders (their images, ``--recursive`` for sub-folders) and glob patterns. For every readable image
``<name>.png`` (segment ids as COCO panoptic colours, void = black), ``<name>.json`` (COCO panoptic segments with class
names and scores; ``category_id`` is the model's class index) and ``<name>_overlay.png`` (coloured segments, outlines,
class names) are written, plus ``predictions.json`` (all annotations and the categories, COCO panoptic style) and
``skipped.json`` (inputs that could not be read or found). ``<name>`` is the image's file stem, with a number added
where two inputs (or an input and another output) would share a file name. ``--task semantic`` writes one segment per
class, ``--task instance`` one per instance (best-scoring on top).

Images are decoded in ``--num_workers`` DataLoader workers and batched ``--batch_size`` at a time with images of the
same
padded size, so results equal those of one image at a time; the run reports images per second.

With ``--gt_json`` (a COCO panoptic ground-truth JSON) the annotations in ``predictions.json`` carry the dataset's
image ids (images matched by file name) and category ids (class i = the i-th category in id order), so that
``scripts/evaluate_panoptic.py --gt_json G --pred_json OUT/predictions.json`` scores them; inputs that are not
in the ground truth are segmented but left out of ``predictions.json``.

``--onnx DIR`` runs the graph that ``scripts/export_onnx.py`` wrote into DIR in onnxruntime instead of the PyTorch
model (on the CPU); the model folder still gives the image processor and the class names.

Nothing is overwritten: an output folder that holds the inputs is refused, and so are existing output files unless
``--overwrite``. The exit code is 1 when an input was skipped (``--allow_skips`` tolerates that) or nothing was
segmented. Code in the model folder runs only with ``--trust_remote_code``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import glob
import logging
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training import cli
from training.data.image_files import (
    ImageFiles,
    batches_by_padded_size,
    find_images,
    image_size,
)
from training.pretrained import add_model_arguments, load_model_and_processor

logger = logging.getLogger("predict")

DEFAULT_THRESHOLDS = {"panoptic": 0.0, "instance": 0.0}
RUN_FILES = ("predictions.json", "skipped.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("inputs", nargs="+", help="Image files, folders or glob patterns.")
    add_model_arguments(parser)
    parser.add_argument("--output_dir", required=True, help="Folder for the PNG / JSON / overlay files.")
    parser.add_argument("--overwrite", action="store_true", help="Replace output files that already exist.")
    parser.add_argument("--task", choices=["panoptic", "semantic", "instance"], default="panoptic",
                        help="Post-processing to run (default: panoptic).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--ensemble_alpha", type=cli.probability, default=None,
                        help="Eq. 6 weight of the decoder posterior in [0, 1] (default: the image processor's, saved "
                             "from the model's config.ensemble_alpha; 1 = decoder only, 0 = CLIP only).")
    parser.add_argument("--batch_size", type=cli.positive_int, default=4,
                        help="Images per forward pass (images of the same padded size are batched together).")
    parser.add_argument("--num_workers", type=cli.non_negative_int, default=2,
                        help="DataLoader worker processes that decode and preprocess images (0: in this process; "
                             "never more than the CPUs available).")
    parser.add_argument("--threshold", type=cli.probability, default=None,
                        help="Minimal score of a segment, in [0, 1] (default: 0.0, every segment: panoptic keeps every "
                             "query that is not 'no object', instance the 100 best per image).")
    parser.add_argument("--min_area", type=cli.non_negative_int, default=0,
                        help="Instance: drop instances with fewer pixels (default: 0, keep all).")
    parser.add_argument("--mask_iou_threshold", type=cli.probability, default=None,
                        help="Instance: drop an instance whose mask overlaps a higher-scoring one of the same class "
                             "with a larger IoU (default: keep duplicates).")
    parser.add_argument("--gt_json", default=None,
                        help="COCO panoptic ground-truth JSON: write its image ids and category ids into "
                             "predictions.json, so that scripts/evaluate_panoptic.py scores the predictions.")
    parser.add_argument("--onnx", default=None,
                        help="Folder written by scripts/export_onnx.py: run that graph in onnxruntime (CPU) instead "
                             "of the PyTorch model.")
    parser.add_argument("--mask_threshold", type=cli.probability, default=0.5,
                        help="Mask binarisation threshold in [0, 1].")
    parser.add_argument("--overlap_threshold", type=cli.probability, default=0.8,
                        help="Panoptic: minimal visible fraction of a segment's mask, in [0, 1].")
    parser.add_argument("--shortest_edge", type=cli.positive_int, default=None,
                        help="Resize the shorter image side to this (default: the processor's setting).")
    parser.add_argument("--recursive", action="store_true", help="Search folders recursively.")
    parser.add_argument("--no_overlay", action="store_true", help="Do not write overlay pictures.")
    parser.add_argument("--no_labels", action="store_true", help="Overlay without class names.")
    parser.add_argument("--bf16", action="store_true",
                        help="Run the model under bfloat16 autocast: on a CPU with native bf16 (avx512_bf16 or "
                             "amx_bf16 in lscpu) or a GPU with bf16 (refused elsewhere); see README, Benchmarks, for "
                             "its speed and its cost in PQ.")
    parser.add_argument("--allow_skips", action="store_true",
                        help="Exit with 0 even when inputs were skipped (unreadable, not found), as long as one image "
                             "was segmented.")
    return parser.parse_args(argv)


def output_names(paths: list[Path]) -> list[str]:
    """One name per input: its file stem, with ``_<k>`` added when any of its files (``<name>.png``, ``<name>.json``,
    ``<name>_overlay.png``) would be another input's or a run file (``predictions.json``, ``skipped.json``). Compared
    case-insensitively, as some file systems do."""
    used = {name.lower() for name in RUN_FILES}
    names = []
    for path in paths:
        k = 0
        while True:
            name = path.stem if k == 0 else f"{path.stem}_{k}"
            files = {f"{name}.png".lower(), f"{name}.json".lower(), f"{name}_overlay.png".lower()}
            if not files & used:
                break
            k += 1
        used |= files
        names.append(name)
    return names


def plan_outputs(paths: list[Path], out_dir: Path, overwrite: bool) -> list[str]:
    """Output names for `paths`; refuses an output folder holding an input and existing output files (unless
    `overwrite`) before anything is loaded or written."""
    out = out_dir.resolve()
    inside = [p for p in paths if out == p.resolve().parent or out in p.resolve().parents]
    if inside:
        raise cli.CliError(f"the output directory {out_dir} holds the input {inside[0]}"
                           f"{f' and {len(inside) - 1} more' if len(inside) > 1 else ''}: choose another --output_dir")
    names = output_names(paths)
    planned = [out_dir / f for f in RUN_FILES]
    planned += [out_dir / f"{n}{suffix}" for n in names for suffix in (".png", ".json", "_overlay.png")]
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        raise cli.CliError(f"{len(existing)} output files exist already in {out_dir} (e.g. {existing[0].name}); pass "
                           "--overwrite to replace them, or choose another --output_dir")
    return names


def in_ground_truth_ids(annotations: list[dict], ground_truth) -> tuple[list[dict], list[dict]]:
    """The annotations of images in the ground truth, with its image ids and category ids, and its categories."""
    converted, missing = [], []
    for entry in annotations:
        image_id = ground_truth.image_id(entry["image"])
        if image_id is None:
            missing.append(entry["image"])
            continue
        converted.append(ground_truth.convert(entry, image_id))
    if missing:
        logger.warning("%d segmented images are not in the ground truth (matched by file name) and are left out of "
                       "predictions.json, e.g. %s", len(missing), missing[0])
    return converted, ground_truth.categories


class Preprocess:
    """``collate_fn`` of the image loader: the processor's batch (run in the workers) plus the images and errors."""

    def __init__(self, processor, size) -> None:
        self.processor, self.size = processor, size

    def __call__(self, items):
        good = [item for item in items if item["image"] is not None]
        inputs = self.processor([item["image"] for item in good], size=self.size) if good else None
        return {"items": items, "good": good, "inputs": inputs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training.evaluation.visualization import (
        from_instance,
        from_panoptic,
        from_semantic,
        overlay,
        save_panoptic_png,
        segments_json,
        write_json,
    )

    paths, not_found = find_images(args.inputs, args.recursive)
    skipped = [{"path": item, "error": "matched no file" if glob.has_magic(item) else "not found"}
               for item in not_found]
    for item in skipped:
        logger.warning("skipping %s: %s", item["path"], item["error"])
    if not paths:
        raise cli.CliError(f"no images found in {' '.join(args.inputs)}")
    out_dir = Path(args.output_dir)
    names = plan_outputs(paths, out_dir, args.overwrite)
    cli.prepare_output_dir(out_dir)

    if args.task != "instance" and (args.min_area or args.mask_iou_threshold is not None):
        raise cli.CliError("--min_area and --mask_iou_threshold apply to --task instance only")
    if args.onnx is not None and args.bf16:
        raise cli.CliError("--bf16 applies to the PyTorch model, not to --onnx")
    if args.onnx is not None:
        from training.deployment.onnx_runtime import DearliOnnxModel
        from training.pretrained import check_model_location, load_image_processor

        if args.device not in (None, "cpu"):
            raise cli.CliError("--onnx runs on the CPU: leave --device out")
        device = torch.device("cpu")
        location = check_model_location(args.model_name_or_path)
        model = DearliOnnxModel.from_pretrained(args.onnx, location)
        processor = load_image_processor(location, model.config, args.trust_remote_code)
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, processor = load_model_and_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        model.to(device)
    from modeling_dearli.precision import autocast

    try:
        precision = autocast(device, args.bf16)
    except ValueError as error:
        raise cli.CliError(f"--bf16: {error}") from None
    config = model.config
    id2label = {int(k): v for k, v in config.id2label.items()}
    thing_ids = list(getattr(config, "thing_ids", []) or [])
    ground_truth = None
    if args.gt_json is not None:
        from training.evaluation.ground_truth_ids import GroundTruthIds

        try:
            ground_truth = GroundTruthIds.from_json(args.gt_json, config.class_names)
        except (OSError, ValueError, KeyError) as error:
            raise cli.CliError(f"--gt_json {args.gt_json}: {error}") from error
    threshold = args.threshold if args.threshold is not None else DEFAULT_THRESHOLDS.get(args.task)
    size = {**processor.size, "shortest_edge": args.shortest_edge} if args.shortest_edge else None

    sizes = []
    for path in paths:  # headers only: the batches group images of one padded size
        try:
            sizes.append(image_size(path))
        except OSError:
            sizes.append(None)  # read (and reported) by the loader like any other unreadable file
    batches = batches_by_padded_size(sizes, lambda h, w: processor.padded_size(h, w, size), args.batch_size)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(args.num_workers, cpus)
    loader = torch.utils.data.DataLoader(ImageFiles(paths), batch_sampler=batches, num_workers=workers,
                                         collate_fn=Preprocess(processor, size))

    annotations: dict[int, dict] = {}  # input index -> COCO panoptic annotation
    start = time.perf_counter()
    with tqdm(total=len(paths), desc=f"{args.task} segmentation", unit="img") as bar:
        for batch in loader:
            for item in batch["items"]:
                if item["error"] is not None:
                    logger.warning("skipping %s", item["error"])
                    skipped.append({"path": str(paths[item["index"]]), "error": item["error"]})
            if batch["good"]:
                inputs = batch["inputs"]
                with torch.inference_mode(), precision:
                    outputs = model(pixel_values=inputs["pixel_values"].to(device),
                                    pixel_mask=inputs["pixel_mask"].to(device))
                images = [item["image"] for item in batch["good"]]
                target_sizes = [(im.height, im.width) for im in images]
                common = {"target_sizes": target_sizes, "ensemble_alpha": args.ensemble_alpha}
                if args.task == "panoptic":
                    raw = processor.post_process_panoptic_segmentation(
                        outputs, threshold=threshold, mask_threshold=args.mask_threshold,
                        overlap_mask_area_threshold=args.overlap_threshold, **common)
                    results = [from_panoptic(r, id2label, thing_ids) for r in raw]
                elif args.task == "semantic":
                    raw = processor.post_process_semantic_segmentation(outputs, **common)
                    results = [from_semantic(r, id2label, thing_ids) for r in raw]
                else:
                    raw = processor.post_process_instance_segmentation(
                        outputs, threshold=threshold, mask_threshold=args.mask_threshold, min_area=args.min_area,
                        mask_iou_threshold=args.mask_iou_threshold, **common)
                    results = [from_instance(r, id2label) for r in raw]
                for item, image, result in zip(batch["good"], images, results):
                    path, name = paths[item["index"]], names[item["index"]]
                    save_panoptic_png(out_dir / f"{name}.png", result.id_map)
                    entry = segments_json(result, f"{name}.png", name, {"image": str(path), "task": args.task})
                    write_json(out_dir / f"{name}.json", entry)
                    annotations[item["index"]] = entry
                    if not args.no_overlay:
                        picture = overlay(image, result, len(id2label), draw_labels=not args.no_labels)
                        picture.save(out_dir / f"{name}_overlay.png")
            bar.update(len(batch["items"]))
    seconds = time.perf_counter() - start

    annotations = [annotations[i] for i in sorted(annotations)]  # in input order
    categories = [{"id": i, "name": id2label[i], "isthing": int(i in thing_ids)} for i in sorted(id2label)]
    if ground_truth is not None:
        annotations, categories = in_ground_truth_ids(annotations, ground_truth)
    write_json(out_dir / "predictions.json", {"annotations": annotations, "categories": categories})
    write_json(out_dir / "skipped.json", skipped)
    logger.info("%d images segmented into %s in %.1f s (%.2f images/s, batch size %d, %d workers), %d skipped",
                len(annotations), out_dir, seconds, len(annotations) / max(seconds, 1e-9), args.batch_size, workers,
                len(skipped))
    if not annotations:
        raise cli.CliError(f"no image could be segmented ({len(skipped)} skipped, listed in "
                           f"{out_dir / 'skipped.json'})")
    if skipped and not args.allow_skips:
        logger.error("%d inputs skipped (listed in %s); pass --allow_skips to exit with 0 anyway", len(skipped),
                     out_dir / "skipped.json")
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
