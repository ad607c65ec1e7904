"""Bilinear resampling of low-resolution maps (mask logits, class scores) to an output size, dense or lazily.

The model predicts maps at ``1/stride`` of the padded input. Post-processing needs them at the output size (the
original image, or the unpadded input), after cropping the padding. We do that in a single bilinear step
(``align_corners=False`` pixel-centre convention, like ``torch.nn.functional.interpolate``) from the low-resolution
grid, with the crop folded into the sampling positions (the valid region need not be a whole number of low-res
pixels). Without cropping the result equals ``F.interpolate(..., mode="bilinear", align_corners=False)``.

Each output pixel is a convex combination of the four corners of one low-resolution *cell*. ``ResampleGrid`` exposes
the cells so that inference can bound every cell from its corners and evaluate output pixels exactly only where the
bounds leave the answer open (segment boundaries), instead of materialising ``K x H x W`` tensors. Both paths use the
same floating-point operations in the same order, so their values are bit-identical.

Torch only (shipped to the Hub as remote code).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["AxisSampling", "ResampleGrid", "axis_sampling", "widen"]

# Relative widening of cell bounds: guards the "whole cell decided" shortcuts against rounding in the interpolation.
BOUND_TOLERANCE = 1e-5


class AxisSampling(NamedTuple):
    """Bilinear sampling along one axis: ``out[i] = src[idx0[i]] * w0[i] + src[idx1[i]] * w1[i]``.

    ``clamped[i]``: output pixel ``i`` lies before the first source sample centre (its position was clamped).
    """

    idx0: torch.Tensor
    idx1: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    clamped: torch.Tensor


def axis_sampling(
    out_len: int, src_len: int, valid_len: float, stride: float, device: torch.device | str | None = None
) -> AxisSampling:
    """Sampling positions of ``out_len`` output pixels covering input pixels ``[0, valid_len)``.

    The source has ``src_len`` samples, one per ``stride`` input pixels (pixel centres at ``(j + 0.5) * stride``).
    Positions outside the source are clamped to the border, as ``F.interpolate`` does.
    """
    if out_len <= 0 or src_len <= 0:
        raise ValueError(f"sizes must be positive, got out_len={out_len}, src_len={src_len}")
    scale = float(valid_len) / (float(stride) * out_len)
    pos = (torch.arange(out_len, dtype=torch.float64) + 0.5) * scale - 0.5
    clamped = pos < 0
    pos = pos.clamp_min(0.0)
    idx0 = pos.floor().long().clamp_max(src_len - 1)
    idx1 = (idx0 + 1).clamp_max(src_len - 1)
    w1 = (pos - idx0.double()).clamp(0.0, 1.0).float()
    w0 = 1.0 - w1
    return AxisSampling(idx0.to(device), idx1.to(device), w0.to(device), w1.to(device), clamped.to(device))


def _cells(axis: AxisSampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cell of each output pixel, pixel count, first pixel and lower source index of each cell along one axis."""
    key = axis.idx0 * 2 + (~axis.clamped).long()  # non-decreasing along the axis
    _, cell, count = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    start = torch.cumsum(count, 0) - count
    return cell, count, start, axis.idx0[start]


def _slice_plan(index: torch.Tensor) -> tuple[int, int, bool] | None:
    """``(start, length, leading_duplicate)`` when ``index`` is ``[start]? + range(start, start + length)``."""
    values = index.tolist()
    duplicate = len(values) > 1 and values[0] == values[1]
    run = values[1:] if duplicate else values
    if run and run == list(range(run[0], run[0] + len(run))):
        return run[0], len(run), duplicate
    return None


def _select(values: torch.Tensor, dim: int, index: torch.Tensor, plan: tuple[int, int, bool] | None) -> torch.Tensor:
    """``values.index_select(dim, index)``, by slicing when ``index`` is (nearly) a contiguous range."""
    if plan is None:
        return values.index_select(dim, index)
    start, length, duplicate = plan
    out = values.narrow(dim, start, length)
    return torch.cat([values.narrow(dim, start, 1), out], dim) if duplicate else out


