"""DEARLi semi-supervised training (paper Sec. 3-4, Table 1 "DEARLi"): Mean Teacher with ensembled panoptic
pseudo-labels, with Accelerate.

    accelerate launch training/ssl.py --config ssl_coco_panoptic_1_512 \\
        --train_images_dir COCO/train2017 --train_panoptic_dir COCO/panoptic_train2017 \\
        --train_annotations COCO/annotations/panoptic_train2017.json \\
        --val_images_dir COCO/val2017 --val_panoptic_dir COCO/panoptic_val2017 \\
        --val_annotations COCO/annotations/panoptic_val2017.json \\
        --init_from runs/dewa_coco --output_dir runs/ssl_coco_1_512

Every step takes ``--train_batch_size`` labeled crops (ground truth) and ``--unlabeled_batch_size`` unlabeled crops
(the training images outside the labeled ``--partition``). The teacher (EMA of the student's decoder, gamma 0.999,
sharing the frozen CLIP backbone) labels the weak view: ensembled posteriors (Eq. 6, alpha 0.6) -> panoptic inference
(threshold 0.0, overlap 0.8) -> hard pseudo-labels; the student learns them on the strong view (colour jitter,
grayscale, blur, CutMix). Loss = Mask2Former loss on labeled + on pseudo-labeled images; AdamW 1e-4, weight decay
0.05, poly schedule, 80k iterations. See :mod:`training.ssl_step` for one step and :mod:`training.ema` for the teacher.

Checkpoints (``--checkpointing_steps``) hold the student, optimizer, scheduler, RNG states, the step and the teacher
(weights + EMA step) and resume exactly (``--resume_from_checkpoint latest``). Validation (``--eval_steps``) reports
PQ and mIoU of the student and of the teacher. The final student is saved with ``save_pretrained`` (+ image processor)
in ``--output_dir`` (the paper reports the student of the last iteration) and the teacher in ``--output_dir/teacher``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training.arguments import (
    add_common_training_args,
    add_model_args,
    crop_size_pair,
    parse_args_with_config,
)
from training.checkpointing import TrainingProgress, load_checkpoint, resolve_resume_path, save_checkpoint
from training.common import (
    build_image_processor,
    create_accelerator,
    init_tracking,
    iterate_steps,
    save_final_model,
    setup_logging,
)
from training.data.collator import DearliDataCollator
from training.data.strong_augmentations import StrongAugmentation, StrongAugmentationConfig
from training.data.train_datasets import PanopticTrainDataset
from training.data.transforms import LargeScaleJitter
from training.ema import MeanTeacher
from training.evaluation.validation import PanopticEvalDataset, evaluate_panoptic
from training.loop import TrainingResult, build_train_dataloader
from training.model_init import adapt_class_names, build_model
from training.schedules import build_optimizer, build_poly_scheduler
from training.ssl_step import StudentViewBuilder, UnlabeledTrainDataset, ssl_train_step
from training.supervised import add_panoptic_data_args, flatten_metrics, load_datasets

logger = logging.getLogger("training.ssl")


def add_ssl_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Mean Teacher, pseudo-label and strong-augmentation flags."""
    g = parser.add_argument_group("semi-supervised learning")
    g.add_argument("--unlabeled_batch_size", type=int, default=8,
                   help="Unlabeled images per step over all processes (the labeled ones are --train_batch_size).")
    g.add_argument("--unlabeled_weight", type=float, default=1.0,
                   help="Weight of the unlabeled (pseudo-label) loss; the paper sums both losses (1.0).")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay gamma of the teacher (Eq. 2).")
    g.add_argument("--teacher_init", type=str, default=None,
                   help="Initial teacher weights (a save_pretrained DEARLi folder). Without it the teacher starts "
                        "as a copy of the student and the decay ramps up as min(1 - 1/(t+1), gamma).")
    g.add_argument("--pseudo_label_alpha", type=float, default=None,
                   help="Eq. 6 ensembling weight of the teacher's decoder posterior (default: the model's "
                        "ensemble_alpha, 0.6; 1 = no CLIP ensembling).")
    g.add_argument("--pseudo_label_threshold", type=float, default=0.0,
                   help="Teacher panoptic inference: keep queries whose best class probability exceeds this.")
    g.add_argument("--pseudo_label_overlap_threshold", type=float, default=0.8,
                   help="Teacher panoptic inference: minimal visible fraction of a query's mask.")
    g.add_argument("--color_jitter_prob", type=float, default=1.0,
                   help="Probability of colour jitter (0.8, 0.8, 0.8, 0.2) on the strong view (reference: always).")
    g.add_argument("--grayscale_prob", type=float, default=0.2, help="Probability of grayscale on the strong view.")
    g.add_argument("--blur_prob", type=float, default=0.5,
                   help="Probability of Gaussian blur (sigma in [0.1, 2]) on the strong view.")
    g.add_argument("--cutmix_prob", type=float, default=0.5,
                   help="Probability of a CutMix box (2-40%% of the crop, aspect 0.3-3.3) per unlabeled image; 0 "
                        "disables CutMix.")
    g.add_argument("--final_model", type=str, default="student", choices=["student", "teacher"],
                   help="Which model is saved in --output_dir (the other goes to a sub-folder 'teacher' or "
                        "'student'). The paper evaluates the student of the last iteration.")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_panoptic_data_args(parser)
    add_ssl_args(parser)
    add_common_training_args(parser, train_batch_size=8, crop_size=[640], max_train_steps=80_000,
                             checkpointing_steps=5_000, project_name="dearli_ssl")
    add_model_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    if not args.output_dir:
        parser.error("--output_dir is required")
    if args.dataset_name == "ade20k":
        if not args.ade20k_root:
            parser.error("--dataset_name ade20k needs --ade20k_root")
    elif not (args.train_images_dir and args.train_panoptic_dir and args.train_annotations):
        parser.error("--train_images_dir, --train_panoptic_dir and --train_annotations are required")
    if bool(args.partition) == bool(args.labeled_fraction):
        parser.error("give exactly one of --partition and --labeled_fraction (the rest of the training set is the "
                     "unlabeled data)")
    return args


