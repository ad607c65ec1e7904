"""Shared machinery of the Accelerate training loops (dewa.py, supervised.py, ssl.py).

- :func:`setup_logging`, :func:`create_accelerator` (mixed precision "auto", trackers, project folders);
- :class:`ResumableSampler` + :func:`iterate_steps`: epochs whose order and per-sample augmentation seeds depend only on
  ``(seed, epoch)``, so a run resumed at step N sees exactly the batches of an uninterrupted run;
- :func:`check_finite_loss` / :func:`clip_and_check_gradients`: NaN/inf detection across processes, reported with the
  step (raises :class:`training.checkpointing.NonFiniteError`, before anything is written);
- :func:`save_final_model`: ``save_pretrained`` of the model (and the image processor) at the end.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Sampler

from .checkpointing import NonFiniteError, assert_finite_parameters

__all__ = [
    "ResumableSampler",
    "build_image_processor",
    "check_finite_loss",
    "clip_and_check_gradients",
    "create_accelerator",
    "init_tracking",
    "iterate_steps",
    "optimization_step",
    "per_process_batch_size",
    "resolve_mixed_precision",
    "save_final_model",
    "setup_logging",
    "unpack_index",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Accelerator, logging, tracking
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
    else:
        logging.getLogger().setLevel(logging.ERROR)
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def resolve_mixed_precision(mixed_precision: str | None) -> str:
    """'auto' -> 'bf16' on a CUDA device with bf16 support, 'fp16' on other CUDA devices, 'no' elsewhere (CPU, or
    ``accelerate launch --cpu``); other values are returned unchanged."""
    if mixed_precision not in (None, "auto"):
        return mixed_precision
    from accelerate import PartialState

    device = PartialState().device
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def create_accelerator(args: Any, **kwargs: Any):
    """An `Accelerator` for `args` (``output_dir``, ``mixed_precision``, ``with_tracking``, ``report_to``).

    The LR scheduler is stepped once per optimisation step whatever the number of processes
    (``step_scheduler_with_optimizer=False``): ``--train_batch_size`` is the global batch, so the schedule length does
    not depend on the process count. Tracker logs go to ``<output_dir>/logs``.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if not args.output_dir:
        raise ValueError("--output_dir is required")
    project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs"))
    log_with = None
    if getattr(args, "with_tracking", False):
        log_with = [name.strip() for name in str(args.report_to).split(",") if name.strip()]
        log_with = "all" if log_with == ["all"] else log_with
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(getattr(args, "mixed_precision", "auto")),
        log_with=log_with,
        project_config=project_config,
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return accelerator


