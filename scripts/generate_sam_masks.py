"""Generate class-agnostic SAM masks (COCO RLE, parquet shards) for the decoder warm-up (DeWa).

    python scripts/generate_sam_masks.py --image_dir coco/train2017 --sam_checkpoint sam_vit_h_4b8939.pth \\
        --output_dir sam_masks/coco
    accelerate launch scripts/generate_sam_masks.py ...      # one share of the images per process

The images of a 🤗 dataset (a Hub id or a local folder; only the split asked for is read) get masks the same way:

    python scripts/generate_sam_masks.py --dataset_name data/miniature_hf --split train --mask_source felzenszwalb \\
        --output_dir masks/train

Without SAM weights, an unsupervised algorithm writes masks in the same format (DeWa reads them the same way):

    python scripts/generate_sam_masks.py --mask_source felzenszwalb --image_dir world/images/train \\
        --output_dir world/masks_felzenszwalb

Resumable: rerun the same command after an interruption. Read the output with
`training.data.mask_reading.load_masks(output_dir)`. Unreadable images are logged, recorded in the output folder's
``failures-*.jsonl`` and skipped; the exit code is then 1 unless ``--allow_skips``, on a rerun too, as long as images
recorded as unreadable are without masks (``--retry_failed`` tries them again). A ``manifest.json`` in the output
folder that this tool did not write is refused, not overwritten.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import json
import logging
from pathlib import Path

from training import cli
from training.data.hub_datasets import load_image_split
from training.data.mask_generation import generate_masks
from training.data.sam_models import SAM_MODEL_REGISTRY, SamGeneratorConfig
from training.data.unsupervised_masks import MASK_SOURCES, FelzenszwalbConfig, FelzenszwalbMaskGenerator

logger = logging.getLogger("generate_sam_masks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SamGeneratorConfig()
    felzenszwalb_defaults = FelzenszwalbConfig()
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_hidden_alias("--dataset", "--dataset_name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image_dir", help="folder of images (searched recursively; id = relative path w/o suffix)")
    source.add_argument("--dataset_name",
                        help="a 🤗 dataset instead: a Hub id (owner/name) or a local folder (save_to_disk output, or "
                             "files datasets.load_dataset reads, e.g. parquet shards); only --split is read")
    parser.add_argument("--dataset_config_name", default=None,
                        help="--dataset_name: its configuration (the second argument of datasets.load_dataset)")
    parser.add_argument("--split", default="train", help="--dataset_name: the split whose images get masks")
    parser.add_argument("--image_column", default="image", help="--dataset_name: the image column")
    parser.add_argument("--id_column", default=None,
                        help="--dataset_name: the column that names each image in the masks (default: image_id or id "
                             "if present, else the row number); DeWa joins masks to the dataset's rows by it (give "
                             "training/dewa.py the same --id_column)")
    parser.add_argument("--mask_source", default="sam", choices=MASK_SOURCES,
                        help="'sam': SAM's automatic mask generator (needs --sam_checkpoint); 'felzenszwalb': "
                             "Felzenszwalb's graph-based segmentation (scikit-image, no weights; "
                             "training/data/unsupervised_masks.py), in the same shard format")
    parser.add_argument("--sam_checkpoint", default=None,
                        help="SAM checkpoint file (nothing is downloaded); required with --mask_source sam")
    parser.add_argument(
        "--model_type",
        default=defaults.model_type,
        choices=sorted(SAM_MODEL_REGISTRY),
        help="SAM variant matching the checkpoint",
    )
    parser.add_argument("--points_per_side", type=cli.positive_int, default=defaults.points_per_side,
                        help="point grid per side")
    parser.add_argument(
        "--points_per_batch",
        type=cli.positive_int,
        default=defaults.points_per_batch,
        help="points per forward pass; lower it for very large images (peak memory ~ 3*this*H*W*4 bytes)",
    )
    parser.add_argument("--pred_iou_thresh", type=cli.probability, default=defaults.pred_iou_thresh,
                        help="predicted IoU filter, in [0, 1]")
    parser.add_argument("--stability_score_thresh", type=cli.probability, default=defaults.stability_score_thresh,
                        help="stability filter, in [0, 1]")
    parser.add_argument("--box_nms_thresh", type=cli.probability, default=defaults.box_nms_thresh,
                        help="box NMS IoU threshold, in [0, 1]")
    parser.add_argument("--crop_n_layers", type=cli.non_negative_int, default=defaults.crop_n_layers,
                        help="SAM crop layers (0 = none)")
    parser.add_argument(
        "--min_mask_region_area",
        type=cli.non_negative_int,
        default=defaults.min_mask_region_area,
        help="remove holes/islands below this area (needs opencv; 0 = off)",
    )
    parser.add_argument("--felzenszwalb_scale", type=float, default=felzenszwalb_defaults.scale,
                        help="--mask_source felzenszwalb: scale (higher: larger segments; in pixels, the default suits "
                             "256x256 images)")
    parser.add_argument("--felzenszwalb_sigma", type=float, default=felzenszwalb_defaults.sigma,
                        help="--mask_source felzenszwalb: Gaussian smoothing before segmentation")
    parser.add_argument("--felzenszwalb_min_size", type=int, default=felzenszwalb_defaults.min_size,
                        help="--mask_source felzenszwalb: minimum component size in pixels (merged below)")
    parser.add_argument("--felzenszwalb_min_area", type=int, default=felzenszwalb_defaults.min_area,
                        help="--mask_source felzenszwalb: drop masks with fewer pixels (texture fragments)")
    parser.add_argument("--output_dir", required=True, help="output folder of parquet shards (resumable)")
    parser.add_argument("--device", default=None, help="device for SAM (default: Accelerate's device of the process)")
    parser.add_argument("--shard_size", type=cli.positive_int, default=100,
                        help="images per shard (lost at most on interruption)")
    parser.add_argument("--retry_failed", action="store_true", help="retry images recorded as unreadable")
    parser.add_argument("--max_images", type=cli.positive_int, default=None,
                        help="process at most this many new images per process")
    parser.add_argument("--allow_skips", action="store_true",
                        help="exit with 0 even when images could not be read (they are recorded and skipped)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        type=str.upper, help="logging level")
    args = parser.parse_args(argv)
    if args.mask_source == "sam" and not args.sam_checkpoint:
        parser.error("--mask_source sam needs --sam_checkpoint (or use --mask_source felzenszwalb)")
    return args


MANIFEST = "manifest.json"


def check_manifest_is_ours(output_dir: str | Path) -> None:
    """Refuse an output folder whose ``manifest.json`` was not written by this tool (it is rewritten at the end of
    every run): a file of the user's own with that name is never overwritten."""
    path = Path(output_dir) / MANIFEST
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("dearli-")
            and "shards" in manifest):
        raise cli.CliError(f"{path} was not written by this tool and would be overwritten: move it away or choose "
                           "another --output_dir")


