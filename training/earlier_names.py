"""Earlier spellings that are still accepted, in one place: users' scripts and presets keep working, while the code
uses one name per concept.

- :data:`FLAGS`: training-loop flags and YAML preset keys (hidden from ``--help``; the parsed arguments carry the
  current name, and the earlier attribute too for callers not yet moved to it).
- :data:`KEYWORDS`: keyword arguments of library functions and dataclasses.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["FLAGS", "KEYWORDS", "renamed_keywords"]

# earlier flag / preset key -> current one
FLAGS: dict[str, str] = {
    "sam_masks_dir": "masks_dir",
    "drop_empty_sam_masks": "drop_empty_masks",
    "train_max_size": "train_longest_edge",
    "eval_max_size": "eval_longest_edge",
}

# earlier keyword -> current one
KEYWORDS: dict[str, str] = {
    "color_jitter_p": "color_jitter_prob",
    "grayscale_p": "grayscale_prob",
    "blur_p": "blur_prob",
    "cutmix_p": "cutmix_prob",
}


def renamed_keywords(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`kwargs` with earlier keyword names (:data:`KEYWORDS`) replaced by the current ones (a ``FutureWarning`` names
    each); giving both spellings of one argument is a ``TypeError``."""
    out = dict(kwargs)
    for earlier, current in KEYWORDS.items():
        if earlier in out:
            if current in out:
                raise TypeError(f"{where}: got both {earlier}= and {current}=; give {current}= only")
            warnings.warn(f"{where}: {earlier}= is now called {current}=", FutureWarning, stacklevel=3)
            out[current] = out.pop(earlier)
    return out
