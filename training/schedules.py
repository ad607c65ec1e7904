"""Optimizer and learning-rate schedule of the DEARLi loops: AdamW on the trainable parameters, poly decay."""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_polynomial_decay_schedule_with_warmup

__all__ = ["build_optimizer", "build_poly_scheduler"]


def build_optimizer(model: nn.Module, learning_rate: float = 1e-4, weight_decay: float = 0.05) -> AdamW:
    """AdamW over ``model.trainable_parameters()`` only (the frozen CLIP towers never reach the optimizer)."""
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else [
        p for p in model.parameters() if p.requires_grad
    ]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return AdamW(params, lr=learning_rate, weight_decay=weight_decay)


def build_poly_scheduler(optimizer: Optimizer, max_steps: int, power: float = 0.9, warmup_steps: int = 0) -> LambdaLR:
    """detectron2's poly schedule ``lr * (1 - step / max_steps) ** power`` (optionally after a linear warm-up), via
    transformers' polynomial schedule with ``lr_end = 0``."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps, lr_end=0.0, power=power
    )
