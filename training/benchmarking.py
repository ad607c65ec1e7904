"""What the benchmark scripts share: a median that tolerates no samples, and the machine's load for their reports."""

from __future__ import annotations

import os
import statistics

__all__ = ["load_average", "median"]


def median(values: list[float]) -> float:
    """The median of `values` (``nan`` when there are none)."""
    return statistics.median(values) if values else float("nan")


def load_average() -> str:
    """``"load average 1.0 0.9 0.8"`` (1, 5 and 15 minutes), or ``"load average n/a"`` where the OS has none."""
    try:
        return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "load average n/a"
