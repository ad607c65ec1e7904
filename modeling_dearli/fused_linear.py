"""``F.linear`` (optionally followed by ReLU or a residual addition) through oneDNN on a CPU.

torch's CPU ``F.linear`` calls BLAS after copying the bias into the output, and a ReLU is another pass over it. For the
decoder's ``8400 x 256 -> 1024`` feed-forward layers oneDNN's fused linear (bias, ReLU or residual inside the kernel;
the kernel torch's compiler uses for linear layers on CPUs) takes about two thirds of that time, fp32 throughout.
The kernel has no autograd: with gradients, `OneDnnLinear` gives it the backward autograd would compute for
``F.linear`` (and ``F.relu``, and the addition). Used on a CPU in float32 outside autocast; anything else, or a torch
build without the kernel, takes ``F.linear``. Torch only (shipped to the Hub as remote code).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["OneDnnLinear", "feed_forward", "linear", "linear_layer"]

_onednn_available: bool | None = None


def _use_onednn(x: torch.Tensor) -> bool:
    global _onednn_available
    if x.device.type != "cpu" or x.dtype != torch.float32:
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
            if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, weight, bias, residual)
            ):
                return OneDnnLinear.apply(x, weight, bias, relu, residual)
            return _onednn_forward(x, weight, bias, relu, residual)
        except RuntimeError:  # an unsupported build or input: torch's path from now on
            _onednn_available = False
    out = F.linear(x, weight, bias)
    if relu:
        out = F.relu(out)
    return out if residual is None else out + residual


def linear_layer(
    x: torch.Tensor, module: torch.nn.Linear, relu: bool = False, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """`linear` with an ``nn.Linear``'s weight and bias: ``module(x)``, then ReLU / ``+ residual``."""
    return linear(x, module.weight, module.bias, relu=relu, residual=residual)


def feed_forward(
    x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, activation, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """``fc2(activation(fc1(x)))``, then ``+ residual`` when given, through `linear` (ReLU fused into ``fc1``)."""
    if activation is F.relu or isinstance(activation, torch.nn.ReLU):
        hidden = linear_layer(x, fc1, relu=True)
    else:
        hidden = activation(linear_layer(x, fc1))
    return linear_layer(hidden, fc2, residual=residual)


def _onednn_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool, residual: torch.Tensor | None
) -> torch.Tensor:
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


class OneDnnLinear(torch.autograd.Function):
    """oneDNN's fused linear (+ ReLU or + residual) with the backward of ``F.linear`` (+ ``F.relu``, + the addition):
    ``threshold_backward`` on the output as ReLU's, then the two matrix products (the input's through oneDNN too) and
    the bias sum as ``addmm``'s."""

    @staticmethod
    def forward(ctx, x, weight, bias, relu, residual):
        out = _onednn_forward(x, weight, bias, relu, residual)
        ctx.relu = relu
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, out = ctx.saved_tensors
        if ctx.relu:
            grad_output = torch.ops.aten.threshold_backward(grad_output, out, 0)
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # grad @ weight as oneDNN's linear with the transposed weight: 1.0-1.7x faster than BLAS's mm for the
            # decoders' shapes (8400 x 1024 -> 256: 1.7x)
            grad_x = _onednn_forward(grad, weight.t().contiguous(), None, False, None).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        grad_residual = grad_output if ctx.needs_input_grad[4] else None
        return grad_x, grad_weight, grad_bias, None, grad_residual