def widen(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen bounds slightly so that rounding in the interpolation cannot leave them."""
    return lo - BOUND_TOLERANCE * (lo.abs() + 1.0), hi + BOUND_TOLERANCE * (hi.abs() + 1.0)


class ResampleGrid:
    """Resampling of ``(K, h, w)`` maps to ``(H, W)`` output pixels, with access to the low-resolution cells.

    Args:
        src_size: ``(h, w)`` of the low-resolution maps.
        out_size: ``(H, W)`` output size.
        valid_size: ``(height, width)`` of the valid (unpadded) input region in input pixels; ``None`` = whole input.
            Positions beyond the maps (e.g. inputs not divisible by ``stride``) are clamped to their border.
        stride: input pixels per low-resolution pixel (4 for mask logits at 1/4 resolution).
        device: device of the index tensors (that of the maps).
    """

    def __init__(
        self,
        src_size: tuple[int, int],
        out_size: tuple[int, int],
        valid_size: tuple[float, float] | None = None,
        stride: float = 4,
        device: torch.device | str | None = None,
    ) -> None:
        h, w = int(src_size[0]), int(src_size[1])
        out_h, out_w = int(out_size[0]), int(out_size[1])
        if valid_size is None:
            valid_size = (h * stride, w * stride)
        valid_h, valid_w = float(valid_size[0]), float(valid_size[1])
        if not (valid_h > 0 and valid_w > 0):
            raise ValueError(f"valid size must be positive, got {valid_size}")
        self.src_size = (h, w)
        self.out_size = (out_h, out_w)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ay = axis_sampling(out_h, h, valid_h, stride, self.device)
        self.ax = axis_sampling(out_w, w, valid_w, stride, self.device)
        # Cells: runs of output pixels interpolating between the same two source samples along each axis. Pixels
        # before the first source centre (clamped to it) get their own cell, so cells hold at most ~stride pixels.
        self.row_cell, row_count, self.row_start, self.cy0 = _cells(self.ay)
        self.col_cell, col_count, self.col_start, self.cx0 = _cells(self.ax)
        self.cy1 = (self.cy0 + 1).clamp_max(h - 1)
        self.cx1 = (self.cx0 + 1).clamp_max(w - 1)
        self.row_count, self.col_count = row_count, col_count
        self.rmax = int(row_count.max())
        self.cmax = int(col_count.max())
        self._row_plan = _slice_plan(self.cy0)
        self._col_plan = _slice_plan(self.cx0)

    @property
    def num_cells(self) -> tuple[int, int]:
        return int(self.cy0.numel()), int(self.cx0.numel())

    def cell_sum(self, mask: torch.Tensor) -> torch.Tensor:
        """Number of output pixels in the cells where ``mask`` ``(K, nA, nB)`` is true, per ``k`` (int64)."""
        per_row = mask.float() @ self.col_count.float()  # exact: at most W per entry
        return (per_row.double() @ self.row_count.double()).round().long()

    def corners(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four corner values ``(..., nA, nB)`` of every cell of ``(..., h, w)`` maps (00, 10, 01, 11)."""
        top = values.index_select(-2, self.cy0)
        bottom = values.index_select(-2, self.cy1)
        return (
            _select(top, -1, self.cx0, self._col_plan),
            _select(bottom, -1, self.cx0, self._col_plan),
            top.index_select(-1, self.cx1),
            bottom.index_select(-1, self.cx1),
        )

    def cell_all(self, mask: torch.Tensor) -> torch.Tensor:
        """``(K, nA, nB)``: ``mask`` ``(K, h, w)`` (bool) holds at all four corners of each cell."""
        rows = torch.empty_like(mask)
        rows[:, :-1] = mask[:, :-1] & mask[:, 1:]
        rows[:, -1] = mask[:, -1]
        both = torch.empty_like(mask)
        both[:, :, :-1] = rows[:, :, :-1] & rows[:, :, 1:]
        both[:, :, -1] = rows[:, :, -1]
        # Cell (a, b) of the source grid has corners (a, a+1) x (b, b+1), clamped at the border like cy1 / cx1.
        return _select(_select(both, 1, self.cy0, self._row_plan), 2, self.cx0, self._col_plan)

    def corners_at(self, values: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four corner values ``(K, N)`` of cells ``(ca, cb)`` for ``(K, h, w)`` maps."""
        w = values.shape[-1]
        flat = values.reshape(values.shape[0], -1)
        y0, y1, x0, x1 = self.cy0[ca] * w, self.cy1[ca] * w, self.cx0[cb], self.cx1[cb]
        return tuple(flat.index_select(1, y + x) for y, x in ((y0, x0), (y1, x0), (y0, x1), (y1, x1)))

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """Resample ``(K, h, w)`` to ``(K, H, W)``."""
        return self.dense_rows(self.dense_cols(values), 0, self.out_size[0])

    def dense_cols(self, values: torch.Tensor) -> torch.Tensor:
        """First (column) pass of :meth:`dense`: ``(K, h, w)`` -> ``(K, h, W)``."""
        ax = self.ax
        flat = values.reshape(-1, values.shape[-1])
        out = flat.index_select(1, ax.idx0) * ax.w0 + flat.index_select(1, ax.idx1) * ax.w1
        return out.view(*values.shape[:-1], -1)

    def dense_rows(self, cols: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Second (row) pass of :meth:`dense` for output rows ``start:stop``: ``(K, h, W)`` -> ``(K, rows, W)``."""
        ay = self.ay
        y0, y1 = ay.idx0[start:stop], ay.idx1[start:stop]
        w0, w1 = ay.w0[start:stop, None], ay.w1[start:stop, None]
        return cols.index_select(-2, y0) * w0 + cols.index_select(-2, y1) * w1

    def row_chunks(self, num_maps: int, max_elements: int | None = None) -> list[tuple[int, int]]:
        """Output row ranges whose ``num_maps x rows x W`` blocks hold about ``max_elements`` values (cache-sized
        on CPU, large on accelerators)."""
        if max_elements is None:
            max_elements = 2**20 if self.device.type == "cpu" else 2**27
        rows = max(1, max_elements // max(1, num_maps * self.out_size[1]))
        height = self.out_size[0]
        return [(start, min(start + rows, height)) for start in range(0, height, rows)]

    def cell_bounds_at(
        self, values: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Widened ``(lo, hi)`` bounds ``(K, N)`` of the resampled values over cells ``(ca, cb)``."""
        c00, c10, c01, c11 = self.corners_at(values, ca, cb)
        lo = torch.minimum(torch.minimum(c00, c10), torch.minimum(c01, c11))
        hi = torch.maximum(torch.maximum(c00, c10), torch.maximum(c01, c11))
        return widen(lo, hi)

    def pixel_blocks(
        self, ca: torch.Tensor, cb: torch.Tensor, with_valid: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Output rows ``(N, rmax)``, columns ``(N, cmax)`` and validity ``(N, rmax, cmax)`` of cells ``(ca, cb)``.

        Blocks are padded to the largest cell; padded entries are clamped to valid indices and marked invalid.
        """
        r_off = torch.arange(self.rmax, device=self.device)
        c_off = torch.arange(self.cmax, device=self.device)
        rows = (self.row_start[ca][:, None] + r_off[None, :]).clamp_max(self.out_size[0] - 1)
        cols = (self.col_start[cb][:, None] + c_off[None, :]).clamp_max(self.out_size[1] - 1)
        if not with_valid:
            return rows, cols, None
        r_valid = r_off[None, :] < self.row_count[ca][:, None]
        c_valid = c_off[None, :] < self.col_count[cb][:, None]
        return rows, cols, r_valid[:, :, None] & c_valid[:, None, :]

    def eval_pairs(self, values: torch.Tensor, k: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
        """Resampled ``values[k]`` at every output pixel of cell ``(ca, cb)``, per pair: ``(P, rmax, cmax)``.

        Bit-identical to the corresponding entries of :meth:`dense`.
        """
        y0, y1 = self.cy0[ca], self.cy1[ca]
        x0, x1 = self.cx0[cb], self.cx1[cb]
        rows, cols, _ = self.pixel_blocks(ca, cb, with_valid=False)
        wy0, wy1 = self.ay.w0[rows], self.ay.w1[rows]
        wx0, wx1 = self.ax.w0[cols], self.ax.w1[cols]
        h, w = values.shape[-2:]
        flat = values.reshape(-1)
        base, y0, y1 = k * (h * w), y0 * w, y1 * w
        c00, c10 = flat.index_select(0, base + y0 + x0)[:, None], flat.index_select(0, base + y1 + x0)[:, None]
        c01, c11 = flat.index_select(0, base + y0 + x1)[:, None], flat.index_select(0, base + y1 + x1)[:, None]
        top = c00 * wx0 + c01 * wx1  # (P, cmax): column pass on the upper source row, as in dense_cols
        bottom = c10 * wx0 + c11 * wx1
        return top[:, None, :] * wy0[:, :, None] + bottom[:, None, :] * wy1[:, :, None]

    def expand(self, cell_values: torch.Tensor) -> torch.Tensor:
        """Paint ``(nA, nB)`` per-cell values onto the ``(H, W)`` output grid."""
        return cell_values.index_select(0, self.row_cell).index_select(1, self.col_cell)

    def scatter_blocks(
        self, out: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, block_values: torch.Tensor
    ) -> torch.Tensor:
        """Write ``(N, rmax, cmax)`` per-pixel values of cells ``(ca, cb)`` into ``out`` ``(H, W)`` in place."""
        if ca.numel() == 0:
            return out
        rows, cols, valid = self.pixel_blocks(ca, cb)
        flat = rows[:, :, None] * self.out_size[1] + cols[:, None, :]
        out.view(-1)[flat[valid]] = block_values[valid].to(out.dtype)
        return out
