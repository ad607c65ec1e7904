"""Segment images with a DEARLi model: per image a COCO panoptic PNG, a JSON segments file and an overlay picture.

    python scripts/predict.py --model path/or/hub-id photos/ "more/*.jpg" one.png --output-dir predictions

Inputs are files, folders (their images, ``--recursive`` for sub-folders) and glob patterns. For every readable image
``<name>.png`` (segment ids as COCO panoptic colours, void = black), ``<name>.json`` (COCO panoptic segments with class
names and scores; ``category_id`` is the model's class index) and ``<name>_overlay.png`` (coloured segments, outlines,
class names) are written, plus ``predictions.json`` (all annotations and the categories, COCO panoptic style).
Unreadable or corrupt images are reported and skipped (listed in ``skipped.json``); the batch goes on.
``--task semantic`` writes one segment per class, ``--task instance`` one per instance (best-scoring on top).
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import glob
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

logger = logging.getLogger("predict")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_THRESHOLDS = {"panoptic": 0.0, "instance": 0.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="Image files, folders or glob patterns.")
    parser.add_argument("--model", required=True, help="Model folder or Hub id (with its image processor).")
    parser.add_argument("--output-dir", required=True, help="Folder for the PNG / JSON / overlay files.")
    parser.add_argument("--task", choices=["panoptic", "semantic", "instance"], default="panoptic",
                        help="Post-processing to run (default: panoptic).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--ensemble_alpha", "--ensemble-alpha", type=float, default=None,
                        help="Eq. 6 weight of the decoder posterior (default: the image processor's, saved from the "
                             "model's config.ensemble_alpha; 1 = decoder only, 0 = CLIP only).")
    parser.add_argument("--batch-size", type=int, default=4, help="Images per forward pass.")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Minimal class probability of a segment (default: 0.0 panoptic, 0.5 instance).")
    parser.add_argument("--mask-threshold", type=float, default=0.5, help="Mask binarisation threshold.")
    parser.add_argument("--overlap-threshold", type=float, default=0.8,
                        help="Panoptic: minimal visible fraction of a segment's mask.")
    parser.add_argument("--shortest-edge", type=int, default=None,
                        help="Resize the shorter image side to this (default: the processor's setting).")
    parser.add_argument("--recursive", action="store_true", help="Search folders recursively.")
    parser.add_argument("--no-overlay", action="store_true", help="Do not write overlay pictures.")
    parser.add_argument("--no-labels", action="store_true", help="Overlay without class names.")
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=True,
                        help="Allow the model folder's code (needed for Hub models when dearli is not installed).")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.ensemble_alpha is not None and not 0.0 <= args.ensemble_alpha <= 1.0:
        parser.error("--ensemble_alpha must lie in [0, 1]")
    return args


def find_images(inputs: list[str], recursive: bool = False) -> list[Path]:
    """Files as given (any extension), image files of folders, and glob matches; sorted, without duplicates."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found += [p for p in sorted(path.glob(pattern)) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            found += [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
        else:
            logger.warning("not found: %s", item)
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(str(p.resolve()), p)
    return list(unique.values())


def output_names(paths: list[Path]) -> list[str]:
    """File stems, made unique with a numeric suffix."""
    names, used = [], set()
    for p in paths:
        name, k = p.stem, 1
        while name in used:
            name, k = f"{p.stem}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def load_image(path: Path) -> Image.Image:
    """RGB image with EXIF orientation applied; raises on unreadable / corrupt files."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_model(args: argparse.Namespace):
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    import modeling_dearli  # noqa: F401  (registers the DEARLi auto classes when the package is installed)
    from modeling_dearli import DearliImageProcessor

    model = AutoModelForUniversalSegmentation.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    try:
        processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        logger.warning("no image processor in %s; using the default DEARLi processor for its config", args.model)
        processor = DearliImageProcessor.from_model_config(model.config)
    return model, processor


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

    paths = find_images(args.inputs, args.recursive)
    if not paths:
        logger.error("no images found in %s", args.inputs)
        return 2
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, processor = load_model(args)
    model.to(device).eval()
    config = model.config
    id2label = {int(k): v for k, v in config.id2label.items()}
    thing_ids = list(getattr(config, "thing_ids", []) or [])
    num_classes = len(id2label)
    threshold = args.threshold if args.threshold is not None else DEFAULT_THRESHOLDS.get(args.task)
    size = None
    if args.shortest_edge:
        size = {**processor.size, "shortest_edge": args.shortest_edge}

    skipped: list[dict[str, str]] = []
    annotations = []
    names = dict(zip(paths, output_names(paths)))
    with tqdm(total=len(paths), desc=f"{args.task} segmentation", unit="img") as bar:
        for chunk in batches(paths, args.batch_size):
            images, kept = [], []
            for path in chunk:
                try:
                    images.append(load_image(path))
                    kept.append(path)
                except Exception as err:  # noqa: BLE001 - any unreadable file is reported and skipped
                    logger.warning("skipping %s: %s", path, err)
                    skipped.append({"path": str(path), "error": f"{type(err).__name__}: {err}"})
            bar.update(len(chunk) - len(kept))
            if not images:
                continue
            inputs = processor(images, size=size, device=device)
            with torch.inference_mode():
                outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
            sizes = [(im.height, im.width) for im in images]
            if args.task == "panoptic":
                raw = processor.post_process_panoptic_segmentation(
                    outputs, threshold=threshold, mask_threshold=args.mask_threshold,
                    overlap_mask_area_threshold=args.overlap_threshold, target_sizes=sizes, ensemble_alpha=args.ensemble_alpha,
                )
                results = [from_panoptic(r, id2label, thing_ids) for r in raw]
            elif args.task == "semantic":
                raw = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes,
                                                                   ensemble_alpha=args.ensemble_alpha)
                results = [from_semantic(r, id2label, thing_ids) for r in raw]
            else:
                raw = processor.post_process_instance_segmentation(
                    outputs, threshold=threshold, mask_threshold=args.mask_threshold, target_sizes=sizes,
                    ensemble_alpha=args.ensemble_alpha,
                )
                results = [from_instance(r, id2label) for r in raw]
            for path, image, result in zip(kept, images, results):
                name = names[path]
                save_panoptic_png(out_dir / f"{name}.png", result.id_map)
                entry = segments_json(result, f"{name}.png", name, {"image": str(path), "task": args.task})
                write_json(out_dir / f"{name}.json", entry)
                annotations.append(entry)
                if not args.no_overlay:
                    picture = overlay(image, result, num_classes, draw_labels=not args.no_labels)
                    picture.save(out_dir / f"{name}_overlay.png")
            bar.update(len(kept))

    categories = [{"id": i, "name": id2label[i], "isthing": int(i in thing_ids)} for i in sorted(id2label)]
    write_json(out_dir / "predictions.json", {"annotations": annotations, "categories": categories})
    write_json(out_dir / "skipped.json", skipped)
    logger.info("%d images segmented into %s, %d skipped", len(annotations), out_dir, len(skipped))
    for item in skipped:
        logger.warning("skipped %s (%s)", item["path"], item["error"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
