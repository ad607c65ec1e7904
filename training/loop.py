"""The Accelerate training loop of all three entry points (``dewa.py``, ``supervised.py``, ``ssl.py``).

A loop is: :func:`setup_accelerator` (logging, mixed precision, trackers, seed) -> :func:`prepare_training` (one
resumable data loader per training dataset, AdamW on the trainable parameters, poly schedule, ``accelerator.prepare``)
-> :func:`run_training` with the loop's own step function. :func:`run_training` owns everything around the step:
resuming (model, optimizer, scheduler, RNG, data position and any extra state such as the EMA teacher), logging
(progress bar, windowed averages over processes, trackers), checkpoint and evaluation timing, the NaN guard (a
non-finite loss or gradient norm raises :class:`training.checkpointing.NonFiniteError` with its step before anything
is written) and the final ``save_pretrained`` of the model(s) with their image processor.

A step function ``train_step(run, batches, step)`` gets the :class:`PreparedTraining`, one batch per dataset (by name)
and the 1-based number of the step it takes (checkpoint ``step_N`` holds the state after N steps); it accumulates
gradients with :meth:`PreparedTraining.forward_backward` (NaN-guarded), updates the weights with
:meth:`PreparedTraining.update` (the one optimizer tail) and returns a :class:`StepOutput`. :func:`supervised_step` is
DeWa's and the supervised baseline's; :class:`training.ssl.MeanTeacherStep` is the semi-supervised one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from modeling_dearli.image_processing_dearli import DearliImageProcessor

from .checkpointing import (
    NonFiniteError,
    TrainingProgress,
    assert_finite_parameters,
    check_output_dir,
    load_checkpoint,
    resolve_resume_path,
    save_checkpoint,
)
from .cli import prepare_output_dir
from .data.collator import DearliDataCollator, model_inputs
from .data.sampler import ResumableSampler
from .schedules import build_optimizer, build_poly_scheduler

__all__ = [
    "PreparedTraining",
    "SkippedSamples",
    "StepOutput",
    "TooManySkippedSamples",
    "TrainingResult",
    "available_cpus",
    "build_train_dataloader",
    "check_finite_loss",
    "clamp_num_workers",
    "clip_and_check_gradients",
    "final_layer_terms",
    "iterate_steps",
    "per_process_batch_size",
    "prepare_training",
    "run_training",
    "save_final_model",
    "setup_accelerator",
    "supervised_step",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Set-up: accelerator, logging, tracking
# --------------------------------------------------------------------------------------------------------------------
def setup_logging(accelerator: Any) -> None:
    """transformers-example logging: INFO on the main process, errors only elsewhere."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        # accelerate logs every file of a checkpoint (8-11 INFO lines); training.checkpointing logs one per checkpoint.
        for name in ("accelerate.accelerator", "accelerate.checkpointing"):
            logging.getLogger(name).setLevel(logging.WARNING)
    else:
        logging.getLogger().setLevel(logging.ERROR)
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def resolve_mixed_precision(mixed_precision: str | None) -> str:
    """'auto' -> 'bf16' on a CUDA device with bf16 support, 'fp16' on other CUDA devices, 'no' elsewhere (CPU, or
    ``accelerate launch --cpu``); other values are returned unchanged. 'bf16' on a CPU (accelerate's CPU autocast)
    needs native bf16 instructions (``avx512_bf16`` / AMX): refused with a ``ValueError`` on a CPU without them, where
    torch would emulate bf16 more slowly than float32."""
    if mixed_precision not in (None, "auto", "bf16"):
        return mixed_precision
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The process state as the Accelerator will build it (``accelerate launch --cpu`` sets ACCELERATE_USE_CPU, which
    # the Accelerator reads and a bare PartialState() does not: built without it, a multi-process CPU launch would
    # come up as one process).
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    if mixed_precision in (None, "auto"):
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if device.type == "cpu" and mixed_precision == "bf16":
        from modeling_dearli.precision import check_bf16_supported

        try:
            check_bf16_supported(device)
        except ValueError as error:
            raise ValueError(f"--mixed_precision {error}") from None
    return mixed_precision


def setup_accelerator(args: Any, **kwargs: Any):
    """The run's `Accelerator` (``--output_dir``, ``--mixed_precision``, ``--with_tracking``, ``--report_to``), with
    transformers-example logging and ``--seed`` set (the same on every process, for the model initialisation).

    The LR scheduler is stepped once per optimisation step whatever the number of processes
    (``step_scheduler_with_optimizer=False``): ``--train_batch_size`` is the global batch, so the schedule length does
    not depend on the process count. Tracker logs go to ``<output_dir>/logs``.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if not args.output_dir:
        raise ValueError("--output_dir is required")
    project_config = ProjectConfiguration(project_dir=args.output_dir,
                                          logging_dir=os.path.join(args.output_dir, "logs"))
    log_with = None
    if args.with_tracking:
        log_with = [name.strip() for name in str(args.report_to).split(",") if name.strip()]
        log_with = "all" if log_with == ["all"] else log_with
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=log_with,
        project_config=project_config,
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
    check_output_dir(args.output_dir, args.resume_from_checkpoint, getattr(args, "overwrite_output_dir", False),
                     accelerator.is_main_process)  # a finished run is never replaced unasked
    if accelerator.is_main_process:
        prepare_output_dir(args.output_dir)  # created and checked for writing before any model is built
    accelerator.wait_for_everyone()
    setup_logging(accelerator)
    logger.info(accelerator.state)
    args.num_workers = clamp_num_workers(args.num_workers)
    set_seed(args.seed)
    return accelerator


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (what `DataLoader` checks its worker count against), else
    ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def clamp_num_workers(requested: int) -> int:
    """``--num_workers`` limited to the CPUs available (one log line when it is lowered)."""
    cpus = available_cpus()
    if requested > cpus:
        logger.info("DataLoader workers: %d requested, %d CPUs available: using %d", requested, cpus, cpus)
        return cpus
    return requested


def _hparam(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def init_tracking(accelerator: Any, args: Any) -> None:
    """Start the trackers (``--with_tracking``) with the run's arguments as hyper-parameters."""
    if args.with_tracking:
        config = {k: _hparam(v) for k, v in sorted(vars(args).items())}
        accelerator.init_trackers(args.project_name, config=config)


# --------------------------------------------------------------------------------------------------------------------
# Data loaders and the step sequence
# --------------------------------------------------------------------------------------------------------------------
def per_process_batch_size(global_batch_size: int, num_processes: int) -> int:
    """The per-process share of a global batch (must divide evenly)."""
    if global_batch_size < num_processes or global_batch_size % num_processes:
        raise ValueError(
            f"the global batch size {global_batch_size} must be a positive multiple of the {num_processes} processes"
        )
    return global_batch_size // num_processes


def build_train_dataloader(
    dataset: Dataset,
    batch_size: int,
    num_processes: int,
    *,
    seed: int,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A drop-last loader of per-process shares of the global `batch_size` over a :class:`ResumableSampler` (epochs
    of at least one global batch, so tiny datasets repeat)."""
    sampler = ResumableSampler(len(dataset), seed=seed, shuffle=True, epoch_length=max(len(dataset), batch_size))
    return DataLoader(
        dataset,
        batch_size=per_process_batch_size(batch_size, num_processes),
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collate_fn or DearliDataCollator(),
        # A private generator: creating loader iterators must not consume the global torch RNG, which the loss's
        # point sampling uses and checkpoints restore.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def iterate_steps(
    accelerator: Any, dataloader: Any, start_step: int, max_steps: int
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(step, epoch, batch)`` for steps ``start_step .. max_steps - 1`` of a prepared, `drop_last` data loader
    whose sampler is a :class:`ResumableSampler`: epoch ``step // len(dataloader)``, skipping the batches an
    interrupted run had already consumed in that epoch (``accelerator.skip_first_batches``)."""
    steps_per_epoch = len(dataloader)
    if steps_per_epoch < 1:
        raise ValueError("the training data loader yields no full batch: lower the batch size or add data")
    step = start_step
    epoch, skip = divmod(start_step, steps_per_epoch)
    while step < max_steps:
        # The epoch goes to the sampler through the prepared loader: a loader that skips batches shares its sampler
        # but, on several processes (a skipping sampler around accelerate's per-process shard), does not forward
        # set_epoch to it, and would replay epoch 0's order when a run resumes in the middle of a later epoch.
        dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        # Accelerate's loaders call set_epoch(self.iteration) when iterated: set it on the loader we iterate.
        loader.set_epoch(epoch)
        for batch in loader:
            yield step, epoch, batch
            step += 1
            if step >= max_steps:
                return
        epoch, skip = epoch + 1, 0


@dataclass
class PreparedTraining:
    """What a step function works with: the Accelerate-prepared model, optimizer, scheduler and data loaders (by
    dataset name), the trainable parameters (clipped together) and the gradient-clipping norm."""

    accelerator: Any
    model: nn.Module
    optimizer: Any
    scheduler: Any
    dataloaders: dict[str, Any]
    batch_sizes: dict[str, int]
    parameters: list[nn.Parameter]
    gradient_clip: float = 0.0

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def forward_backward(self, inputs: Mapping[str, Any], step: int, weight: float = 1.0
                         ) -> tuple[float, dict[str, float]]:
        """``weight * loss`` of the model on `inputs` back-propagated into the gradients (after checking on every
        process that it is finite, see :func:`check_finite_loss`); returns its value and the final layer's terms. The
        outputs are released on return, so only one forward's activations are alive at a time."""
        outputs = self.model(**inputs)
        loss = outputs.loss * weight if weight != 1.0 else outputs.loss
        check_finite_loss(self.accelerator, loss, step, outputs.loss_dict)
        self.accelerator.backward(loss)
        return float(loss.detach().float()), final_layer_terms(outputs.loss_dict)

    def update(self, step: int) -> float:
        """The optimizer tail of every step: clip the full-model gradient norm (raising on a non-finite one), optimizer
        and LR-scheduler step, zero the gradients. Returns the gradient norm before clipping."""
        norm = clip_and_check_gradients(self.accelerator, self.parameters, self.gradient_clip, step)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


def prepare_training(
    args: Any, accelerator: Any, model: nn.Module, datasets: Mapping[str, tuple[Dataset, int]]
) -> PreparedTraining:
    """Data loaders for `datasets` (name -> (dataset, global batch size); the i-th draws its order and augmentation
    seeds from ``--seed`` + i), AdamW over the trainable parameters (``--learning_rate``, ``--weight_decay``,
    ``--weight_decay_norm``, ``--weight_decay_embed``) and the
    poly schedule (``--max_train_steps``, ``--lr_power``, ``--lr_warmup_steps``), all prepared by `accelerator`.

    Re-seeds per process first (``set_seed(device_specific=True)``): the loss samples different points on each process.
    """
    set_seed(args.seed, device_specific=True)
    loaders = [
        build_train_dataloader(dataset, batch_size, accelerator.num_processes, seed=args.seed + i,
                               num_workers=args.num_workers)
        for i, (dataset, batch_size) in enumerate(datasets.values())
    ]
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, args.weight_decay_norm,
                                args.weight_decay_embed)
    scheduler = build_poly_scheduler(optimizer, args.max_train_steps, args.lr_power, args.lr_warmup_steps)
    model, optimizer, *loaders, scheduler = accelerator.prepare(model, optimizer, *loaders, scheduler)
    return PreparedTraining(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        dataloaders=dict(zip(datasets, loaders)),
        batch_sizes={name: batch_size for name, (_, batch_size) in datasets.items()},
        parameters=[p for group in optimizer.param_groups for p in group["params"]],
        gradient_clip=args.gradient_clip,
    )


# --------------------------------------------------------------------------------------------------------------------
# The guarded update (NaN guard)
# --------------------------------------------------------------------------------------------------------------------
def final_layer_terms(loss_dict: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
    """The final decoder layer's loss terms as floats (auxiliary ones end in ``_<layer>`` and are left out)."""
    return {k: float(v.detach().float()) for k, v in (loss_dict or {}).items() if not k[-1].isdigit()}


def check_finite_loss(
    accelerator: Any, loss: torch.Tensor, step: int, loss_dict: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Raise :class:`NonFiniteError` on every process when the loss of any process is NaN/inf (call before backward,
    so nothing non-finite reaches the weights or a checkpoint)."""
    finite = torch.isfinite(loss.detach().float()).all().reshape(1).float().to(accelerator.device)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)
    if not bool((finite > 0).all()):
        terms = final_layer_terms(loss_dict)
        terms_text = " (" + ", ".join(f"{k}={v:.4g}" for k, v in sorted(terms.items())) + ")" if terms else ""
        message = f"non-finite loss at step {step}: {float(loss.detach().float())}{terms_text}"
        logger.error(message)
        raise NonFiniteError(message, step)


def clip_and_check_gradients(
    accelerator: Any, parameters: Sequence[nn.Parameter], max_norm: float, step: int
) -> float:
    """Clip the global gradient norm of `parameters` (``max_norm <= 0``: only measure it) and return the norm before
    clipping. A non-finite norm raises :class:`NonFiniteError` unless an fp16 grad scaler is active (it then skips the
    step itself)."""
    if accelerator.sync_gradients is False:
        return float("nan")
    if max_norm and max_norm > 0:
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
    else:
        grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
    norm = float(norm)
    if not math.isfinite(norm) and accelerator.scaler is None:
        message = f"non-finite gradient norm at step {step}: {norm}"
        logger.error(message)
        raise NonFiniteError(message, step)
    return norm


# --------------------------------------------------------------------------------------------------------------------
# Unreadable training examples: logged, counted, and a stop past a stated share
# --------------------------------------------------------------------------------------------------------------------
class TooManySkippedSamples(RuntimeError):
    """More training examples could not be read than ``--max_skipped_share`` allows."""


class SkippedSamples:
    """The training examples the datasets skipped as unreadable (``batch["skipped"]``, see
    :mod:`training.data.train_datasets`): each is logged once with its path and error by the process that met it, the
    distinct ones are counted over all processes, and the run stops with :class:`TooManySkippedSamples` when they
    exceed `max_share` of the `num_examples` training examples. :meth:`merge` (before each checkpoint) collects every
    process's list into ``progress.skipped_samples``, which checkpoints keep, so the count survives resuming."""

    def __init__(self, accelerator: Any, progress: TrainingProgress, num_examples: int, max_share: float) -> None:
        self.accelerator = accelerator
        self.progress = progress
        self.num_examples = int(num_examples)
        self.max_share = float(max_share)
        self.new: dict[str, str] = {}  # skipped by this process since the last merge: source -> error

    def record(self, batches: Mapping[str, Any], step: int) -> None:
        """Log and count the skips reported in this step's batches, then check the share (all processes call it)."""
        merged = set(self.progress.skipped_samples)
        reports = [r for batch in batches.values() if isinstance(batch, Mapping) for r in batch.get("skipped") or []]
        for example_reports in reports:
            for report in example_reports or []:
                source = str(report["source"])
                if source not in merged and source not in self.new:
                    self.new[source] = str(report["error"])
                    logger.warning("step %d: skipped an unreadable training example: %s (%s)", step, source,
                                   report["error"])
        local = torch.tensor([len(self.new)], dtype=torch.float64, device=self.accelerator.device)
        total = len(merged) + int(self.accelerator.reduce(local, reduction="sum").item())
        if total > self.max_share * self.num_examples:
            examples = [f"{s} ({e})" for s, e in self.new.items()] + list(self.progress.skipped_samples)
            raise TooManySkippedSamples(
                f"{total} of {self.num_examples} training examples ({100 * total / self.num_examples:.1f}%) could not "
                f"be read, more than --max_skipped_share {self.max_share:g} allows; e.g. {'; '.join(examples[:3])}. "
                "Fix or remove them, or raise --max_skipped_share"
            )

    def merge(self) -> None:
        """Add every process's new skips to ``progress.skipped_samples`` (all processes must call it)."""
        from accelerate.utils import gather_object

        new = gather_object([sorted(self.new)]) if self.accelerator.num_processes > 1 else [sorted(self.new)]
        known = set(self.progress.skipped_samples)
        for sources in new:
            for source in sources:
                if source not in known:
                    known.add(source)
                    self.progress.skipped_samples.append(source)
        self.new.clear()

    @property
    def count(self) -> int:
        """Distinct examples skipped so far (after :meth:`merge`: over all processes, including before a resume)."""
        return len(self.progress.skipped_samples) + len(self.new)


# --------------------------------------------------------------------------------------------------------------------
# Steps and the loop
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class StepOutput:
    """What one step reports for logging. `metrics` (``"loss"`` first) are averaged over the processes at every step
    and over the logging window; `last` values (gradient norm, EMA decay, loss terms) are logged as they are."""

    metrics: dict[str, float]
    last: dict[str, float] = field(default_factory=dict)


def supervised_step(run: PreparedTraining, batches: Mapping[str, Any], step: int) -> StepOutput:
    """DeWa's and the supervised baseline's step: the model's Mask2Former loss on one batch -> guarded update."""
    (batch,) = batches.values()
    loss, terms = run.forward_backward(model_inputs(batch), step)
    grad_norm = run.update(step)
    return StepOutput({"loss": loss}, {"grad_norm": grad_norm, **terms})


@dataclass
class TrainingResult:
    """What a finished (or resumed-and-finished) run did."""

    final_step: int
    start_step: int
    last_loss: float | None = None
    seconds_per_step: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    skipped_samples: int = 0  # distinct unreadable training examples skipped (all processes)


def save_final_model(
    accelerator: Any, model: nn.Module, output_dir: str | Path, image_size: Mapping[str, int] | None = None
) -> None:
    """``save_pretrained`` of the unwrapped model (safetensors; refuses non-finite weights) and of its image
    processor (``DearliImageProcessor.from_model_config``: its classes, stuff classes and ``ensemble_alpha``; resized
    to `image_size`, default the processor's 640 / 2560) into `output_dir`, from the main process."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    assert_finite_parameters(unwrapped)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, save_function=accelerator.save, safe_serialization=True)
        size = {"size": dict(image_size)} if image_size else {}
        DearliImageProcessor.from_model_config(unwrapped.config, **size).save_pretrained(output_dir)
        logger.info("Saved the final model to %s", output_dir)
    accelerator.wait_for_everyone()


def run_training(
    args: Any,
    run: PreparedTraining,
    train_step: Callable[[PreparedTraining, dict[str, Any], int], StepOutput] = supervised_step,
    *,
    checkpointed: Mapping[str, Any] | None = None,
    before_checkpoint: Callable[[], None] | None = None,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    monitors: Sequence[tuple[int, Callable[[int], dict[str, float]]]] = (),
    final_models: Mapping[str, nn.Module] | None = None,
) -> TrainingResult:
    """Run ``train_step`` for steps ``1 .. --max_train_steps`` (resuming with ``--resume_from_checkpoint``), then save.

    Args:
        checkpointed: extra state saved in every checkpoint and restored on resume: name -> object with
            ``state_dict`` / ``load_state_dict`` (tensors and JSON values), written as ``<name>.safetensors`` +
            ``<name>.json`` (e.g. ``{"ema_teacher": teacher}``).
        before_checkpoint: called on every process before each checkpoint (e.g. to check that the teacher is the same
            on all processes).
        evaluate: ``evaluate(step)`` -> scalar metrics, every ``--eval_steps`` steps (0: never) and after the last.
        monitors: ``(every, monitor)`` pairs: ``monitor(step)`` -> scalar metrics every ``every`` steps and after the
            last, logged like validation (e.g. the SSL loop's pseudo-label quality).
        final_models: sub-folder of ``--output_dir`` (``""`` = itself) -> model saved there at the end (default: the
            trained model in ``--output_dir``), each with its image processor at the validation size
            (``--eval_shortest_edge`` / ``--eval_longest_edge``: the dataset's test size) when the loop has one.

    Also uses ``--checkpointing_steps``, ``--checkpoints_total_limit``, ``--logging_steps``, ``--with_tracking`` and
    ``--max_skipped_share`` (see :class:`SkippedSamples`).
    """
    accelerator = run.accelerator
    checkpointed = dict(checkpointed or {})
    progress = TrainingProgress()
    resume_path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir, accelerator.num_processes,
                                      tuple(checkpointed), accelerator)
    if resume_path is not None:
        load_checkpoint(accelerator, resume_path, progress, checkpointed)
    elif args.resume_from_checkpoint:
        logger.info("No checkpoint in %s: starting from scratch", args.output_dir)
    start_step = progress.step
    skips = SkippedSamples(accelerator, progress, sum(len(dl.dataset) for dl in run.dataloaders.values()),
                           getattr(args, "max_skipped_share", 0.0))
    init_tracking(accelerator, args)

    logger.info("***** Running training *****")
    logger.info("  Examples: %s", ", ".join(f"{len(dl.dataset)} {name}" for name, dl in run.dataloaders.items()))
    logger.info("  Per step: %s images (%d processes); steps = %d (starting at %d)",
                " + ".join(f"{size} {name}" for name, size in run.batch_sizes.items()), accelerator.num_processes,
                args.max_train_steps, start_step)
    logger.info("  Trainable parameters = %d", sum(p.numel() for p in run.parameters))

    result = TrainingResult(final_step=start_step, start_step=start_step)
    bar = tqdm(total=args.max_train_steps, initial=start_step, desc="train",
               disable=not accelerator.is_local_main_process)
    window: list[torch.Tensor] = []
    started = time.perf_counter()
    try:  # closed on errors too (a NaN stop), or its last line is printed when the interpreter exits
        streams = [iterate_steps(accelerator, dl, start_step, args.max_train_steps) for dl in run.dataloaders.values()]
        for steps in zip(*streams):
            step, epoch = steps[0][0] + 1, steps[0][1]
            run.model.train()
            batches = {name: batch for name, (_, _, batch) in zip(run.dataloaders, steps)}
            skips.record(batches, step)
            out = train_step(run, batches, step)
            progress.step = step
            values = torch.tensor(list(out.metrics.values()), dtype=torch.float64, device=accelerator.device)
            window.append(accelerator.reduce(values, reduction="mean").cpu())
            result.last_loss = float(window[-1][0])
            lr = run.scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{result.last_loss:.4f}", lr=f"{lr:.2e}")

            is_last = step == args.max_train_steps
            if args.logging_steps and (step % args.logging_steps == 0 or is_last):
                logs = {f"train/{k}": float(v) for k, v in zip(out.metrics, torch.stack(window).mean(0))}
                logs.update({"train/lr": lr, "train/epoch": epoch, **{f"train/{k}": v for k, v in out.last.items()}})
                window.clear()
                result.history.append({"step": step, **logs})
                if args.with_tracking:
                    accelerator.log(logs, step=step)
                logger.info("step %d: %s", step, {k: round(v, 5) for k, v in logs.items()})
            if is_last or (args.checkpointing_steps and step % args.checkpointing_steps == 0):
                if before_checkpoint is not None:
                    before_checkpoint()
                skips.merge()
                save_checkpoint(accelerator, run.model, progress, args.output_dir, args.checkpoints_total_limit,
                                checkpointed)
            if evaluate is not None and (is_last or (args.eval_steps and step % args.eval_steps == 0)):
                result.metrics = evaluate(step)
                if args.with_tracking and result.metrics:
                    accelerator.log(result.metrics, step=step)
                logger.info("validation at step %d: %s", step, {k: round(v, 3) for k, v in result.metrics.items()})
            for every, monitor in monitors:
                if every and (is_last or step % every == 0):
                    values = monitor(step)
                    if args.with_tracking and values:
                        accelerator.log(values, step=step)
                    logger.info("step %d: %s", step, {k: round(v, 3) for k, v in values.items()})
    finally:
        bar.close()

    steps_done = progress.step - start_step
    if steps_done:
        result.seconds_per_step = (time.perf_counter() - started) / steps_done
        logger.info("%d steps in %.1f s (%.3f s/step)", steps_done, steps_done * result.seconds_per_step,
                    result.seconds_per_step)
    result.final_step = progress.step
    skips.merge()
    result.skipped_samples = skips.count
    if skips.count:
        logger.warning("%d unreadable training examples were skipped: %s", skips.count,
                       ", ".join(progress.skipped_samples[:10]))
    image_size = None
    if getattr(args, "eval_shortest_edge", None) is not None:
        image_size = {"shortest_edge": args.eval_shortest_edge, "longest_edge": args.eval_longest_edge}
    for folder, model in (final_models or {"": run.model}).items():
        save_final_model(accelerator, model, Path(args.output_dir) / folder, image_size)
    if args.with_tracking:
        accelerator.end_training()
    return result