def images_still_without_masks(output_dir: str | Path) -> list[str]:
    """Ids of the images recorded as unreadable in `output_dir` that have no masks (``manifest.json``), this run's
    failures and earlier runs' alike."""
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        return []
    return [str(i) for i in json.loads(path.read_text()).get("failed_image_ids", [])]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cli.prepare_output_dir(args.output_dir)  # before SAM is loaded
    check_manifest_is_ours(args.output_dir)
    if args.image_dir:
        source = args.image_dir
    else:
        source = load_image_split(args.dataset_name, args.split, config_name=args.dataset_config_name,
                                  image_column=args.image_column)
    config = SamGeneratorConfig(
        model_type=args.model_type,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area,
    )
    mask_generator = None
    if args.mask_source == "felzenszwalb":
        mask_generator = FelzenszwalbMaskGenerator(FelzenszwalbConfig(
            scale=args.felzenszwalb_scale, sigma=args.felzenszwalb_sigma, min_size=args.felzenszwalb_min_size,
            min_area=args.felzenszwalb_min_area))
    stats = generate_masks(
        source,
        args.output_dir,
        args.sam_checkpoint,
        config=config,
        mask_generator=mask_generator,
        device=args.device,
        shard_size=args.shard_size,
        retry_failed=args.retry_failed,
        max_images=args.max_images,
        image_column=args.image_column,
        id_column=args.id_column,
        progress=not args.no_progress,
    )
    from accelerate import PartialState

    main_process = PartialState().is_main_process
    if main_process:
        print(
            f"SAM masks: {stats.num_images} images, {stats.num_masks} masks, {stats.num_failed} unreadable, "
            f"{stats.num_skipped} already done; {stats.seconds:.1f} s, {stats.images_per_second:.3f} images/s, "
            f"{stats.masks_per_second:.2f} masks/s -> {args.output_dir}",
            flush=True,
        )
    if stats.num_images + stats.num_failed + stats.num_skipped == 0:
        raise cli.CliError(f"no images found in {args.image_dir or args.dataset_name}")
    without_masks = images_still_without_masks(args.output_dir) if main_process else []
    failed = max(stats.num_failed, len(without_masks))
    if failed and not args.allow_skips:
        logger.error("%d images could not be read and have no masks (recorded in %s/failures-*.jsonl, e.g. %s); "
                     "--retry_failed tries them again, --allow_skips exits with 0", failed, args.output_dir,
                     ", ".join(without_masks[:3]) or "see the log")
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
