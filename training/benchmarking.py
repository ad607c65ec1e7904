"""What the benchmark scripts share: a clock for the parts of a step, a median that tolerates no samples, and the
machine's load for their reports."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PartClock", "load_average", "median"]


class PartClock:
    """Process-CPU and wall seconds, and calls, of named parts, summed over their intervals (CUDA-synchronised at each
    reading when `device` is a GPU). Parts are timed with :meth:`start` / :meth:`stop`, or around a module's forward
    with :meth:`time_forward`; :meth:`reset` starts a new measurement."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._open: dict[str, tuple[float, float]] = {}
        self.reset()

    def reset(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def now(self) -> tuple[float, float]:
        """(process CPU seconds, wall seconds)."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.process_time(), time.perf_counter()

    def start(self, name: str) -> None:
        self._open[name] = self.now()

    def stop(self, name: str) -> None:
        (cpu0, wall0), (cpu1, wall1) = self._open.pop(name), self.now()
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu1 - cpu0
        self.wall[name] = self.wall.get(name, 0.0) + wall1 - wall0
        self.calls[name] = self.calls.get(name, 0) + 1

    def time_forward(self, module: torch.nn.Module, name: str) -> list[Any]:
        """Time every forward of `module` as part `name`; returns the hook handles (``.remove()`` undoes it)."""
        return [module.register_forward_pre_hook(lambda *_: self.start(name)),
                module.register_forward_hook(lambda *_: self.stop(name))]

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        """`fn`, timed as part `name` at every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.start(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(name)

        return timed


def median(values: list[float]) -> float:
    """The median of `values` (``nan`` when there are none)."""
    return statistics.median(values) if values else float("nan")


def load_average() -> str:
    """``"load average 1.0 0.9 0.8"`` (1, 5 and 15 minutes), or ``"load average n/a"`` where the OS has none."""
    try:
        return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "load average n/a"
