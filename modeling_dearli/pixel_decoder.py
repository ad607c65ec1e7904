"""The Mask2Former pixel decoder with a faster forward: transformers' module, same parameters, same numbers.

`DearliPixelDecoder` is transformers' `Mask2FormerPixelDecoder` (so every parameter name, the initialisation and
checkpoints are unchanged) whose `forward` removes work that does not change the result:

- the sine position embeddings depend only on the feature-map sizes: computed once per size (transformers' cache
  holds one entry and the three levels evict each other, so it recomputes them on every call);
- the padding masks are all false (the decoder never sees a pixel mask), so the per-layer ``masked_fill`` of the
  values, the valid ratios and the reference-point arithmetic reduce to constants;
- on a CPU without gradients, each deformable-attention layer runs its sampling as one weighted gather
  (`DeformableSampler`) instead of three ``grid_sample`` calls on re-laid-out copies and a 100 MB stack, with the
  per-point arithmetic laid out so that it vectorises (sampling offsets x-then-y, the attention softmax computed
  transposed), oneDNN's fused linear (+ReLU or residual) for the projections;
- the FPN upsamples a contiguous copy of the encoder's 1/8 level instead of its transposed view.

With gradients on a CPU the layers run transformers' arithmetic except the sampling and the linear layers: the linear
layers run oneDNN's fused kernel with autograd's backward (`modeling_dearli.fused_linear.OneDnnLinear`), the sampling is
the same weighted gather with a hand-written backward (`WeightedGather`: a scatter-add into the values, a dot product
per sample for the weights) instead of ``grid_sample`` on re-laid-out copies. ``grid_sample``'s gradient with respect to
a position jumps where the position crosses a pixel, so the positions are computed with ``grid_sample``'s own operations
and rounding (`grid_sample_positions`): the jumps fall where transformers' fall.

On an accelerator the sampling goes through transformers' `MultiScaleDeformableAttention` layer: loading the model
with ``use_kernels=True`` (or setting ``model.use_kernels = True``) makes transformers swap in its fused CUDA kernel
from the Hub (``kernels-community/deformable-detr``, needs the ``kernels`` package), as for Deformable DETR.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.nn import functional as F
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderLayer,
    Mask2FormerPixelDecoderEncoderOnly,
    Mask2FormerPixelDecoderOutput,
    Mask2FormerSinePositionEmbedding,
)

from .deformable_attention import DeformableSampler, grid_sample_positions, reference_pixel_coordinates
from .fused_linear import feed_forward, linear, linear_layer

__all__ = ["DearliPixelDecoder", "sine_position_embedding"]


def sine_position_embedding(
    module: Mask2FormerSinePositionEmbedding, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(1, height * width, channels)``: the module's sine position embedding of a ``height x width`` map (no mask),
    flattened like the decoders flatten their features. Cached per size (the values depend on nothing else)."""
    settings = (module.num_position_features, module.normalize, module.scale, module.temperature)
    return _sine_position_embedding(height, width, device, dtype, settings)


@lru_cache(maxsize=32)
def _sine_position_embedding(
    height: int, width: int, device: torch.device, dtype: torch.dtype, settings: tuple
) -> torch.Tensor:
    num_position_features, normalize, scale, temperature = settings
    embedding = Mask2FormerSinePositionEmbedding.build_sine_position_embedding(
        torch.Size((1, 1, height, width)), device, dtype, num_position_features, normalize, scale, temperature
    )
    return embedding.flatten(2).transpose(1, 2).contiguous()


