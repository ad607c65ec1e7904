"""A training run killed with SIGKILL (``kill -9``) at random moments and at chosen points inside checkpoint writes and
deletions, then resumed with ``--resume_from_checkpoint latest`` each time: every resume succeeds and the final
weights equal an uninterrupted run's, bit for bit.

The chosen points are reached by the training process itself: a wrapper runs ``training/supervised.py`` with one
function of the checkpoint code wrapped so that the process sends itself SIGKILL there (no signal handler, no
``finally`` and no flush runs, as with ``kill -9`` from outside). Random moments are SIGKILLs from this test."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 8

# Runs training/supervised.py as __main__; KILL_AT names where the process SIGKILLs itself, the first time it gets
# there: "save_state" (accelerate has written the weights, optimizer, scheduler; our own files and the COMPLETE
# marker not yet), "rename" (the checkpoint is complete in its hidden folder, not yet renamed to step_N) or
# "discard" (an old checkpoint has been renamed aside, not yet deleted).
WRAPPER = r"""
import os, runpy, shutil, signal, sys
from pathlib import Path

point = os.environ.get("KILL_AT")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "save_state":
    import accelerate
    original_save_state = accelerate.Accelerator.save_state
    def save_state(self, *args, **kwargs):
        result = original_save_state(self, *args, **kwargs)
        die()
    accelerate.Accelerator.save_state = save_state
elif point == "rename":
    original_rename = Path.rename
    def rename(self, target):
        if self.name.startswith(".partial-"):
            die()
        return original_rename(self, target)
    Path.rename = rename
elif point == "discard":
    original_rmtree = shutil.rmtree
    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".discarded-"):
            die()
        return original_rmtree(path, *args, **kwargs)
    shutil.rmtree = rmtree
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", WRAPPER, str(REPO / "training" / "supervised.py"), "--model_preset", "tiny",
            "--mixed_precision", "no", "--num_workers", "0", "--seed", "0", "--dataset_name", "custom",
            "--restrict_to_present_classes", "--train_images_dir", str(data / "images"), "--train_panoptic_dir",
            str(data / "panoptic"), "--train_annotations", str(data / "panoptic_annotations.json"),
            "--train_batch_size", "2", "--crop_size", "48", "--max_train_steps", str(MAX_STEPS),
            "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--logging_steps", "1",
            "--output_dir", str(out), "--resume_from_checkpoint", "latest"]


def _run(command: list[str], log: Path, kill_at: str | None = None, kill_after: float | None = None,
         timeout: float = 600.0) -> tuple[int, float]:
    """Run `command` (SIGKILLed by this test, its own pid only, `kill_after` seconds in): ``(exit code, seconds)``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "KILL_AT": kill_at or ""}
    with log.open("ab") as sink:
        sink.write(f"\n===== run: kill_at={kill_at} kill_after={kill_after}\n".encode())
        sink.flush()
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        try:
            process.wait(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                raise
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
    return process.returncode, time.monotonic() - started


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []


def test_kill_9_at_random_moments_and_inside_checkpoint_writes_then_resume_gives_the_same_weights(coco_sample_dir,
                                                                                                    tmp_path):
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    code, duration = _run(_command(coco_sample_dir, straight), tmp_path / "straight.log")
    assert code == 0, (tmp_path / "straight.log").read_text()[-3000:]

    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    rng = random.Random(int(os.environ.get("DEARLI_KILL_SEED", "0")))
    outcomes = []
    for moment in ["random", "save_state", "rename", "discard", "random"]:
        if moment == "random":  # a moment in the first 10-70% of an uninterrupted run's time (start-up included)
            code, _ = _run(_command(coco_sample_dir, out), log, kill_after=rng.uniform(0.1, 0.7) * duration)
        else:
            code, _ = _run(_command(coco_sample_dir, out), log, kill_at=moment)
            assert code == -signal.SIGKILL, (moment, log.read_text()[-3000:])  # the point was reached
        assert code in (0, -signal.SIGKILL), (moment, log.read_text()[-3000:])
        hidden = sorted(p.name for p in (out / "checkpoints").glob(".*")) if (out / "checkpoints").is_dir() else []
        outcomes.append((moment, code, _steps(out), hidden))
    code, _ = _run(_command(coco_sample_dir, out), log)  # the last resume, not killed
    assert code == 0, log.read_text()[-3000:]

    assert outcomes[0][1] == -signal.SIGKILL, outcomes  # the first run, killed at a random moment
    text = log.read_text()
    assert "Traceback" not in text and "cannot resume" not in text, text[-3000:]
    # Each chosen kill left its trace: a hidden, half-written or half-deleted folder, which no resume used.
    for moment, prefix in (("save_state", ".partial-"), ("rename", ".partial-"), ("discard", ".discarded-")):
        assert any(m == moment and any(h.startswith(prefix) for h in hidden) for m, _, _, hidden in outcomes), outcomes
    assert text.count("Resumed from") >= 1, outcomes  # at least the last run resumes (the discard kill left two)
    expected, got = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(expected) == sorted(got)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, (different[:5], outcomes)
    assert _steps(out) == _steps(straight) == ["step_00000007", "step_00000008"]
