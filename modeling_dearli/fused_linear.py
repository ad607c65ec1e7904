"""``F.linear`` (optionally followed by ReLU or a residual addition) through oneDNN on a CPU in inference.

torch's CPU ``F.linear`` calls BLAS after copying the bias into the output, and a ReLU is another pass over it. For the
decoder's ``8400 x 256 -> 1024`` feed-forward layers oneDNN's fused linear (bias, ReLU or residual inside the kernel;
the kernel torch's compiler uses for linear layers on CPUs) takes about two thirds of that time, fp32 throughout.
It has no autograd, so it is used only without gradients on a CPU; anything else, or a torch build without it, takes
``F.linear``. Torch only (shipped to the Hub as remote code).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["linear"]

_onednn_available: bool | None = None


def _use_onednn(x: torch.Tensor) -> bool:
    global _onednn_available
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):  # F.linear then runs in the autocast dtype
        return False
    if _onednn_available is None:
        _onednn_available = bool(torch.backends.mkldnn.is_available()) and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )
    return _onednn_available


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then ReLU when ``relu``, then ``+ residual`` when given; fused by oneDNN on a
    CPU without gradients."""
    global _onednn_available
    if relu and residual is not None:
        raise ValueError("linear: relu and residual together are not supported")
    if _use_onednn(x):
        try:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
        except RuntimeError:  # an unsupported build or input: torch's path from now on
            _onednn_available = False
    out = F.linear(x, weight, bias)
    if relu:
        out = F.relu(out)
    return out if residual is None else out + residual
