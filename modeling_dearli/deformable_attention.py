"""Multi-scale deformable attention sampling (Deformable DETR) as one weighted gather.

transformers' Mask2Former pixel decoder samples each level with ``grid_sample`` on a ``(batch * heads, 32, H, W)``
copy of the values, stacks the ``(batch * heads, 32, queries, levels * points)`` samples (a 100 MB tensor per layer for
one 640x640 image) and multiplies and sums them with the attention weights. On a CPU that costs several times the
layer's matrix products. Here every query's output is one weighted sum of 4 bilinear corners x levels x points rows
of the value table, kept in its natural ``(batch, pixels, heads, 32)`` layout: ``F.embedding_bag`` with per-sample
weights (corner weight x attention weight) computes it without materialising the samples. Each level is stored with a
zero border (one pixel before, two after, in both directions) and positions are clamped into it, which reproduces
``grid_sample``'s zero padding without per-corner validity masks.

Written by hand because neither transformers nor torch has a CPU kernel for this (transformers' fused kernel is CUDA
only, see ``DearliPixelDecoder``). Torch only (shipped to the Hub as remote code).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.nn import functional as F

__all__ = [
    "DeformableSampler",
    "WeightedGather",
    "deformable_sample",
    "grid_sample_positions",
    "reference_pixel_coordinates",
]


@lru_cache(maxsize=4)
def reference_pixel_coordinates(
    spatial_shapes: tuple[tuple[int, int], ...], num_heads: int, num_points: int, device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x, y`` ``(S, heads, L, P)``: the pixel coordinate, on each level's map, of every query's reference point.

    The queries are the pixels of all levels (in order); a query's reference point is its pixel centre in
    normalised coordinates (transformers' ``get_reference_points`` without padding). On a level of width ``W``
    a normalised position ``u`` is at pixel coordinate ``u * W - 0.5`` (``grid_sample`` with
    ``align_corners=False``), so ``reference + offset / W`` samples pixel ``reference_pixel + offset``.
    """
    centres = []
    for height, width in spatial_shapes:
        y = (torch.arange(height, dtype=torch.float64) + 0.5) / height
        x = (torch.arange(width, dtype=torch.float64) + 0.5) / width
        centres.append(torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).reshape(-1, 2))
    centres = torch.cat(centres, 0)  # (S, 2) normalised (x, y)
    sizes = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float64)  # (L, 2)
    pixels = centres[:, None, :] * sizes[None] - 0.5  # (S, L, 2)
    shape = (pixels.shape[0], num_heads, len(spatial_shapes), num_points)
    return tuple(
        pixels[:, None, :, None, i].expand(shape).to(device=device, dtype=dtype).contiguous() for i in range(2)
    )


