"""Supervised M2F-Lang baseline on the labeled subset only (paper Table 1 "supervised" rows), with Accelerate.

    accelerate launch training/supervised.py --config supervised_coco_panoptic \\
        --train_images_dir COCO/train2017 --train_panoptic_dir COCO/panoptic_train2017 \\
        --train_annotations COCO/annotations/panoptic_train2017.json --partition 1_512 \\
        --val_images_dir COCO/val2017 --val_panoptic_dir COCO/panoptic_val2017 \\
        --val_annotations COCO/annotations/panoptic_val2017.json --init_from runs/dewa_coco --output_dir runs/sup

Ground-truth panoptic targets under the released scale augmentation (shorter side 0.5-2x the crop, crop, flip), the full
Mask2Former loss with language-based recognition, AdamW 1e-4 / weight decay 0.05 / poly schedule / full-model gradient
clipping, periodic validation (PQ, mIoU with ensembled inference), checkpoints that resume exactly, and a final
``save_pretrained`` (+ image processor) in ``--output_dir``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
from collections.abc import Sequence

from training import cli
from training.arguments import color_augmentation, geometric_augmentation, load_panoptic_training_data, parse_args
from training.data.train_datasets import PanopticTrainDataset
from training.evaluation.validation import make_evaluator
from training.loop import TrainingResult, prepare_training, run_training, setup_accelerator
from training.model_init import build_model


def main(argv: Sequence[str] | None = None) -> TrainingResult:
    args = parse_args("supervised", argv, description=__doc__)
    accelerator = setup_accelerator(args)

    data = load_panoptic_training_data(args)  # the unlabeled rest of a partition is not used
    dataset = PanopticTrainDataset(data.labeled, geometric_augmentation(args),
                                   color_augmentation=color_augmentation(args))
    model = build_model(args, list(data.class_names.names), data.class_names.thing_ids)

    run = prepare_training(args, accelerator, model, {"labeled": (dataset, args.train_batch_size)})
    evaluate = make_evaluator(args, accelerator, data.validation, data.class_names, {"": run.model})
    return run_training(args, run, evaluate=evaluate)


if __name__ == "__main__":
    cli.run(main)