@lru_cache(maxsize=16)
def _reference_points(
    spatial_shapes: tuple[tuple[int, int], ...], batch_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """transformers' reference points ``(B, S, L, 2)`` for unpadded maps (valid ratios 1)."""
    valid_ratios = torch.ones(batch_size, len(spatial_shapes), 2, device=device, dtype=dtype)
    return Mask2FormerPixelDecoderEncoderOnly.get_reference_points(spatial_shapes, valid_ratios, device=device)


def _attention_weights(projection: torch.nn.Linear, query: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax`` over each head's levels x points of ``projection(query)``, ``(B, S, heads * L * P)``.

    Computed transposed, ``(heads, L * P, B * S)``: a softmax over 12 values per row runs mostly in scalar code,
    over the long axis it vectorises."""
    batch, length, channels = query.shape
    logits = torch.addmm(projection.bias[:, None], projection.weight, query.reshape(-1, channels).t())
    logits = logits.view(heads, -1, batch * length)
    weights = (logits - logits.amax(1, keepdim=True)).exp_()
    weights = weights.div_(weights.sum(1, keepdim=True))
    return weights.view(-1, batch * length).t().contiguous().view(batch, length, -1)


def _encoder_layer_fast(
    layer: Mask2FormerPixelDecoderEncoderLayer,
    hidden: torch.Tensor,
    position: torch.Tensor,
    sampler: DeformableSampler,
) -> torch.Tensor:
    """One deformable encoder layer without gradients on a CPU: transformers' layer, computed with fewer passes."""
    attention = layer.self_attn
    batch, length, channels = hidden.shape
    heads, levels, points = attention.n_heads, attention.n_levels, attention.n_points
    value = linear(hidden, attention.value_proj.weight, attention.value_proj.bias)
    query = hidden + position
    # Offsets with all x first, then all y: rows of the projection reordered (heads, L, P, xy) -> (xy, heads, L, P).
    planar = (heads * levels * points, 2, channels)
    offsets = linear(
        query,
        attention.sampling_offsets.weight.view(planar).transpose(0, 1).reshape(-1, channels),
        attention.sampling_offsets.bias.view(planar[:2]).t().reshape(-1),
    ).view(batch, length, 2, heads, levels, points).float()  # positions in float32 (also under bf16 autocast)
    weights = _attention_weights(attention.attention_weights, query, heads).view(batch, length, heads, levels, points)
    weights = weights.float()
    # reference + offset / size in normalised coordinates is reference_pixel + offset in pixels.
    reference_x, reference_y = reference_pixel_coordinates(
        sampler.spatial_shapes, heads, points, hidden.device, torch.float32
    )
    x = offsets[:, :, 0] + reference_x
    y = offsets[:, :, 1] + reference_y
    sampled = sampler(value.view(batch, length, heads, channels // heads), x, y, weights).to(value.dtype)
    hidden = layer.self_attn_layer_norm(
        linear(sampled, attention.output_proj.weight, attention.output_proj.bias, residual=hidden)
    )
    return layer.final_layer_norm(feed_forward(hidden, layer.fc1, layer.fc2, layer.activation_fn, residual=hidden))


def _encoder_layer(
    layer: Mask2FormerPixelDecoderEncoderLayer,
    hidden: torch.Tensor,
    position: torch.Tensor,
    reference_points: torch.Tensor,
    spatial_shapes: tuple[tuple[int, int], ...],
    sample,
) -> torch.Tensor:
    """One deformable encoder layer as transformers computes it (without the no-op padding mask; linear layers through
    `linear`, which on a CPU is oneDNN's fused kernel), with the sampling done by ``sample`` (transformers' function,
    or its kernel-backed layer on an accelerator)."""
    attention = layer.self_attn
    batch, length, channels = hidden.shape
    heads, levels, points = attention.n_heads, attention.n_levels, attention.n_points
    query = hidden + position
    value = linear_layer(hidden, attention.value_proj).view(batch, length, heads, channels // heads)
    offsets = linear_layer(query, attention.sampling_offsets).view(batch, length, heads, levels, points, 2)
    weights = linear_layer(query, attention.attention_weights).view(batch, length, heads, levels * points)
    weights = F.softmax(weights, -1).view(batch, length, heads, levels, points)
    normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.long, device=hidden.device)
    locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    sampled = sample(value, spatial_shapes, locations, weights)
    hidden = layer.self_attn_layer_norm(linear_layer(sampled, attention.output_proj, residual=hidden))
    hidden = layer.final_layer_norm(feed_forward(hidden, layer.fc1, layer.fc2, layer.activation_fn, residual=hidden))
    if layer.training and not torch.isfinite(hidden).all():
        clamp_value = torch.finfo(hidden.dtype).max - 1000
        hidden = torch.clamp(hidden, min=-clamp_value, max=clamp_value)
    return hidden


def _gather_sample(sampler: DeformableSampler):
    """transformers' ``multi_scale_deformable_attention(value, shapes, locations, weights)`` computed by `sampler`
    (its differentiable gather when gradients are on), positions rounded as ``grid_sample`` rounds them."""

    def sample(value, spatial_shapes, locations, weights):
        x, y = grid_sample_positions(locations.float(), spatial_shapes)
        return sampler(value, x, y, weights.float()).to(value.dtype)

    return sample


class DearliPixelDecoder(Mask2FormerPixelDecoder):
    """transformers' `Mask2FormerPixelDecoder` (same parameters) with a forward that skips redundant work; see the
    module docstring. ``implementation="transformers"`` and the options it does not cover (``encoder_outputs``,
    ``output_attentions``, dropout) run transformers' forward."""

    def __init__(self, config, feature_channels):
        super().__init__(config, feature_channels)
        # No parameters: the hook through which transformers' `use_kernels` installs the fused CUDA kernel.
        self.deformable_attention_kernel = MultiScaleDeformableAttention()

    def _kernel_sample(self, value, spatial_shapes, locations, weights):
        shapes = torch.tensor(spatial_shapes, dtype=torch.long, device=value.device)
        start = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
        im2col_step = self.encoder.layers[0].self_attn.im2col_step
        return self.deformable_attention_kernel(
            value, shapes, list(spatial_shapes), start, locations, weights, im2col_step
        )

    def forward(
        self,
        features,
        encoder_outputs=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        implementation: str = "dearli",
    ) -> Mask2FormerPixelDecoderOutput:
        """transformers' forward (``implementation="transformers"``) or ours (``"dearli"``): same outputs."""
        if implementation == "transformers" or encoder_outputs is not None or output_attentions or self.config.dropout:
            return super().forward(features, encoder_outputs, output_attentions, output_hidden_states, return_dict)
        levels = list(features[::-1][: self.num_feature_levels])  # strides 32, 16, 8: low resolution first
        batch = levels[0].shape[0]
        spatial_shapes = tuple((int(x.shape[2]), int(x.shape[3])) for x in levels)
        hidden = torch.cat(
            [projection(x).flatten(2).transpose(1, 2) for projection, x in zip(self.input_projections, levels)], 1
        )
        position = torch.cat(
            [
                sine_position_embedding(self.position_embedding, h, w, x.device, x.dtype)
                + self.level_embed[i].view(1, 1, -1)
                for i, ((h, w), x) in enumerate(zip(spatial_shapes, levels))
            ],
            1,
        )

        on_cpu = hidden.device.type == "cpu"
        if on_cpu:
            attention = self.encoder.layers[0].self_attn
            sampler = DeformableSampler(
                spatial_shapes, batch, attention.n_heads, attention.n_points, attention.d_model // attention.n_heads,
                hidden.device, torch.float32,
            )
        if on_cpu and not torch.is_grad_enabled() and not self.training:
            for layer in self.encoder.layers:
                hidden = _encoder_layer_fast(layer, hidden, position, sampler)
        else:
            sample = _gather_sample(sampler) if on_cpu else self._kernel_sample
            # float32 positions on a CPU (a bf16 reference point is off by up to half a pixel of the 1/8 level)
            reference_dtype = torch.float32 if on_cpu else hidden.dtype
            reference_points = _reference_points(spatial_shapes, batch, hidden.device, reference_dtype)
            for layer in self.encoder.layers:
                hidden = _encoder_layer(layer, hidden, position, reference_points, spatial_shapes, sample)

        # Multi-scale outputs and the FPN levels, as transformers computes them.
        sizes = [h * w for h, w in spatial_shapes]
        outputs = [
            x.transpose(1, 2).view(batch, -1, h, w) for x, (h, w) in zip(hidden.split(sizes, dim=1), spatial_shapes)
        ]
        for idx, feature in enumerate(features[: self.num_fpn_levels][::-1]):
            lateral = self.lateral_convolutions[idx](feature)
            # The encoder's levels are transposed views of (B, HW, C); bilinear upsampling of such a view takes
            # several times as long as copying it to (B, C, H, W) first and upsampling that.
            upsampled = F.interpolate(
                outputs[-1].contiguous(), size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            outputs.append(self.output_convolutions[idx](lateral + upsampled))
        return Mask2FormerPixelDecoderOutput(
            mask_features=self.mask_projection(outputs[-1]),
            multi_scale_features=tuple(outputs[: self.num_feature_levels]),
            attentions=None,
        )
