"""Optimizer and learning-rate schedule of the DEARLi loops: AdamW on the trainable parameters, poly decay.

Weight decay as the reference's ``build_optimizer`` (detectron2 ``SOLVER.WEIGHT_DECAY_NORM`` /
``WEIGHT_DECAY_EMBED``): parameters of normalisation layers and of ``nn.Embedding`` modules (the decoder's queries and
level embedding, the no-object embedding) are not decayed; every other trainable parameter (biases, the pixel
decoder's ``level_embed`` parameter and the M2F-Lang ``logit_scale`` included) is.
"""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_polynomial_decay_schedule_with_warmup

__all__ = ["NORM_LAYERS", "build_optimizer", "build_poly_scheduler", "weight_decay_groups"]

# The normalisation layers of detectron2's optimizer builder.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)  # fmt: skip


def weight_decay_groups(
    model: nn.Module, weight_decay: float = 0.05, weight_decay_norm: float = 0.0, weight_decay_embed: float = 0.0
) -> list[dict]:
    """AdamW parameter groups of the trainable parameters (``model.trainable_parameters()`` when it has it): each
    parameter gets `weight_decay_norm` if the module owning it is a normalisation layer, `weight_decay_embed` if it
    is an ``nn.Embedding``, else `weight_decay`; one group per distinct value, with the parameter names
    (``"names"``) for inspection."""
    trainable = model.trainable_parameters() if hasattr(model, "trainable_parameters") else [
        p for p in model.parameters() if p.requires_grad
    ]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    wanted = {id(p) for p in trainable}
    groups: dict[float, dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            decay = weight_decay_norm
        elif isinstance(module, nn.Embedding):
            decay = weight_decay_embed
        else:
            decay = weight_decay
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in wanted or id(param) in seen:
                continue
            seen.add(id(param))
            group = groups.setdefault(float(decay), {"params": [], "names": [], "weight_decay": float(decay)})
            group["params"].append(param)
            group["names"].append(f"{module_name}.{name}" if module_name else name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.05,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
) -> AdamW:
    """AdamW over the trainable parameters only (the frozen CLIP towers never reach the optimizer), with the weight
    decay groups of :func:`weight_decay_groups` (``weight_decay_norm = weight_decay_embed = weight_decay`` decays
    every parameter alike)."""
    groups = weight_decay_groups(model, weight_decay, weight_decay_norm, weight_decay_embed)
    return AdamW(groups, lr=learning_rate, weight_decay=weight_decay)


def build_poly_scheduler(optimizer: Optimizer, max_steps: int, power: float = 0.9, warmup_steps: int = 0) -> LambdaLR:
    """detectron2's poly schedule ``lr * (1 - step / max_steps) ** power`` (optionally after a linear warm-up), via
    transformers' polynomial schedule with ``lr_end = 0``."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps, lr_end=0.0, power=power
    )
