"""Resumable checkpoints of the Accelerate loops: exact continuation, never a checkpoint with non-finite weights, and
nothing in a checkpoint folder that is unpickled as arbitrary objects.

A checkpoint is ``<output_dir>/checkpoints/step_<N>/``:

- ``Accelerator.save_state``'s files: ``model.safetensors``, ``optimizer.bin``, ``scheduler.bin`` (loaded by accelerate
  with ``torch.load(weights_only=True)``) and ``random_states_<rank>.pkl`` (also ``weights_only``; accelerate ignores
  a missing or unreadable one with an INFO line, so it is not what resuming relies on);
- ``rng_state_<rank>.json``: every process's python / numpy / torch (/ CUDA) random states, written and restored by
  this module (a missing one is an error);
- ``training_state.json``: the step counter and the training examples skipped as unreadable (:class:`TrainingProgress`);
- ``<name>.safetensors`` + ``<name>.json`` for every extra state a loop checkpoints (e.g. ``ema_teacher``: the EMA
  teacher's weights and its EMA step), see :func:`save_state_files`;
- ``COMPLETE``, written last.

A checkpoint is written into a hidden sibling folder (``.partial-step_<N>``) and renamed to ``step_<N>`` once complete
(one atomic ``rename``), and an old checkpoint is renamed aside before it is deleted: a process killed at any moment
(``kill -9``) leaves only complete ``step_*`` folders, and the leftovers are removed by the next save.

accelerate's ``register_for_checkpointing`` is not used: it writes ``custom_checkpoint_<i>.pkl`` and loads it with
``torch.load(weights_only=False)``, so a tampered checkpoint folder would run code on resume. A folder holding such a
file is refused. Resuming is all or nothing: :func:`verify_checkpoint` checks that every file is present and readable
(zip CRCs of the torch files, safetensors headers, JSON) before anything is loaded, and ``latest`` falls back to the
newest checkpoint that passes, saying which ones it passed over. The data position is derived from the step counter
(see `training.data.sampler.ResumableSampler`), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import (
    OPTIMIZER_NAME,
    RNG_STATE_NAME,
    SAFE_MODEL_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "CHECKPOINTS_SUBDIR",
    "TRAINING_STATE_FILE",
    "CheckpointError",
    "NonFiniteError",
    "OutputDirError",
    "TrainingProgress",
    "assert_finite_parameters",
    "checkpoint_dir",
    "check_output_dir",
    "list_checkpoints",
    "load_checkpoint",
    "load_state_files",
    "resolve_resume_path",
    "rng_state_file",
    "save_checkpoint",
    "save_state_files",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
CHECKPOINT_FORMAT = "dearli-checkpoint/2"
TRAINING_STATE_FILE = "training_state.json"
COMPLETE_MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")
_PARTIAL_PREFIX = ".partial-"  # a checkpoint being written
_DISCARDED_PREFIX = ".discarded-"  # a checkpoint being deleted
_PICKLED_CUSTOM_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


class NonFiniteError(FloatingPointError):
    """A loss, gradient norm or weight became NaN/inf; `step` is the optimisation step where it was detected."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: a missing, unreadable or unexpected file (named in the message)."""


class OutputDirError(ValueError):
    """An ``--output_dir`` that holds a finished run or checkpoints, given without ``--resume_from_checkpoint`` or
    ``--overwrite_output_dir``."""


class TrainingProgress:
    """What a checkpoint records about the run itself (``training_state.json``): ``step``, the completed optimisation
    steps, and ``skipped_samples``, the training examples this process skipped as unreadable."""

    def __init__(self) -> None:
        self.step = 0
        self.skipped_samples: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "step": int(self.step), "skipped_samples": list(self.skipped_samples)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_samples = [str(s) for s in state.get("skipped_samples", [])]


# --------------------------------------------------------------------------------------------------------------------
# Our own state files: JSON + safetensors, never pickle
# --------------------------------------------------------------------------------------------------------------------
def rng_state_file(process_index: int) -> str:
    """File name of a process's random states in a checkpoint."""
    return f"rng_state_{int(process_index)}.json"