def load_ssl_datasets(args: argparse.Namespace) -> tuple[Any, Any, Any | None, Any]:
    """(labeled, unlabeled, validation or None, ClassNames): the training set split by --partition/--labeled_fraction
    (loading, class restriction and validation set via `training.supervised.load_datasets`)."""
    from training.data import panoptic_datasets as pd

    full_args = copy.copy(args)
    full_args.partition, full_args.labeled_fraction = None, None
    train, val, class_names = load_datasets(full_args)
    if args.partition:
        split_name = "coco" if args.dataset_name.startswith("coco") else args.dataset_name
        labeled, unlabeled = pd.split_labeled_unlabeled(train, dataset=split_name, partition=args.partition)
    else:
        labeled, unlabeled = pd.split_labeled_unlabeled(train, fraction=args.labeled_fraction, seed=args.seed)
    if len(labeled) == 0 or len(unlabeled) == 0:
        raise ValueError(f"need labeled and unlabeled images, got {len(labeled)} and {len(unlabeled)}")
    return labeled, unlabeled, val, class_names


def build_teacher(args: argparse.Namespace, student: torch.nn.Module, class_names: Any) -> MeanTeacher:
    """The EMA teacher of the (unwrapped) student, optionally from --teacher_init weights."""
    state = None
    if args.teacher_init:
        from modeling_dearli import DearliForPanopticSegmentation

        initial = DearliForPanopticSegmentation.from_pretrained(args.teacher_init)
        initial = adapt_class_names(initial, list(class_names.names), class_names.thing_ids, args.clip_pretrained)
        state = initial.state_dict()
        del initial
    teacher = MeanTeacher(student, decay=args.ema_decay, teacher_state_dict=state)
    logger.info("Teacher: EMA decay %.4f (%s), %d own parameters, backbone shared with the student", args.ema_decay,
                "ramp-up min(1 - 1/(t+1), gamma)" if teacher.ramp_up else "given weights, constant decay",
                sum(v.numel() for v in teacher.teacher_weights().values()))
    return teacher


