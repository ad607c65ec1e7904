"""`modeling_dearli.fused_linear.linear`: oneDNN's fused linear on a CPU gives ``F.linear`` (+ ReLU, + residual) and,
with gradients, autograd's gradients of it."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from modeling_dearli import fused_linear
from modeling_dearli.fused_linear import OneDnnLinear, linear


def _reference(x, weight, bias, relu, residual):
    out = F.linear(x, weight, bias)
    if relu:
        out = F.relu(out)
    return out if residual is None else out + residual


@pytest.mark.parametrize("relu,with_residual,with_bias", [(False, False, True), (True, False, True),
                                                          (False, True, True), (True, False, False)])
def test_gradients_equal_autograd_of_f_linear(relu, with_residual, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 16, generator=generator)
    weight = torch.randn(24, 16, generator=generator) * 0.2
    bias = torch.randn(24, generator=generator) if with_bias else None
    residual = torch.randn(2, 37, 24, generator=generator) if with_residual else None
    upstream = torch.randn(2, 37, 24, generator=generator)

    def run(function):
        inputs = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
        out = function(inputs[0], inputs[1], inputs[2], relu, inputs[3])
        out.backward(upstream)
        return out.detach(), [t.grad for t in inputs if t is not None]

    if not fused_linear._use_onednn(x):
        pytest.skip("this torch build has no oneDNN fused linear")
    ours, our_grads = run(lambda *a: linear(*a[:3], relu=a[3], residual=a[4]))
    theirs, their_grads = run(_reference)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert len(our_grads) == len(their_grads) >= 2
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the autograd function is what ran
    out = linear(x.clone().requires_grad_(), weight, bias, relu=relu, residual=residual)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == f"{OneDnnLinear.__name__}Backward"
