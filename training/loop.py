"""The supervised-style Accelerate loop shared by `dewa.py` (SAM targets) and `supervised.py` (ground truth).

One step: a batch of augmented examples -> Mask2Former loss -> guarded AdamW update (NaN/inf check, full-model
gradient clipping) -> poly LR step. Around it: resumable data order, periodic checkpoints, logging, optional periodic
validation, the final checkpoint and ``save_pretrained``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpointing import TrainingProgress, load_checkpoint, resolve_resume_path, save_checkpoint
from .common import (
    ResumableSampler,
    init_tracking,
    iterate_steps,
    optimization_step,
    per_process_batch_size,
    save_final_model,
)
from .data.collator import DearliDataCollator, model_inputs
from .schedules import build_optimizer, build_poly_scheduler

__all__ = ["TrainingResult", "build_train_dataloader", "run_training"]

logger = logging.getLogger(__name__)

@dataclass
class TrainingResult:
    """What a finished (or resumed-and-finished) run did."""

    final_step: int
    start_step: int
    last_loss: float | None = None
    seconds_per_step: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None


def build_train_dataloader(
    dataset: Dataset, args: Any, num_processes: int, collate_fn: Callable | None = None
) -> tuple[DataLoader, ResumableSampler]:
    """A drop-last loader of per-process batches over a :class:`ResumableSampler` (epochs of at least one global
    batch, so tiny datasets repeat)."""
    batch_size = per_process_batch_size(args.train_batch_size, num_processes)
    sampler = ResumableSampler(len(dataset), seed=args.seed, shuffle=True,
                               epoch_length=max(len(dataset), args.train_batch_size))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=args.num_workers,
        collate_fn=collate_fn or DearliDataCollator(),
        # A private generator: creating loader iterators must not consume the global torch RNG, which the loss's
        # point sampling uses and checkpoints restore.
        generator=torch.Generator().manual_seed(args.seed),
        persistent_workers=False,
    )
    return loader, sampler


def run_training(
    args: Any,
    accelerator: Any,
    model: torch.nn.Module,
    train_dataset: Dataset,
    *,
    evaluate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
    eval_steps: int = 0,
    image_processor: Any = None,
    collate_fn: Callable | None = None,
) -> TrainingResult:
    """Train `model` on `train_dataset` for ``args.max_train_steps`` steps (resuming if asked), then save it.

    `evaluate(model, step)` (optional) returns scalar metrics; it runs every `eval_steps` steps (0: never) and after
    the last step. Uses ``args``: seed, train_batch_size, num_workers, learning_rate, weight_decay, lr_power,
    lr_warmup_steps, max_train_steps, gradient_clip, checkpointing_steps, checkpoints_total_limit,
    resume_from_checkpoint, output_dir, logging_steps, with_tracking.
    """
    train_dataloader, _ = build_train_dataloader(train_dataset, args, accelerator.num_processes, collate_fn)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = build_poly_scheduler(optimizer, args.max_train_steps, args.lr_power, args.lr_warmup_steps)
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    resume_path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path, progress)
    elif args.resume_from_checkpoint:
        logger.info("No checkpoint in %s: starting from scratch", args.output_dir)
    start_step = progress.step
    init_tracking(accelerator, args)

    logger.info("***** Running training *****")
    logger.info("  Examples = %d, global batch = %d (%d processes), steps = %d (starting at %d)", len(train_dataset),
                args.train_batch_size, accelerator.num_processes, args.max_train_steps, start_step)
    logger.info("  Trainable parameters = %d", sum(p.numel() for p in parameters))

    result = TrainingResult(final_step=start_step, start_step=start_step)
    bar = tqdm(total=args.max_train_steps, initial=start_step, desc="train", disable=not accelerator.is_local_main_process)
    window: list[float] = []
    started = time.perf_counter()
    for step, epoch, batch in iterate_steps(accelerator, train_dataloader, start_step, args.max_train_steps):
        model.train()
        outputs = model(**model_inputs(batch))
        loss = outputs.loss
        # Errors name the 1-based step being taken (checkpoint step_N holds the state after N steps).
        grad_norm = optimization_step(accelerator, loss, optimizer, scheduler, parameters, step + 1,
                                      args.gradient_clip, outputs.loss_dict)
        progress.step = step + 1
        loss_value = float(accelerator.reduce(loss.detach().float(), reduction="mean"))
        window.append(loss_value)
        result.last_loss = loss_value
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

        if args.logging_steps and (progress.step % args.logging_steps == 0 or progress.step == args.max_train_steps):
            logs = {"train/loss": sum(window) / len(window), "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": grad_norm, "train/epoch": epoch}
            for key, value in (outputs.loss_dict or {}).items():
                if not key[-1].isdigit():  # final-layer terms; auxiliary ones end in _<layer>
                    logs[f"train/{key}"] = float(value.detach().float())
            window.clear()
            result.history.append({"step": progress.step, **logs})
            if args.with_tracking:
                accelerator.log(logs, step=progress.step)
            logger.info("step %d: %s", progress.step, {k: round(v, 5) for k, v in logs.items()})

        is_last = progress.step == args.max_train_steps
        if is_last or (args.checkpointing_steps and progress.step % args.checkpointing_steps == 0):
            save_checkpoint(accelerator, model, progress, args.output_dir, args.checkpoints_total_limit)
        if evaluate is not None and (is_last or (eval_steps and progress.step % eval_steps == 0)):
            metrics = evaluate(model, progress.step)
            result.metrics = metrics
            if args.with_tracking and metrics:
                accelerator.log(metrics, step=progress.step)
            logger.info("validation at step %d: %s", progress.step, metrics)
    bar.close()

    steps_done = progress.step - start_step
    if steps_done:
        result.seconds_per_step = (time.perf_counter() - started) / steps_done
        logger.info("%d steps in %.1f s (%.3f s/step)", steps_done, steps_done * result.seconds_per_step,
                    result.seconds_per_step)
    result.final_step = progress.step
    save_final_model(accelerator, model, args.output_dir, image_processor)
    if args.with_tracking:
        accelerator.end_training()
    return result