def _encode_bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_states() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) random states as JSON-compatible values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        states["cuda"] = [_encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (exactly: the continuation draws the same numbers)."""
    version, internal, gauss = states["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(_decode_bytes(states["torch"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_bytes(s) for s in states["cuda"]])


def save_state_files(state: Mapping[str, Any], folder: str | Path, name: str) -> list[str]:
    """Write a ``state_dict()`` as ``<name>.safetensors`` (its tensors, and dicts of tensors) + ``<name>.json`` (the
    other values, which must be JSON-compatible); returns the file names. :func:`load_state_files` reads it back."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            layout[key] = "tensor"
        elif isinstance(value, Mapping) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            tensors.update({f"{key}/{k}": v.detach().cpu().contiguous() for k, v in value.items()})
            layout[key] = "tensors"
        else:
            values[key] = value
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps({"tensors": layout, "values": values}, indent=1))
    return [f"{name}.safetensors", f"{name}.json"]


def load_state_files(folder: str | Path, name: str) -> dict[str, Any]:
    """The state dict :func:`save_state_files` wrote as `name` in `folder`."""
    folder = Path(folder)
    meta = json.loads((folder / f"{name}.json").read_text())
    tensors = load_file(folder / f"{name}.safetensors")
    state = dict(meta["values"])
    for key, kind in meta["tensors"].items():
        if kind == "tensor":
            state[key] = tensors[key]
        else:
            prefix = f"{key}/"
            state[key] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return state


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint after `step` steps."""
    return Path(output_dir) / CHECKPOINTS_SUBDIR / f"step_{int(step):08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints of `output_dir` marked complete, oldest first (a folder without the marker, an interrupted save,
    is not listed)."""
    root = Path(output_dir) / CHECKPOINTS_SUBDIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def _expected_files(num_processes: int, state_names: tuple[str, ...], accelerator: Any = None) -> list[str]:
    """The files a checkpoint of this run must hold (accelerate's names for its models, optimizers, schedulers)."""
    counts = (len(accelerator._models), len(accelerator._optimizers), len(accelerator._schedulers)) if accelerator \
        else (1, 1, 1)
    files = [f"{SAFE_MODEL_NAME}{'' if i == 0 else f'_{i}'}.safetensors" for i in range(counts[0])]
    files += [f"{OPTIMIZER_NAME}{'' if i == 0 else f'_{i}'}.bin" for i in range(counts[1])]
    files += [f"{SCHEDULER_NAME}{'' if i == 0 else f'_{i}'}.bin" for i in range(counts[2])]
    if accelerator is not None and accelerator.scaler is not None:
        files.append(SCALER_NAME)
    files += [f"{RNG_STATE_NAME}_{i}.pkl" for i in range(num_processes)]
    files += [rng_state_file(i) for i in range(num_processes)]
    files.append(TRAINING_STATE_FILE)
    for name in state_names:
        files += [f"{name}.safetensors", f"{name}.json"]
    return files