def _hparam(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def init_tracking(accelerator: Any, args: Any, project_name: str | None = None) -> None:
    """Start the trackers (``--with_tracking``) with the run's arguments as hyper-parameters."""
    if getattr(args, "with_tracking", False):
        config = {k: _hparam(v) for k, v in sorted(vars(args).items())}
        accelerator.init_trackers(project_name or getattr(args, "project_name", "dearli"), config=config)


def per_process_batch_size(global_batch_size: int, num_processes: int) -> int:
    """The per-process share of a global batch (must divide evenly)."""
    if global_batch_size < num_processes or global_batch_size % num_processes:
        raise ValueError(
            f"the global batch size {global_batch_size} must be a positive multiple of the {num_processes} processes"
        )
    return global_batch_size // num_processes


# --------------------------------------------------------------------------------------------------------------------
# Deterministic, resumable data order
# --------------------------------------------------------------------------------------------------------------------
class ResumableSampler(Sampler):
    """Yields ``(index, sample_seed)`` pairs: a permutation of ``range(num_samples)`` per epoch (or the identity with
    ``shuffle=False``) and one 63-bit augmentation seed per position, both drawn from ``(seed, epoch)`` only.

    Datasets of this package accept such a pair as their index and seed their augmentation with it, so the batches of
    epoch ``e`` are the same in every run and every process layout. ``epoch_length`` (default ``num_samples``) lets an
    epoch repeat a small dataset (e.g. 2 images, batch 8): it concatenates permutations up to that length.
    `set_epoch` is called by Accelerate's data loader (see :func:`iterate_steps`).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, epoch_length: int | None = None):
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch_length = int(epoch_length or num_samples)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        chunks, total = [], 0
        while total < self.epoch_length:
            chunk = torch.randperm(self.num_samples, generator=generator) if self.shuffle else torch.arange(self.num_samples)
            chunks.append(chunk)
            total += len(chunk)
        order = torch.cat(chunks)[: self.epoch_length].tolist()
        seeds = torch.randint(0, 2**62, (self.epoch_length,), generator=generator).tolist()
        return iter(list(zip(order, seeds)))


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
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        # Accelerate's loaders call set_epoch(self.iteration) when iterated: set it on the loader we iterate.
        loader.set_epoch(epoch)
        for batch in loader:
            yield step, epoch, batch
            step += 1
            if step >= max_steps:
                return
        epoch, skip = epoch + 1, 0


def unpack_index(key: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    """``index`` or ``(index, seed)`` (from :class:`ResumableSampler`) -> ``(index, seed)`` (seed 0 for a bare index)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


# --------------------------------------------------------------------------------------------------------------------
# Non-finite detection
# --------------------------------------------------------------------------------------------------------------------
def _format_terms(loss_dict: Mapping[str, torch.Tensor] | None) -> str:
    if not loss_dict:
        return ""
    terms = {k: float(v.detach().float()) for k, v in loss_dict.items() if not k[-1].isdigit()}
    return " (" + ", ".join(f"{k}={v:.4g}" for k, v in sorted(terms.items())) + ")"


def check_finite_loss(
    accelerator: Any, loss: torch.Tensor, step: int, loss_dict: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Raise :class:`NonFiniteError` on every process when the loss of any process is NaN/inf (call before backward,
    so nothing non-finite reaches the weights or a checkpoint)."""
    finite = torch.isfinite(loss.detach().float()).all().reshape(1).float().to(accelerator.device)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)
    if not bool((finite > 0).all()):
        message = f"non-finite loss at step {step}: {float(loss.detach().float())}{_format_terms(loss_dict)}"
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


def optimization_step(
    accelerator: Any,
    loss: torch.Tensor,
    optimizer: Any,
    scheduler: Any,
    parameters: Sequence[nn.Parameter],
    step: int,
    gradient_clip: float = 0.0,
    loss_dict: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """One guarded update: check the loss is finite (all processes), backward, clip the full-model gradient norm
    (raising on a non-finite norm), optimizer and LR-scheduler step, zero the gradients. Returns the gradient norm
    before clipping."""
    check_finite_loss(accelerator, loss, step, loss_dict)
    accelerator.backward(loss)
    norm = clip_and_check_gradients(accelerator, parameters, gradient_clip, step)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


# --------------------------------------------------------------------------------------------------------------------
# Final model
# --------------------------------------------------------------------------------------------------------------------
def build_image_processor(config: Any = None, **kwargs: Any) -> Any:
    """The `DearliImageProcessor` saved next to a trained model: matching `config` (classes, stuff classes to fuse,
    ensembling alpha) when given; `kwargs` override its settings."""
    from modeling_dearli.image_processing_dearli import DearliImageProcessor

    if config is not None:
        return DearliImageProcessor.from_model_config(config, **kwargs)
    return DearliImageProcessor(**kwargs)


def save_final_model(accelerator: Any, model: nn.Module, output_dir: str | Path, image_processor: Any = None) -> None:
    """``save_pretrained`` of the unwrapped model (safetensors; refuses non-finite weights) and of the image
    processor into `output_dir`, from the main process."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    assert_finite_parameters(unwrapped)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, save_function=accelerator.save, safe_serialization=True)
        if image_processor is not None:
            image_processor.save_pretrained(output_dir)
        logger.info("Saved the final model to %s", output_dir)
    accelerator.wait_for_everyone()
