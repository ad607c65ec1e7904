"""Supervised M2F-Lang baseline on the labeled subset only (paper Table 1 "supervised" rows), with Accelerate.

    accelerate launch training/supervised.py --config supervised_coco_panoptic \\
        --train_images_dir COCO/train2017 --train_panoptic_dir COCO/panoptic_train2017 \\
        --train_annotations COCO/annotations/panoptic_train2017.json --partition 1_512 \\
        --val_images_dir COCO/val2017 --val_panoptic_dir COCO/panoptic_val2017 \\
        --val_annotations COCO/annotations/panoptic_val2017.json --init_from runs/dewa_coco --output_dir runs/sup

Ground-truth panoptic targets under large-scale jitter (random scale of the crop size, crop, flip), the full
Mask2Former loss with language-based recognition, AdamW 1e-4 / weight decay 0.05 / poly schedule / full-model gradient
clipping, periodic validation (PQ, mIoU with ensembled inference), checkpoints that resume exactly, and a final
``save_pretrained`` (+ image processor) in ``--output_dir``.
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
from training.data.train_datasets import PanopticTrainDataset
from training.data.transforms import LargeScaleJitter
from training.loop import TrainingResult, run_training
from training.model_init import build_model
from training.panoptic_setup import (  # noqa: F401  (re-exported: ssl.py imports them from here)
    add_panoptic_data_args,
    check_panoptic_data_args,
    flatten_metrics,
    load_datasets,
    make_evaluator,
)

logger = logging.getLogger("training.supervised")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_panoptic_data_args(parser)
    add_common_training_args(parser, train_batch_size=16, crop_size=[640], max_train_steps=80_000,
                             checkpointing_steps=5_000, project_name="dearli_supervised")
    add_model_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    if not args.output_dir:
        parser.error("--output_dir is required")
    check_panoptic_data_args(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> TrainingResult:
    args = parse_args(argv)
    accelerator = create_accelerator(args)
    setup_logging(accelerator)
    logger.info(accelerator.state)
    set_seed(args.seed)
    train, val, class_names = load_datasets(args)
    logger.info("Supervised training on %d labeled images, %d classes", len(train), len(class_names))
    transform = LargeScaleJitter(crop_size_pair(args.crop_size), args.min_scale, args.max_scale, args.flip_prob)
    dataset = PanopticTrainDataset(train, transform)
    model = build_model(args, list(class_names.names), class_names.thing_ids, localization_only=False)
    set_seed(args.seed, device_specific=True)
    evaluate = make_evaluator(args, accelerator, val, class_names)
    return run_training(args, accelerator, model, dataset, evaluate=evaluate, eval_steps=args.eval_steps,
                        image_processor=build_image_processor(model.config))


if __name__ == "__main__":
    main()