def make_evaluator(args: argparse.Namespace, accelerator: Any, val: Any, class_names: Any):
    """`evaluate({name: model}, step)` -> metrics ``eval/<name>/PQ`` ... (None without validation data)."""
    if val is None or len(val) == 0:
        return None
    dataset = PanopticEvalDataset(val, args.eval_shortest_edge, args.eval_max_size, with_semantic=True,
                                  class_names=class_names)
    loader = DataLoader(dataset, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.num_workers,
                        collate_fn=DearliDataCollator())
    loader = accelerator.prepare_data_loader(loader, device_placement=True)

    def evaluate(models: dict[str, torch.nn.Module], step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        reports = {}
        for name, model in models.items():
            report = evaluate_panoptic(model, loader, accelerator, alpha=args.eval_alpha, threshold=args.eval_threshold,
                                       overlap_threshold=args.eval_overlap_threshold)
            reports[name] = report
            metrics.update(flatten_metrics(report, prefix=f"eval/{name}/"))
        if accelerator.is_main_process:
            path = Path(args.output_dir) / "eval_results.json"
            path.write_text(json.dumps({"step": step, **metrics, "reports": reports}, indent=1, default=str))
        return metrics

    return evaluate


def check_teacher_synchronized(accelerator: Any, teacher: MeanTeacher) -> None:
    """Raise if the teacher weights differ between processes (they must: every process averages the same student)."""
    if accelerator.num_processes == 1:
        return
    sums = accelerator.gather(teacher.checksum().to(accelerator.device)[None]).cpu()
    if not bool((sums == sums[0]).all()):
        raise RuntimeError(f"teacher weights differ across processes: {sums.tolist()}")
    logger.info("Teacher weights identical on %d processes (EMA step %d)", accelerator.num_processes, teacher.step)


def _step_generator(seed: int, step: int, process_index: int) -> torch.Generator:
    """The strong-augmentation RNG of one step and process (a pure function: resumed runs draw the same)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + process_index)


def main(argv: Sequence[str] | None = None) -> TrainingResult:
    args = parse_args(argv)
    accelerator = create_accelerator(args)
    setup_logging(accelerator)
    logger.info(accelerator.state)
    set_seed(args.seed)

    labeled, unlabeled, val, class_names = load_ssl_datasets(args)
    logger.info("Semi-supervised training: %d labeled, %d unlabeled images, %d classes", len(labeled), len(unlabeled),
                len(class_names))
    transform = LargeScaleJitter(crop_size_pair(args.crop_size), args.min_scale, args.max_scale)
    labeled_dataset = PanopticTrainDataset(labeled, transform)
    unlabeled_dataset = UnlabeledTrainDataset(unlabeled, transform)
    model = build_model(args, list(class_names.names), class_names.thing_ids, localization_only=False)
    set_seed(args.seed, device_specific=True)  # different loss point sampling per process

    labeled_loader, _ = build_train_dataloader(labeled_dataset, args, accelerator.num_processes)
    unlabeled_args = argparse.Namespace(**{**vars(args), "train_batch_size": args.unlabeled_batch_size,
                                           "seed": args.seed + 1})
    unlabeled_loader, _ = build_train_dataloader(unlabeled_dataset, unlabeled_args, accelerator.num_processes)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = build_poly_scheduler(optimizer, args.max_train_steps, args.lr_power, args.lr_warmup_steps)
    model, optimizer, labeled_loader, unlabeled_loader, scheduler = accelerator.prepare(
        model, optimizer, labeled_loader, unlabeled_loader, scheduler
    )
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    student = accelerator.unwrap_model(model)
    teacher = build_teacher(args, student, class_names)

    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    accelerator.register_for_checkpointing(teacher)
    resume_path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path, progress)
        logger.info("Teacher restored at EMA step %d", teacher.step)
    elif args.resume_from_checkpoint:
        logger.info("No checkpoint in %s: starting from scratch", args.output_dir)
    start_step = progress.step
    init_tracking(accelerator, args)

    config = student.config
    alpha = config.ensemble_alpha if args.pseudo_label_alpha is None else args.pseudo_label_alpha
    strong = StrongAugmentation(StrongAugmentationConfig(
        color_jitter_p=args.color_jitter_prob, grayscale_p=args.grayscale_prob, blur_p=args.blur_prob,
        cutmix_p=args.cutmix_prob,
    ))
    view_builder = StudentViewBuilder(
        teacher, strong, stuff_classes=config.stuff_ids, num_classes=config.num_classes, alpha=alpha,
        threshold=args.pseudo_label_threshold, overlap_threshold=args.pseudo_label_overlap_threshold,
        cutmix=args.cutmix_prob > 0,
    )
    evaluate = make_evaluator(args, accelerator, val, class_names)

    logger.info("***** Running semi-supervised training *****")
    logger.info("  Per step: %d labeled + %d unlabeled images (%d processes); steps = %d (starting at %d)",
                args.train_batch_size, args.unlabeled_batch_size, accelerator.num_processes, args.max_train_steps,
                start_step)
    logger.info("  Trainable parameters = %d; pseudo-labels: alpha %.2f, threshold %.2f, overlap %.2f",
                sum(p.numel() for p in parameters), alpha, args.pseudo_label_threshold,
                args.pseudo_label_overlap_threshold)

    result = TrainingResult(final_step=start_step, start_step=start_step)
    bar = tqdm(total=args.max_train_steps, initial=start_step, desc="ssl",
               disable=not accelerator.is_local_main_process)
    window: list[torch.Tensor] = []
    keys = ["loss", "loss_labeled", "loss_unlabeled", "pseudo/segments_per_image", "pseudo/mean_confidence",
            "pseudo/void_fraction", "pseudo/cutmix_fraction"]
    started = time.perf_counter()
    labeled_steps = iterate_steps(accelerator, labeled_loader, start_step, args.max_train_steps)
    unlabeled_steps = iterate_steps(accelerator, unlabeled_loader, start_step, args.max_train_steps)
    for (step, epoch, labeled_batch), (_, _, unlabeled_batch) in zip(labeled_steps, unlabeled_steps):
        out = ssl_train_step(
            accelerator, model, teacher, view_builder, optimizer, scheduler, labeled_batch, unlabeled_batch,
            _step_generator(args.seed, step, accelerator.process_index), step, parameters=parameters,
            gradient_clip=args.gradient_clip, unlabeled_weight=args.unlabeled_weight,
        )
        progress.step = step + 1
        stats = out.pseudo_label_statistics
        values = torch.tensor([out.loss, out.labeled_loss, out.unlabeled_loss, stats["segments_per_image"],
                               stats["mean_confidence"], stats["void_fraction"], stats["cutmix_fraction"]],
                              dtype=torch.float64, device=accelerator.device)
        values = accelerator.reduce(values, reduction="mean").cpu()
        window.append(values)
        result.last_loss = float(values[0])
        lr = scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{values[0]:.3f}", unl=f"{values[2]:.3f}", segs=f"{values[3]:.1f}", lr=f"{lr:.2e}")

        is_last = progress.step == args.max_train_steps
        if args.logging_steps and (progress.step % args.logging_steps == 0 or is_last):
            mean = torch.stack(window).mean(0)
            window.clear()
            logs = {f"train/{k}": float(v) for k, v in zip(keys, mean)}
            logs.update({"train/lr": lr, "train/grad_norm": out.grad_norm, "train/ema_decay": out.ema_decay,
                         "train/epoch": epoch})
            logs.update({f"train/labeled/{k}": v for k, v in out.labeled_terms.items()})
            logs.update({f"train/unlabeled/{k}": v for k, v in out.unlabeled_terms.items()})
            result.history.append({"step": progress.step, **logs})
            if args.with_tracking:
                accelerator.log(logs, step=progress.step)
            logger.info("step %d: %s", progress.step, {k: round(v, 5) for k, v in logs.items()})
        if is_last or (args.checkpointing_steps and progress.step % args.checkpointing_steps == 0):
            check_teacher_synchronized(accelerator, teacher)
            save_checkpoint(accelerator, model, progress, args.output_dir, args.checkpoints_total_limit)
        if evaluate is not None and (is_last or (args.eval_steps and progress.step % args.eval_steps == 0)):
            metrics = evaluate({"student": model, "teacher": teacher.teacher}, progress.step)
            result.metrics = metrics
            if args.with_tracking and metrics:
                accelerator.log(metrics, step=progress.step)
            logger.info("validation at step %d: %s", progress.step, {k: round(v, 3) for k, v in metrics.items()})
    bar.close()

    steps_done = progress.step - start_step
    if steps_done:
        result.seconds_per_step = (time.perf_counter() - started) / steps_done
        logger.info("%d steps in %.1f s (%.3f s/step)", steps_done, steps_done * result.seconds_per_step,
                    result.seconds_per_step)
    result.final_step = progress.step
    image_processor = build_image_processor()
    other = "teacher" if args.final_model == "student" else "student"
    final, secondary = (model, teacher.teacher) if args.final_model == "student" else (teacher.teacher, model)
    save_final_model(accelerator, final, args.output_dir, image_processor)
    save_final_model(accelerator, secondary, os.path.join(args.output_dir, other), image_processor)
    if args.with_tracking:
        accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
