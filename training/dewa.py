"""Class-agnostic mask-decoder warm-up (DeWa, paper Sec. 3.3) on SAM masks, with Accelerate.

    accelerate launch training/dewa.py --config dewa_ade20k --sam_masks_dir SAM_OUT --image_dir ADE/images/training \\
        --output_dir runs/dewa_ade20k

Every SAM mask of the labeled and unlabeled training images is a target of one class; the model trains with the
localization loss only (``localization_only``: BCE 5 + dice 5, class weight 0 in the loss and the matcher). Only
the decoder is optimised (AdamW 1e-4, weight decay 0.05, poly schedule, full-model gradient clipping 0.01); the frozen
CLIP backbone runs under ``no_grad`` inside the model. The final model is saved with ``save_pretrained`` in
``--output_dir``: it is the ``--init_from`` of the semi-supervised stage (``training/ssl.py``) and of
``training/supervised.py``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import logging
from collections.abc import Sequence

from accelerate.utils import set_seed

from training.arguments import (
    add_common_training_args,
    add_model_args,
    crop_size_pair,
    parse_args_with_config,
)
from training.common import build_image_processor, create_accelerator, setup_logging
from training.data.train_datasets import SamMasksTrainDataset
from training.data.transforms import LargeScaleJitter
from training.loop import TrainingResult, run_training
from training.model_init import build_model

logger = logging.getLogger("training.dewa")

# The single class of the class-agnostic targets (shared/data/class_names/sa1b.txt).
DEWA_CLASS_NAMES = ["segment,object,regular shape"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("SAM data")
    g.add_argument("--sam_masks_dir", type=str, nargs="+", default=None,
                   help="Output folder(s) of scripts/generate_sam_masks.py (parquet shards of SAM masks as RLE).")
    g.add_argument("--image_dir", type=str, nargs="+", default=None,
                   help="Image folder(s) the masks were generated from (a record's image is image_dir/file_name); "
                        "one per --sam_masks_dir, or one for all.")
    g.add_argument("--no_exif_transpose", action="store_true",
                   help="Do not apply EXIF orientation to images (only if the masks were generated that way).")
    add_common_training_args(parser, train_batch_size=16, crop_size=[640], max_train_steps=80_000,
                             checkpointing_steps=5_000, project_name="dearli_dewa")
    add_model_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    if not args.sam_masks_dir or not args.image_dir:
        parser.error("--sam_masks_dir and --image_dir are required (on the command line or in --config)")
    if len(args.image_dir) not in (1, len(args.sam_masks_dir)):
        parser.error("give one --image_dir, or one per --sam_masks_dir")
    if not args.output_dir:
        parser.error("--output_dir is required")
    return args


def build_dataset(args: argparse.Namespace) -> SamMasksTrainDataset:
    """SAM records of every --sam_masks_dir paired with its image folder, under the random scale/crop/flip."""
    from training.data.sam_masks import load_sam_masks

    image_dirs = args.image_dir * len(args.sam_masks_dir) if len(args.image_dir) == 1 else args.image_dir
    sources = []
    for masks_dir, image_dir in zip(args.sam_masks_dir, image_dirs):
        records = load_sam_masks(masks_dir)
        if len(records) == 0:
            raise ValueError(f"no SAM masks in {masks_dir}: run scripts/generate_sam_masks.py first")
        sources.append((records, image_dir))
    transform = LargeScaleJitter(crop_size_pair(args.crop_size), args.min_scale, args.max_scale, args.flip_prob)
    return SamMasksTrainDataset(sources, transform, exif_transpose=not args.no_exif_transpose)


def main(argv: Sequence[str] | None = None) -> TrainingResult:
    args = parse_args(argv)
    accelerator = create_accelerator(args)
    setup_logging(accelerator)
    logger.info(accelerator.state)
    set_seed(args.seed)
    dataset = build_dataset(args)
    logger.info("DeWa on %d images with SAM masks", len(dataset))
    model = build_model(args, DEWA_CLASS_NAMES, [0], localization_only=True)
    set_seed(args.seed, device_specific=True)  # different loss point sampling per process
    return run_training(args, accelerator, model, dataset, image_processor=build_image_processor(model.config))


if __name__ == "__main__":
    main()
