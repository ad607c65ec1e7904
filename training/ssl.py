"""DEARLi semi-supervised training (paper Sec. 3-4, Table 1 "DEARLi"): Mean Teacher with ensembled panoptic
pseudo-labels, with Accelerate.

    accelerate launch training/ssl.py --config ssl_coco_panoptic_1_512 \\
        --train_images_dir COCO/train2017 --train_panoptic_dir COCO/panoptic_train2017 \\
        --train_annotations COCO/annotations/panoptic_train2017.json \\
        --val_images_dir COCO/val2017 --val_panoptic_dir COCO/panoptic_val2017 \\
        --val_annotations COCO/annotations/panoptic_val2017.json \\
        --init_from runs/dewa_coco --output_dir runs/ssl_coco_1_512

Every step takes ``--train_batch_size`` labeled crops (ground truth) and ``--unlabeled_batch_size`` unlabeled crops
(the training images outside the labeled ``--partition``, a shipped partition or a file listing your labeled images,
and the images of ``--unlabeled_images_dir``, folders without annotations). The teacher (EMA of the student's
decoder, gamma 0.999, sharing the frozen CLIP backbone) labels the weak view: ensembled posteriors (Eq. 6, the
model's ``ensemble_alpha``) -> panoptic inference (threshold 0.0, overlap 0.8) -> hard pseudo-labels; the student
learns them on the strong view (colour jitter, grayscale, blur, CutMix with a box of a separate unlabeled crop and
its teacher pseudo-label). As in the reference's DEARLi runs, student and teacher both start from ``--init_from``
(the DeWa output) with a constant EMA decay from step 0 (from a fresh model the decay ramps up), and training is
fp32. Loss = Mask2Former loss on labeled + on pseudo-labeled images; AdamW 1e-4, weight decay 0.05 (none on norms
and embeddings), poly schedule, 80k iterations. One step is :class:`MeanTeacherStep` below; the unlabeled targets
come from :class:`training.student_views.StudentViewBuilder` (teacher pseudo-labels: :mod:`training.pseudo_labels`)
and the teacher from :mod:`training.ema`. ``--pseudo_label_eval_steps N`` scores the teacher's pseudo-labels against
the unlabeled images' ground truth during training (:mod:`training.evaluation.pseudo_label_quality`).

Checkpoints (``--checkpointing_steps``) hold the student, optimizer, scheduler, RNG states, the step and the teacher
(``ema_teacher.safetensors`` + ``ema_teacher.json``: weights + EMA step) and resume exactly
(``--resume_from_checkpoint latest``). Validation (``--eval_steps``) reports
PQ and mIoU of the student and of the teacher. The final student is saved with ``save_pretrained`` (+ image processor)
in ``--output_dir`` (the paper reports the student of the last iteration) and the teacher in ``--output_dir/teacher``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from training import cli
from training.arguments import color_augmentation, geometric_augmentation, load_panoptic_training_data, parse_args
from training.data.collator import model_inputs
from training.data.strong_augmentations import StrongAugmentation, StrongAugmentationConfig
from training.data.train_datasets import PanopticTrainDataset, UnlabeledTrainDataset
from training.ema import MeanTeacher
from training.evaluation.pseudo_label_quality import PseudoLabelMonitor
from training.evaluation.validation import make_evaluator
from training.loop import (
    PreparedTraining,
    StepOutput,
    TrainingResult,
    prepare_training,
    run_training,
    setup_accelerator,
)
from training.model_init import adapt_class_names, build_model
from training.pretrained import check_finite_weights, check_model_location
from training.student_views import StudentViewBuilder, strong_augmentation_generator

logger = logging.getLogger("training.ssl")


def build_teacher(args: Any, student: nn.Module, class_names: Any) -> MeanTeacher:
    """The EMA teacher of the (unwrapped) student: a copy of it, or --teacher_init weights; EMA decay by
    --ema_schedule (``auto``: constant when the teacher starts from given weights, --init_from or --teacher_init,
    as the reference's DEARLi runs; ramp-up from a fresh model)."""
    schedule = getattr(args, "ema_schedule", "auto")
    if schedule not in ("auto", "constant", "ramp_up"):
        raise ValueError(f"unknown ema_schedule {schedule!r}")
    given = bool(args.teacher_init or getattr(args, "init_from", None))
    ramp_up = not given if schedule == "auto" else schedule == "ramp_up"
    state = None
    if args.teacher_init:
        from modeling_dearli import DearliForPanopticSegmentation

        location = check_model_location(args.teacher_init)
        initial = check_finite_weights(DearliForPanopticSegmentation.from_pretrained(location), location)
        initial = adapt_class_names(initial, list(class_names.names), class_names.thing_ids, args.clip_pretrained)
        state = initial.state_dict()
        del initial
    teacher = MeanTeacher(student, decay=args.ema_decay, ramp_up=ramp_up, teacher_state_dict=state)
    logger.info("Teacher: EMA decay %.4f (%s), from %s, %d own parameters, backbone shared with the student",
                args.ema_decay, "ramp-up min(1 - 1/(t+1), gamma)" if teacher.ramp_up else "constant from step 0",
                args.teacher_init or getattr(args, "init_from", None) or "the fresh student",
                sum(v.numel() for v in teacher.teacher_weights().values()))
    return teacher


@dataclass
class MeanTeacherStep:
    """One step of the semi-supervised stage (paper Eq. 1-2): ``L = L_sup + unlabeled_weight * L_unl``, then the EMA
    update of the teacher.

    ``L_sup`` is the Mask2Former loss on the labeled batch; ``L_unl`` the same loss of the student on the strong view
    of the unlabeled batch, against the teacher's hard pseudo-labels of the weak view (``views``). The two terms are
    back-propagated one after the other (the first without gradient synchronisation): the gradient of their sum, with
    the activations of only one half-batch alive at a time.
    """

    teacher: MeanTeacher
    views: StudentViewBuilder
    unlabeled_weight: float = 1.0
    seed: int = 0

    def __call__(self, run: PreparedTraining, batches: Mapping[str, Any], step: int) -> StepOutput:
        generator = strong_augmentation_generator(self.seed, step, run.accelerator.process_index)
        # Teacher on the weak view -> ensembled pseudo-labels (Eq. 6); strong view + CutMix -> the student's targets.
        unlabeled = self.views(batches["unlabeled"], generator)
        with run.accelerator.no_sync(run.model):
            loss_sup, terms_sup = run.forward_backward(model_inputs(batches["labeled"]), step)
        loss_unl, terms_unl = run.forward_backward(unlabeled.model_inputs(), step, weight=self.unlabeled_weight)
        grad_norm = run.update(step)
        ema_decay = self.teacher.update(run.model)
        return StepOutput(
            {"loss": loss_sup + loss_unl, "loss_labeled": loss_sup, "loss_unlabeled": loss_unl,
             **{f"pseudo/{k}": v for k, v in unlabeled.statistics.items()}},
            {"grad_norm": grad_norm, "ema_decay": ema_decay, **{f"labeled/{k}": v for k, v in terms_sup.items()},
             **{f"unlabeled/{k}": v for k, v in terms_unl.items()}},
        )


def build_views(args: Any, teacher: MeanTeacher, config: Any, accelerator: Any) -> StudentViewBuilder:
    """The unlabeled half's pseudo-labels and strong views from the SSL flags."""
    brightness, contrast, saturation, hue = args.color_jitter
    strong = StrongAugmentation(StrongAugmentationConfig(
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob, blur_prob=args.blur_prob,
        cutmix_prob=args.cutmix_prob,
    ))
    views = StudentViewBuilder(
        teacher, strong, stuff_ids=config.stuff_ids, num_classes=config.num_classes,
        threshold=args.pseudo_label_threshold, overlap_threshold=args.pseudo_label_overlap_threshold,
        cutmix=args.cutmix_prob > 0, cutmix_source=args.cutmix_source, teacher_autocast=accelerator.autocast,
    )
    logger.info("Pseudo-labels: ensemble_alpha %.2f, threshold %.2f, overlap %.2f; strong view: colour jitter p %.2f "
                "%s, grayscale p %.2f, blur p %.2f, CutMix p %.2f from %s", views.ensemble_alpha,
                args.pseudo_label_threshold, args.pseudo_label_overlap_threshold, args.color_jitter_prob,
                args.color_jitter, args.grayscale_prob, args.blur_prob, args.cutmix_prob, args.cutmix_source)
    return views


def main(argv: Sequence[str] | None = None) -> TrainingResult:
    args = parse_args("ssl", argv, description=__doc__)
    accelerator = setup_accelerator(args)

    data = load_panoptic_training_data(args)
    if data.unlabeled is None or len(data.labeled) == 0 or len(data.unlabeled) == 0:
        raise ValueError(f"need labeled and unlabeled images, got {len(data.labeled)} and "
                         f"{0 if data.unlabeled is None else len(data.unlabeled)}")
    transform = geometric_augmentation(args)
    labeled = PanopticTrainDataset(data.labeled, transform, color_augmentation=color_augmentation(args))
    separate_cutmix = args.cutmix_prob > 0 and args.cutmix_source == "separate_image"
    datasets = {"labeled": (labeled, args.train_batch_size),
                "unlabeled": (UnlabeledTrainDataset(data.unlabeled, transform, cutmix_source=separate_cutmix),
                              args.unlabeled_batch_size)}
    model = build_model(args, list(data.class_names.names), data.class_names.thing_ids)

    run = prepare_training(args, accelerator, model, datasets)
    teacher = build_teacher(args, run.unwrapped_model, data.class_names)
    views = build_views(args, teacher, run.unwrapped_model.config, accelerator)
    train_step = MeanTeacherStep(teacher, views, unlabeled_weight=args.unlabeled_weight, seed=args.seed)

    monitors = []
    if args.pseudo_label_eval_steps:
        monitor = PseudoLabelMonitor(
            accelerator, data.unlabeled, data.class_names, teacher.teacher, run.model,
            ensemble_alpha=views.ensemble_alpha, threshold=args.pseudo_label_threshold,
            overlap_threshold=args.pseudo_label_overlap_threshold, shortest_edge=args.eval_shortest_edge,
            longest_edge=args.eval_longest_edge, num_images=args.pseudo_label_eval_images, seed=args.seed,
            output_dir=args.output_dir, batch_size=args.eval_batch_size, num_workers=args.num_workers)
        monitors.append((args.pseudo_label_eval_steps, monitor))

    models = {"student": run.model, "teacher": teacher.teacher}
    other = "teacher" if args.final_model == "student" else "student"
    return run_training(
        args, run, train_step,
        checkpointed={"ema_teacher": teacher},
        before_checkpoint=lambda: teacher.check_synchronized(accelerator),
        evaluate=make_evaluator(args, accelerator, data.validation, data.class_names, models),
        monitors=monitors,
        final_models={"": models[args.final_model], other: models[other]},
    )


if __name__ == "__main__":
    cli.run(main)
