"""Deterministic, resumable data order: epochs whose order and per-example augmentation seeds depend only on
``(seed, epoch)``, so a run resumed at step N sees exactly the batches of an uninterrupted run (the loop skips the
batches an interrupted epoch had consumed, see :func:`training.loop.iterate_steps`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "unpack_index"]


class ResumableSampler(Sampler):
    """Yields ``(index, sample_seed)`` pairs: a permutation of ``range(num_samples)`` per epoch (or the identity with
    ``shuffle=False``) and one 63-bit augmentation seed per position, both drawn from ``(seed, epoch)`` only.

    Datasets of this package accept such a pair as their index and seed their augmentation with it, so the batches of
    epoch ``e`` are the same in every run and every process layout. ``epoch_length`` (default ``num_samples``) lets an
    epoch repeat a small dataset (e.g. 2 images, batch 8): it concatenates permutations up to that length.
    `set_epoch` is called by Accelerate's data loader (see :func:`training.loop.iterate_steps`).
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
            chunk = (
                torch.randperm(self.num_samples, generator=generator)
                if self.shuffle
                else torch.arange(self.num_samples)
            )
            chunks.append(chunk)
            total += len(chunk)
        order = torch.cat(chunks)[: self.epoch_length].tolist()
        seeds = torch.randint(0, 2**62, (self.epoch_length,), generator=generator).tolist()
        return iter(list(zip(order, seeds)))


def unpack_index(key: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    """``index`` or ``(index, seed)`` (from :class:`ResumableSampler`) -> ``(index, seed)`` (seed 0 for a bare
    index)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0