class DeformableSampler:
    """Multi-scale deformable attention sampling for maps of fixed sizes, reused across layers.

    Per call: ``value`` ``(B, S, heads, D)`` (the levels' pixels, row-major per level, levels concatenated), sampling
    positions ``x``, ``y`` ``(B, Q, heads, L, P)`` in pixel coordinates of each level (pixel centres at integers:
    ``grid_sample``'s ``align_corners=False`` position minus 0.5) and attention weights ``(B, Q, heads, L, P)``;
    returns ``(B, Q, heads * D)``, the attention-weighted bilinear samples (zeros outside the maps), which is what
    transformers' ``multi_scale_deformable_attention`` returns for the same positions, to rounding.

    The value table with its zero border is allocated once; a call rewrites its interior. All per-point arithmetic
    runs on arrays whose innermost dimension is ``heads x levels x points`` (not 2 or 4), which CPUs vectorise.
    """

    def __init__(
        self,
        spatial_shapes: tuple[tuple[int, int], ...],
        batch_size: int,
        num_heads: int,
        num_points: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
        levels = len(self.spatial_shapes)
        padded = [(h + 3) * (w + 3) for h, w in self.spatial_shapes]
        table_pixels = sum(padded)
        self.table = torch.zeros(batch_size, table_pixels, num_heads, head_dim, device=device, dtype=dtype)
        self.interiors, start = [], 0  # (B, h, w, heads, D) views of each level's interior
        for (height, width), size in zip(self.spatial_shapes, padded):
            level = self.table[:, start : start + size].view(batch_size, height + 3, width + 3, num_heads, head_dim)
            self.interiors.append(level[:, 1 : height + 1, 1 : width + 1])
            start += size

        def per_point(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            """A per-level constant laid out (heads, L, P)."""
            t = torch.tensor(values, dtype=torch.float64)[None, :, None].expand(num_heads, levels, num_points)
            return t.to(device=device, dtype=dtype).contiguous()

        self.lower = torch.tensor(-1.0, device=device, dtype=dtype)
        self.upper_x = per_point([w for _, w in self.spatial_shapes], dtype)
        self.upper_y = per_point([h for h, _ in self.spatial_shapes], dtype)
        # Table row of padded pixel (x + 1, y + 1) of level l, image b, head h:
        #   (b * table_pixels + start_l + (y + 1) * row_length_l + x + 1) * heads + h
        max_index = batch_size * table_pixels * num_heads
        # float arithmetic is exact for integers below 2^24; embedding_bag takes int32 indices (half the traffic)
        self.index_float = torch.float32 if max_index < 2**24 else torch.float64
        self.index_int = torch.int32 if max_index < 2**31 else torch.int64
        starts = torch.tensor([0] + padded[:-1]).cumsum(0).tolist()
        row_length = [w + 3 for _, w in self.spatial_shapes]
        self.row_stride = per_point([r * num_heads for r in row_length], self.index_float)
        level_base = per_point([(s + r + 1) * num_heads for s, r in zip(starts, row_length)], torch.float64)
        base = (
            torch.arange(batch_size, device=device, dtype=torch.float64)[:, None, None, None]
            * (table_pixels * num_heads)
            + level_base
            + torch.arange(num_heads, device=device, dtype=torch.float64)[:, None, None]
        )
        self.base = base[:, None].to(self.index_float)  # (B, 1, heads, L, P)
        # the four corners (x0, y0), (x1, y0), (x0, y1), (x1, y1) relative to (x0, y0), laid out (4, L, P)
        corners = torch.tensor([[0, 1, r, r + 1] for r in row_length]).T * num_heads  # (4, L)
        self.corners = corners[:, :, None].expand(4, levels, num_points).to(device=device, dtype=self.index_int)
        self.corners = self.corners.contiguous()

    def __call__(
        self, value: torch.Tensor, x: torch.Tensor, y: torch.Tensor, attention_weights: torch.Tensor
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (value, x, y, attention_weights)):
            return self._differentiable(value, x, y, attention_weights)
        batch, _, heads, dim = value.shape
        queries, levels, points = x.shape[1], x.shape[3], x.shape[4]
        source = 0
        for (height, width), interior in zip(self.spatial_shapes, self.interiors):
            interior.copy_(value[:, source : source + height * width].view(batch, height, width, heads, dim))
            source += height * width

        # Clamped into the zero border: a position beyond it samples zeros there, as grid_sample does.
        x = torch.clamp(x, min=self.lower, max=self.upper_x)
        y = torch.clamp(y, min=self.lower, max=self.upper_y)
        x0, y0 = x.floor(), y.floor()
        fx, fy = x.sub_(x0), y.sub_(y0)  # weights of the upper corners along x and y
        # corner weights times the attention weight, laid out (B, Q, heads, corner, L, P)
        weights = self.table.new_empty(batch, queries, heads, 4, levels, points)
        upper_y = fy.mul_(attention_weights)
        lower_y = attention_weights - upper_y
        torch.mul(upper_y, fx, out=weights[:, :, :, 3])
        torch.sub(upper_y, weights[:, :, :, 3], out=weights[:, :, :, 2])
        torch.mul(lower_y, fx, out=weights[:, :, :, 1])
        torch.sub(lower_y, weights[:, :, :, 1], out=weights[:, :, :, 0])

        rows = torch.addcmul(self.base, y0.to(self.index_float), self.row_stride)
        rows = rows.add_(x0.to(self.index_float), alpha=heads).to(self.index_int)  # (B, Q, heads, L, P)
        index = torch.empty(batch, queries, heads, 4, levels, points, dtype=self.index_int, device=value.device)
        torch.add(rows[:, :, :, None], self.corners, out=index)  # (B, Q, heads, corner, L, P)
        out = F.embedding_bag(
            index.view(batch * queries * heads, -1),
            self.table.view(-1, dim),
            per_sample_weights=weights.view(batch * queries * heads, -1),
            mode="sum",
        )
        return out.view(batch, queries, heads * dim)

    def _padded_table(self, value: torch.Tensor) -> torch.Tensor:
        """The value table with its zero borders as a new tensor (autograd-friendly: no writes into a reused one)."""
        batch, _, heads, dim = value.shape
        levels, source = [], 0
        for height, width in self.spatial_shapes:
            level = value[:, source : source + height * width].view(batch, height, width, heads * dim)
            levels.append(F.pad(level, (0, 0, 1, 2, 1, 2)).view(batch, -1, heads, dim))
            source += height * width
        return torch.cat(levels, 1)

    def _differentiable(
        self, value: torch.Tensor, x: torch.Tensor, y: torch.Tensor, attention_weights: torch.Tensor
    ) -> torch.Tensor:
        """The same sum with gradients: the gather runs as :class:`WeightedGather` (backward: a scatter-add into the
        values, one dot product per sample for the weights); the corner weights are differentiable in the positions
        and attention weights by autograd (``grid_sample``'s gradient), the corner rows are not (piecewise
        constant)."""
        batch, _, heads, dim = value.shape
        queries = x.shape[1]
        table = self._padded_table(value.to(self.table.dtype))
        x = torch.clamp(x, min=self.lower, max=self.upper_x)
        y = torch.clamp(y, min=self.lower, max=self.upper_y)
        x0, y0 = x.detach().floor(), y.detach().floor()
        fx, fy = x - x0, y - y0
        upper_y = fy * attention_weights
        lower_y = attention_weights - upper_y
        upper_right, lower_right = upper_y * fx, lower_y * fx
        # (B, Q, heads, corner, L, P), corners (x0, y0), (x1, y0), (x0, y1), (x1, y1)
        weights = torch.stack((lower_y - lower_right, lower_right, upper_y - upper_right, upper_right), 3)
        rows = torch.addcmul(self.base, y0.to(self.index_float), self.row_stride)
        rows = rows.add_(x0.to(self.index_float), alpha=heads).to(self.index_int)
        index = rows[:, :, :, None] + self.corners  # (B, Q, heads, corner, L, P)
        out = WeightedGather.apply(
            table.reshape(-1, dim),
            index.view(batch * queries * heads, -1),
            weights.reshape(batch * queries * heads, -1).to(table.dtype),
        )
        return out.view(batch, queries, heads * dim)


class WeightedGather(torch.autograd.Function):
    """``out[n] = sum_k weights[n, k] * table[index[n, k]]`` (``F.embedding_bag`` in ``"sum"`` mode) with a faster
    CPU backward than ``embedding_bag``'s own: the table's gradient is the same kind of weighted gather over the
    samples sorted by table row, and the weights' gradient is gathered and dotted in chunks that stay in cache.

    Args (of ``apply``): ``table`` ``(R, D)``, ``index`` ``(N, K)`` integer rows of ``table``, ``weights``
    ``(N, K)``; returns ``(N, D)``.
    """

    CHUNK = 4096  # samples per chunk of the weights' gradient (4096 x K x D floats of scratch)

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, index, weights)
        return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        table, index, weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        samples, per_sample = index.shape
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            flat = index.reshape(-1)
            rows, order = torch.sort(flat)
            counts = torch.bincount(rows, minlength=table.shape[0])
            offsets = torch.cumsum(counts, 0) - counts
            sources = torch.div(order, per_sample, rounding_mode="floor")
            # index_select: about 5x faster than advanced indexing for 3.2 M samples on a CPU
            grad_table = F.embedding_bag(
                sources, grad_output, offsets, per_sample_weights=weights.reshape(-1).index_select(0, order),
                mode="sum",
            )
        if ctx.needs_input_grad[2]:
            chunk = min(WeightedGather.CHUNK, samples)
            grad_weights = weights.new_empty(samples, 1, per_sample)
            scratch = table.new_empty(chunk * per_sample, table.shape[1])
            for start in range(0, samples, chunk):
                stop = min(samples, start + chunk)
                n = stop - start
                gathered = torch.index_select(table, 0, index[start:stop].reshape(-1), out=scratch[: n * per_sample])
                torch.bmm(grad_output[start:stop, None], gathered.view(n, per_sample, -1).transpose(1, 2),
                          out=grad_weights[start:stop])
            grad_weights = grad_weights.view(samples, per_sample)
        return grad_table, None, grad_weights


def deformable_sample(
    value: torch.Tensor,
    spatial_shapes: tuple[tuple[int, int], ...],
    pixel_xy: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """:class:`DeformableSampler` for one call, with positions ``pixel_xy`` ``(B, Q, heads, L, P, 2)`` as (x, y)."""
    batch, _, heads, dim = value.shape
    points = pixel_xy.shape[4]
    sampler = DeformableSampler(spatial_shapes, batch, heads, points, dim, value.device, value.dtype)
    return sampler(value, pixel_xy[..., 0], pixel_xy[..., 1], attention_weights)



def grid_sample_positions(
    locations: torch.Tensor, spatial_shapes: tuple[tuple[int, int], ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates ``x, y`` ``(..., L, P)`` of normalised sampling locations ``(..., L, P, 2)``, computed
    with the operations, in the order, of transformers' ``multi_scale_deformable_attention`` (``2 * loc - 1``) and
    torch's CPU ``grid_sample`` (``(grid + 1) * size / 2 - 0.5``, ``align_corners=False``): the same floats, so a
    position lies on the same side of a pixel boundary as there and the gradients' kinks coincide."""
    grid = 2 * locations - 1
    half = torch.tensor([[w / 2, h / 2] for h, w in spatial_shapes], dtype=locations.dtype, device=locations.device)
    pixels = (grid + 1) * half[:, None, :] - 0.5
    return pixels[..., 0], pixels[..., 1]
