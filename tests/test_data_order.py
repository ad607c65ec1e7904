"""The training loops' data order under several processes (README "Beyond one machine"), with the loops' own loader
(`training.loop.build_train_dataloader`), Accelerate's per-process sharding (`prepare_data_loader` for process i of n,
as `accelerator.prepare` does it) and the loops' resume (`training.loop.iterate_steps`):

- a run resumed at step k on n processes gives every process the batches an uninterrupted n-process run gives it
  from step k on, across epoch boundaries;
- at every step the n processes' batches, concatenated in process order, are exactly the one-process run's batch of
  that step: the same images with the same augmentation seeds, the global batch cut into n consecutive shares.

The same is checked once under a real two-process ``accelerate launch`` on the CPU (gloo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from accelerate.data_loader import prepare_data_loader, skip_first_batches

from training.loop import build_train_dataloader, iterate_steps

NUM_IMAGES = 11  # not a multiple of the batch: every epoch drops its last partial batch
GLOBAL_BATCH = 4
STEPS = 12  # six epochs of two steps: several epoch boundaries


class _Keys:
    """A dataset whose item is the ``(index, augmentation seed)`` key the sampler hands it."""

    def __len__(self) -> int:
        return NUM_IMAGES

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return tuple(key)


class _Accelerator:
    """What iterate_steps uses of an Accelerator: its resume by skipping batches."""

    skip_first_batches = staticmethod(skip_first_batches)


def _stream(num_processes: int, process_index: int, start_step: int, seed: int = 5) -> list[list[tuple[int, int]]]:
    loader = build_train_dataloader(_Keys(), GLOBAL_BATCH, num_processes, seed=seed, collate_fn=list)
    # rng_types=[]: no generator synchronisation across processes (it needs a process group); the sampler draws its
    # order from its own seed and epoch, not from the loader's generator
    loader = prepare_data_loader(loader, num_processes=num_processes, process_index=process_index,
                                 put_on_device=False, rng_types=[])
    return [batch for _, _, batch in iterate_steps(_Accelerator(), loader, start_step, STEPS)]


@pytest.mark.parametrize("resume_at", [1, 2, 5, 11])
def test_resumed_two_process_run_continues_the_uninterrupted_order(resume_at):
    for process in range(2):
        uninterrupted = _stream(2, process, 0)
        assert len(uninterrupted) == STEPS
        assert _stream(2, process, resume_at) == uninterrupted[resume_at:]


def test_two_processes_split_each_global_batch_of_one_process():
    one = _stream(1, 0, 0)
    shares = [_stream(2, p, 0) for p in range(2)]
    for step in range(STEPS):
        assert [len(s[step]) for s in shares] == [GLOBAL_BATCH // 2] * 2
        assert shares[0][step] + shares[1][step] == one[step], step
    # an epoch is a permutation of the images (the last partial batch dropped), the next epoch another one
    first_epoch = [index for batch in one[:NUM_IMAGES // GLOBAL_BATCH] for index, _ in batch]
    assert len(set(first_epoch)) == len(first_epoch) == GLOBAL_BATCH * (NUM_IMAGES // GLOBAL_BATCH)
    assert one[0] != one[NUM_IMAGES // GLOBAL_BATCH]


# The loops' data path in a launched process: an Accelerator, its prepared loader, iterate_steps from a start step.
_LAUNCHED = textwrap.dedent("""
    import json, sys
    from accelerate import Accelerator
    from training.loop import build_train_dataloader, iterate_steps

    class Keys:
        def __len__(self):
            return {num_images}

        def __getitem__(self, key):
            return [int(k) for k in key]

    accelerator = Accelerator(cpu=True)
    start, out = int(sys.argv[1]), sys.argv[2]
    loader = accelerator.prepare(build_train_dataloader(Keys(), {batch}, accelerator.num_processes, seed=5,
                                                        collate_fn=list))
    batches = [batch for _, _, batch in iterate_steps(accelerator, loader, start, {steps})]
    with open(f"{{out}}_{{accelerator.process_index}}.json", "w") as f:
        json.dump(batches, f)
""").format(num_images=NUM_IMAGES, batch=GLOBAL_BATCH, steps=STEPS)


def _launched(tmp_path: Path, num_processes: int, start_step: int) -> list[list[list[list[int]]]]:
    script = tmp_path / "data_order.py"
    script.write_text(_LAUNCHED)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    out = tmp_path / f"n{num_processes}_start{start_step}"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run([*launch, str(script), str(start_step), str(out)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(Path(f"{out}_{p}.json").read_text()) for p in range(num_processes)]


@pytest.mark.slow
def test_launched_two_process_run_resumed_in_a_later_epoch(tmp_path):
    """Two processes under accelerate launch: resumed at step 5 (the middle of the third epoch) each process gets the
    uninterrupted run's batches, and the two shares of a step are the in-process one-process batch of that step."""
    uninterrupted = _launched(tmp_path, 2, 0)
    resumed = _launched(tmp_path, 2, 5)
    for process in range(2):
        assert len(uninterrupted[process]) == STEPS
        assert resumed[process] == uninterrupted[process][5:]
    one = [[list(key) for key in batch] for batch in _stream(1, 0, 0)]
    assert [a + b for a, b in zip(*uninterrupted, strict=True)] == one
