"""Class-agnostic mask-decoder warm-up (DeWa, paper Sec. 3.3) on SAM masks (or Felzenszwalb's), with Accelerate.

    accelerate launch training/dewa.py --config dewa_ade20k --masks_dir SAM_OUT --image_dir ADE/images/training \\
        --output_dir runs/dewa_ade20k

Every mask of the labeled and unlabeled training images is a target of one class (masks the crop leaves empty
stay as empty targets, as in the released DeWa; ``--drop_empty_masks`` drops them); the model trains with the
localization loss only (``localization_only``: BCE 5 + dice 5, class weight 0 in the loss and the matcher). Only
the decoder is optimised (AdamW 1e-4, poly schedule, full-model gradient clipping 0.01); the frozen CLIP backbone runs
under ``no_grad`` inside the model. The final model is saved with ``save_pretrained`` in
``--output_dir``: it is the ``--init_from`` of the semi-supervised stage (``training/ssl.py``) and of
``training/supervised.py``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
from collections.abc import Sequence

from training import cli
from training.arguments import mask_training_dataset, parse_args
from training.loop import TrainingResult, prepare_training, run_training, setup_accelerator
from training.model_init import build_model

# The single class of the class-agnostic targets (training/data/assets/class_names/sa1b.txt).
DEWA_CLASS_NAMES = ["segment,object,regular shape"]


def main(argv: Sequence[str] | None = None) -> TrainingResult:
    args = parse_args("dewa", argv, description=__doc__)
    accelerator = setup_accelerator(args)

    dataset = mask_training_dataset(args)
    model = build_model(args, DEWA_CLASS_NAMES, [0], localization_only=True)

    run = prepare_training(args, accelerator, model, {"training": (dataset, args.train_batch_size)})
    return run_training(args, run)


if __name__ == "__main__":
    cli.run(main)
