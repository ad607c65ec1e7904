"""Resumable checkpoints of the Accelerate loops: exact continuation, never a checkpoint with non-finite weights.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/`` written by ``Accelerator.save_state``: model, optimizer, LR
scheduler, the RNG states of every process (python, numpy, torch, cuda) and every object registered with
``accelerator.register_for_checkpointing`` — here a :class:`TrainingProgress` holding the step counter (plus any
extra state a loop adds, e.g. the EMA step of the SSL teacher). The data position is derived from the step counter
(see `training.data.sampler.ResumableSampler`), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINTS_SUBDIR",
    "NonFiniteError",
    "TrainingProgress",
    "assert_finite_parameters",
    "checkpoint_dir",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_resume_path",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")


class NonFiniteError(FloatingPointError):
    """A loss, gradient norm or weight became NaN/inf; `step` is the optimisation step where it was detected."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class TrainingProgress:
    """Step counter (and free-form extra state) saved in every checkpoint via ``register_for_checkpointing``.

    ``step`` counts completed optimisation steps; ``extra`` is a dict of picklable / tensor values a loop wants back
    after resuming (restored by reference: mutate it, do not rebind it).
    """

    def __init__(self) -> None:
        self.step = 0
        self.extra: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": int(self.step), "extra": dict(self.extra)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.extra.clear()
        self.extra.update(state.get("extra", {}))


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint after `step` steps."""
    return Path(output_dir) / CHECKPOINTS_SUBDIR / f"step_{int(step):08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (a folder without the completion marker is skipped)."""
    root = Path(output_dir) / CHECKPOINTS_SUBDIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir() and (path / "COMPLETE").is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | Path | None) -> Path | None:
    """``None`` -> None; ``"latest"`` -> the newest complete checkpoint of `output_dir` (None if there is none);
    a path -> that folder (which must exist)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        if output_dir is None:
            raise ValueError("--resume_from_checkpoint latest needs --output_dir")
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    return path


def assert_finite_parameters(model: nn.Module, step: int | None = None) -> None:
    """Raise :class:`NonFiniteError` if a floating-point parameter or saved buffer holds NaN/inf.

    Only what a checkpoint stores is checked (the state dict): non-persistent buffers such as OpenCLIP's causal
    attention mask legitimately hold -inf."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"non-finite values in {name} at step {step}; refusing to write it", step)


def save_checkpoint(
    accelerator: Any,
    model: nn.Module,
    progress: TrainingProgress,
    output_dir: str | Path,
    total_limit: int | None = None,
) -> Path:
    """Write the resumable state after ``progress.step`` steps (all processes must call it), after checking that
    every weight is finite; keep at most `total_limit` checkpoints (0/None: all). Returns the folder."""
    assert_finite_parameters(accelerator.unwrap_model(model), progress.step)
    path = checkpoint_dir(output_dir, progress.step)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / "COMPLETE").write_text(f"{progress.step}\n")
        if total_limit and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("Saved checkpoint %s", path)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator: Any, path: str | Path, progress: TrainingProgress) -> int:
    """Restore model, optimizer, scheduler, RNG states and `progress` from `path`; returns the step reached."""
    accelerator.load_state(str(path))
    logger.info("Resumed from %s at step %d", path, progress.step)
    return progress.step
