"""Initial weights of DEARLi's pixel decoder: the reference's (Mask2Former's ``MSDeformAttnPixelDecoder``), assigned by
parameter role, i.e. by the parameter's name inside the pixel decoder, never by the class of the module holding it.

Why by name: the pixel decoder may be transformers' ``Mask2FormerPixelDecoder`` or an equivalent module of ours with
the same parameter names (the names are also what checkpoints and the reference conversion rely on). transformers'
Mask2Former ``_init_weights`` dispatches on its own classes, and its port initialises the pixel decoder's convolutions
and feed-forward layers with the generic N(0, 0.02) where Mask2Former / the DEARLi reference use Xavier fills. Roles
(names relative to the pixel decoder; ``{i}`` a layer or level index):

* ``level_embed``: N(0, 1);
* ``input_projections.{i}.0``: Xavier-uniform weight (gain 1), zero bias;
* ``encoder.layers.{i}.self_attn``: Deformable DETR's multi-scale deformable attention -- zero ``sampling_offsets``
  weight with the bias on a ring grid (head ``h`` points towards angle ``2 pi h / heads``, point ``p`` at distance
  ``p + 1``), zero ``attention_weights``, Xavier-uniform ``value_proj`` / ``output_proj`` with zero bias;
* ``encoder.layers.{i}.fc1`` / ``fc2``: Xavier-uniform weight, PyTorch's default ``nn.Linear`` bias
  (``U(+-1/sqrt(fan_in))``);
* ``mask_projection``, ``adapter_{k}.0``, ``layer_{k}.0``: detectron2's ``c2_xavier_fill`` (Kaiming-uniform with
  ``a = 1``), zero bias.

Other parameters (the normalisation layers) keep the generic initialisation (weight 1, bias 0). Everything is written
through ``transformers.initialization``, whose functions leave parameters loaded from a checkpoint untouched.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers import initialization as init

__all__ = ["deformable_sampling_grid", "init_pixel_decoder"]

_SELF_ATTN = re.compile(
    r"^(encoder\.layers\.\d+\.self_attn)\.(sampling_offsets|attention_weights|value_proj|output_proj)"
    r"\.(weight|bias)$"
)
_FFN = re.compile(r"^encoder\.layers\.\d+\.fc[12]\.(weight|bias)$")
_INPUT_PROJECTION = re.compile(r"^input_projections\.\d+\.0\.(weight|bias)$")
_C2_XAVIER = re.compile(r"^(mask_projection|adapter_\d+\.0|layer_\d+\.0)\.(weight|bias)$")


def deformable_sampling_grid(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
    """Deformable DETR's initial sampling offsets ``(n_heads * n_levels * n_points * 2,)``, laid out as
    ``(head, level, point, xy)``: head ``h`` points in the direction of angle ``2 pi h / n_heads`` (scaled so that
    its larger coordinate is 1), point ``p`` at ``p + 1`` times that, the same on every level."""
    angles = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
    directions = directions / directions.abs().amax(dim=-1, keepdim=True)
    distances = torch.arange(1, n_points + 1, dtype=torch.float32).view(1, 1, n_points, 1)
    grid = directions.view(n_heads, 1, 1, 2) * distances
    return grid.expand(n_heads, n_levels, n_points, 2).reshape(-1)


def _linear_default_bias(bias: torch.Tensor, weight: torch.Tensor) -> None:
    fan_in = weight.shape[1] if weight.dim() > 1 else weight.numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    init.uniform_(bias, -bound, bound)


def _sampling_geometry(attention: nn.Module, num_heads: int, num_levels: int) -> tuple[int, int, int]:
    """(heads, levels, points) of a deformable attention module: its own attributes when it has them (transformers'
    module), else `num_heads` / `num_levels` with the points implied by the size of ``attention_weights``."""
    heads = int(getattr(attention, "n_heads", num_heads))
    levels = int(getattr(attention, "n_levels", num_levels))
    points = getattr(attention, "n_points", None)
    if points is None:
        points, remainder = divmod(attention.attention_weights.out_features, heads * levels)
        if remainder:
            raise ValueError(
                f"attention_weights has {attention.attention_weights.out_features} outputs, not a "
                f"multiple of {heads} heads x {levels} levels"
            )
    return heads, levels, int(points)


@torch.no_grad()
def init_pixel_decoder(pixel_decoder: nn.Module, num_heads: int) -> None:
    """Initialise a Mask2Former pixel decoder as the reference does (see the module docstring), by parameter name.

    Args:
        pixel_decoder: transformers' ``Mask2FormerPixelDecoder`` or a module with the same parameter names.
        num_heads: attention heads of its deformable encoder, used when a deformable attention module does not say
            (transformers' ``config.num_attention_heads``).
    """
    num_levels = len(getattr(pixel_decoder, "input_projections", ())) or 3
    params = dict(pixel_decoder.named_parameters())
    for name, param in params.items():
        kind = name.rsplit(".", 1)[-1]
        if name == "level_embed":
            init.normal_(param, mean=0.0, std=1.0)
        elif match := _SELF_ATTN.match(name):
            owner, role = match.group(1), match.group(2)
            if role == "sampling_offsets" and kind == "bias":
                attention = pixel_decoder.get_submodule(owner)
                grid = deformable_sampling_grid(*_sampling_geometry(attention, num_heads, num_levels))
                init.copy_(param, grid.to(param.dtype))
            elif role in ("sampling_offsets", "attention_weights") or kind == "bias":
                init.zeros_(param)
            else:
                init.xavier_uniform_(param, gain=1.0)
        elif _FFN.match(name):
            if kind == "weight":
                init.xavier_uniform_(param, gain=1.0)
            else:
                _linear_default_bias(param, params[name[: -len("bias")] + "weight"])
        elif _INPUT_PROJECTION.match(name) and kind == "weight":
            init.xavier_uniform_(param, gain=1.0)
        elif _C2_XAVIER.match(name) and kind == "weight":
            init.kaiming_uniform_(param, a=1)
        elif _INPUT_PROJECTION.match(name) or _C2_XAVIER.match(name):
            init.zeros_(param)