def _check_file(path: Path) -> str | None:
    """Why `path` cannot be read (None if it can): JSON parses, safetensors headers cover the file, torch files (zip
    archives) pass their CRC checks. Nothing is unpickled."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                f.keys()
        else:
            if not zipfile.is_zipfile(path):
                return "not a torch archive"
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"corrupt member {bad}"
    except Exception as error:  # noqa: BLE001 - any reading problem is reported with the file's name
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def verify_checkpoint(path: str | Path, num_processes: int = 1, state_names: tuple[str, ...] = (),
                      accelerator: Any = None) -> list[str]:
    """Problems that make `path` unusable for resuming this run, each naming its file: the completion marker, every
    expected file present and readable, no pickled ``custom_checkpoint_*.pkl`` (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        return [f"checkpoint folder {path} does not exist"]
    problems = []
    if not (path / COMPLETE_MARKER).is_file():
        problems.append(f"{COMPLETE_MARKER} is missing (the save was interrupted)")
    for file in sorted(p.name for p in path.iterdir() if _PICKLED_CUSTOM_STATE.match(p.name)):
        problems.append(f"{file} is a pickle (written by an older dearli, or put there by someone else); it is never "
                        "loaded, as unpickling it could run code")
    for file in _expected_files(num_processes, state_names, accelerator):
        if not (path / file).is_file():
            problems.append(f"{file} is missing")
        elif (reason := _check_file(path / file)) is not None:
            problems.append(f"{file} cannot be read ({reason})")
    if not problems:
        problems += _contradictions(path)
    return problems


def _contradictions(path: Path) -> list[str]:
    """Where a complete, readable checkpoint contradicts itself: the step in ``training_state.json`` must be a
    non-negative whole number equal to the step in the folder's name (``step_<N>``) and in the ``COMPLETE`` marker."""
    state = json.loads((path / TRAINING_STATE_FILE).read_text())
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return [f"{TRAINING_STATE_FILE} holds no step count (got {step!r})"]
    claims = {}
    if (match := _STEP_RE.match(path.name)) is not None:
        claims[f"the folder name {path.name}"] = int(match.group(1))
    marker = (path / COMPLETE_MARKER).read_text().strip() if (path / COMPLETE_MARKER).is_file() else ""
    if marker:
        claims[COMPLETE_MARKER] = int(marker) if marker.isdigit() else marker
    return [f"{TRAINING_STATE_FILE} says step {step} but {where} says {claim}: the checkpoint contradicts itself"
            for where, claim in claims.items() if claim != step]


def resolve_resume_path(
    resume_from_checkpoint: str | None,
    output_dir: str | Path | None,
    num_processes: int = 1,
    state_names: tuple[str, ...] = (),
    accelerator: Any = None,
) -> Path | None:
    """``None`` -> None; ``"latest"`` -> the newest checkpoint of `output_dir` that passes :func:`verify_checkpoint`
    (a warning names each newer one passed over; None when there is no complete checkpoint, a
    :class:`CheckpointError` when there are some but none is usable); a path -> that folder, which must pass."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        if output_dir is None:
            raise ValueError("--resume_from_checkpoint latest needs --output_dir")
        checkpoints = list_checkpoints(output_dir)
        rejected = []
        for candidate in reversed(checkpoints):
            problems = verify_checkpoint(candidate, num_processes, state_names, accelerator)
            if not problems:
                if rejected:
                    logger.warning("Resuming from %s, the newest usable checkpoint: %s", candidate.name,
                                   "; ".join(rejected))
                return candidate
            rejected.append(f"{candidate.name} passed over ({problems[0]})")
        if rejected:
            raise CheckpointError(f"no usable checkpoint in {Path(output_dir) / CHECKPOINTS_SUBDIR}: "
                                  + "; ".join(rejected))
        return None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    problems = verify_checkpoint(path, num_processes, state_names, accelerator)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"cannot resume from {path}: {problems[0]}{more}")
    return path


def assert_finite_parameters(model: nn.Module, step: int | None = None) -> None:
    """Raise :class:`NonFiniteError` if a floating-point parameter or saved buffer holds NaN/inf.

    Only what a checkpoint stores is checked (the state dict): non-persistent buffers such as OpenCLIP's causal
    attention mask legitimately hold -inf."""
    from training.pretrained import first_non_finite_tensor

    name = first_non_finite_tensor(model)
    if name is not None:
        raise NonFiniteError(f"non-finite values in {name} at step {step}; refusing to write it", step)


def save_checkpoint(
    accelerator: Any,
    model: nn.Module,
    progress: TrainingProgress,
    output_dir: str | Path,
    total_limit: int | None = None,
    states: Mapping[str, Any] | None = None,
) -> Path:
    """Write the resumable state after ``progress.step`` steps (all processes must call it), after checking that
    every weight is finite; `states` are extra objects (name -> object with ``state_dict``) written with
    :func:`save_state_files`. Keeps at most `total_limit` checkpoints (0/None: all). Returns the folder.

    The files go to a hidden ``.partial-step_<N>`` folder first, which is renamed to ``step_<N>`` when complete, so a
    killed process never leaves a ``step_*`` folder that is half written or half deleted (see the module docstring).
    """
    assert_finite_parameters(accelerator.unwrap_model(model), progress.step)
    path = checkpoint_dir(output_dir, progress.step)
    partial = path.with_name(_PARTIAL_PREFIX + path.name)
    if accelerator.is_main_process:
        _remove_leftovers(path.parent)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    (partial / rng_state_file(accelerator.process_index)).write_text(json.dumps(rng_states()))
    if accelerator.is_main_process:
        (partial / TRAINING_STATE_FILE).write_text(json.dumps(progress.state_dict(), indent=1))
        for name, state in (states or {}).items():
            save_state_files(state.state_dict(), partial, name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / COMPLETE_MARKER).write_text(f"{progress.step}\n")
        if path.exists():  # the same step saved again (a run started over with --overwrite_output_dir)
            _discard(path)
        partial.rename(path)
        if total_limit and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                _discard(old)
        logger.info("Saved checkpoint %s", path)
    accelerator.wait_for_everyone()
    return path


def _discard(path: Path) -> None:
    """Delete a checkpoint folder: renamed aside first (atomic), so an interrupted deletion leaves no ``step_*``
    folder with files missing."""
    aside = path.with_name(_DISCARDED_PREFIX + path.name)
    if aside.exists():
        shutil.rmtree(aside)
    path.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(checkpoints: Path) -> None:
    """Remove what an interrupted save or deletion left in the checkpoints folder (never a ``step_*`` folder)."""
    if checkpoints.is_dir():
        for leftover in checkpoints.iterdir():
            if leftover.is_dir() and leftover.name.startswith((_PARTIAL_PREFIX, _DISCARDED_PREFIX)):
                shutil.rmtree(leftover, ignore_errors=True)


# Files of a finished run in an output folder (``save_pretrained`` of the model and its image processor).
_FINISHED_RUN_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "preprocessor_config.json")


def check_output_dir(output_dir: str | Path, resume_from_checkpoint: str | None = None, overwrite: bool = False,
                     is_main_process: bool = True) -> None:
    """Refuse to start a training run in `output_dir` when it holds a finished run (a saved model) or checkpoints,
    unless the run resumes (``--resume_from_checkpoint``) or `overwrite` (``--overwrite_output_dir``) is given, in
    which case the old checkpoints are removed by the main process (the new run's checkpoints would otherwise mix
    with them). Raises :class:`OutputDirError` naming what is there and both flags."""
    output_dir = Path(output_dir)
    if resume_from_checkpoint or not output_dir.is_dir():
        return
    found = [name for name in _FINISHED_RUN_FILES if (output_dir / name).is_file()]
    root = output_dir / CHECKPOINTS_SUBDIR
    steps = sorted(p.name for p in root.iterdir() if _STEP_RE.match(p.name)) if root.is_dir() else []
    if not found and not steps:
        return
    if overwrite:
        if is_main_process:
            for step in steps:
                _discard(root / step)
            logger.warning("--overwrite_output_dir: training %s again from scratch (%s replaced)", output_dir,
                           ", ".join(found + [f"{len(steps)} checkpoint(s)"] * bool(steps)))
        return
    what = []
    if found:
        what.append(f"a finished run ({', '.join(found)})")
    if steps:
        what.append(f"checkpoints ({', '.join(steps[-3:])}{', ...' if len(steps) > 3 else ''})")
    raise OutputDirError(f"--output_dir {output_dir} already holds {' and '.join(what)}: pass "
                         "--resume_from_checkpoint latest to continue that run, or --overwrite_output_dir to train "
                         "again from scratch and replace it")


def load_checkpoint(
    accelerator: Any, path: str | Path, progress: TrainingProgress, states: Mapping[str, Any] | None = None
) -> int:
    """Restore model, optimizer, scheduler, random states, `progress` and `states` from `path` (all or nothing: the
    folder is verified first); returns the step reached."""
    states = states or {}
    path = Path(path)
    problems = verify_checkpoint(path, accelerator.num_processes, tuple(states), accelerator)
    if problems:
        raise CheckpointError(f"cannot resume from {path}: " + "; ".join(problems))
    try:
        accelerator.load_state(str(path))
        set_rng_states(json.loads((path / rng_state_file(accelerator.process_index)).read_text()))
        progress.load_state_dict(json.loads((path / TRAINING_STATE_FILE).read_text()))
        for name, state in states.items():
            state.load_state_dict(load_state_files(path, name))
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"cannot resume from {path}: {str(error).splitlines()[0]}") from error
    logger.info("Resumed from %s at step %d", path, progress.step)
    return progress.step
