"""Mask2Former panoptic / semantic / instance inference on (ensembled) class posteriors, batched and device-agnostic.

Inputs are class posteriors ``(B, Q, C + 1)`` (e.g. from :func:`ensembling.ensemble_class_probabilities`) and mask
logits ``(B, Q, h, w)`` at ``1/mask_stride`` of the padded input. Outputs are at ``output_sizes`` (default: the
unpadded input size), after cropping the padding given by ``unpadded_sizes`` (detectron2's ``sem_seg_postprocess``
convention, done here in one bilinear step, see :mod:`mask_resampling`).

Conventions (detectron2 Mask2Former / DEARLi reference, chosen deliberately over transformers' variant):

* panoptic: queries whose top class is not "no object" and whose score exceeds ``threshold`` compete per pixel by
  ``score * sigmoid(mask logit)``; a query's segment is its argmax region *intersected with* ``mask >= mask_threshold``
  (transformers keeps the whole argmax region); it is kept when that segment is non-empty and the argmax region covers
  at least ``overlap_threshold`` of the query's own binary mask. Stuff classes are fused into one segment per class.
  Segment ids are ``1..n`` in query order; void pixels are ``-1``. Masks are resampled at output resolution, not at a
  fixed 384x384 as transformers does.
* semantic: ``argmax_c sum_q p(c|q) sigmoid(m_q)``, evaluated on the mask grid and resampled bilinearly (as
  transformers does, but from the native mask resolution).
* instance: the top 100 (query, class) pairs per image by class probability, no score threshold (detectron2's
  ``test_topk_per_image``); score = class probability x mean mask probability inside the binary mask (computed at
  mask resolution); stuff classes are dropped when given. Instances are ordered by score and, in the id map, a pixel
  shows the best-scoring instance covering it. Optional filters, off by default: a minimal area and a per-class
  mask-IoU suppression of lower-scoring duplicates.

Speed: the ``"sparse"`` method bounds each low-resolution cell from its corners and evaluates output pixels exactly only
where the bounds leave the answer open, so cost grows with the mask grid instead of ``queries x output pixels``. The
``"dense"`` method materialises everything; both give identical results (tested).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from .mask_resampling import ResampleGrid

__all__ = [
    "PanopticSegments",
    "InstanceSegments",
    "panoptic_inference",
    "semantic_inference",
    "instance_inference",
    "MASK_STRIDE",
    "INSTANCE_TOP_K",
]

MASK_STRIDE = 4
# Mask2Former's test_topk_per_image: detectron2's TEST.DETECTIONS_PER_IMAGE, 100 by default.
INSTANCE_TOP_K = 100
# Fall back to (blocked) dense evaluation when the exact per-pixel work at cell level would exceed this fraction of
# the dense work: per value it costs several times more (gathers, scatter reductions). Measured break-even on CPU:
# ~0.15 for panoptic / instance, ~0.25 for semantic (no sigmoid / weights).
_SPARSE_MAX_FRACTION = {"panoptic": 0.1, "semantic": 0.2, "instance": 0.1}
# Margin on probabilities / scores in [0, 1] for decisions taken from cell corners: covers rounding in the
# interpolation and the sigmoid (relative errors ~1e-7).
_PROB_MARGIN = 1e-5
# Relative margin for decisions on linear combinations (semantic class scores).
_REL_MARGIN = 1e-5


class PanopticSegments(NamedTuple):
    """Panoptic prediction for one image.

    ``segmentation`` ``(H, W)`` int64 holds segment ids ``1..n`` and ``-1`` for void; the other fields describe the
    ``n`` segments in id order: ``ids``, contiguous class ``labels``, ``scores`` (max class score of the fused
    queries) and ``was_fused`` (label is a stuff class, i.e. in ``label_ids_to_fuse``).
    """

    segmentation: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    was_fused: torch.Tensor

    def to_mask_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary ``mask_labels`` ``(n, H, W)`` float and ``class_labels`` ``(n,)`` (Mask2Former training targets)."""
        masks = self.segmentation[None] == self.ids[:, None, None]
        return masks.float(), self.labels.clone()


class InstanceSegments(NamedTuple):
    """Instance prediction for one image, instances sorted by decreasing score.

    ``segmentation`` ``(H, W)`` int64: index (``0..n-1``) of the best-scoring instance covering each pixel, ``-1``
    where none does. ``binary_masks`` ``(n, H, W)`` bool (overlaps kept) when requested, else ``None``.
    """

    segmentation: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    query_index: torch.Tensor
    binary_masks: torch.Tensor | None


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers


def _check_inputs(class_probs: torch.Tensor, mask_logits: torch.Tensor) -> None:
    if class_probs.dim() != 3:
        raise ValueError(f"class_probs must be (B, Q, C + 1), got shape {tuple(class_probs.shape)}")
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits must be (B, Q, h, w), got shape {tuple(mask_logits.shape)}")
    if class_probs.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"batch/query dimensions differ: class_probs {tuple(class_probs.shape)}, mask_logits "
            f"{tuple(mask_logits.shape)}"
        )


def _sizes(
    batch: int,
    mask_hw: tuple[int, int],
    output_sizes: Sequence | torch.Tensor | None,
    unpadded_sizes: torch.Tensor | Sequence | None,
    mask_stride: float,
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per image ``(valid_size, output_size)`` in input pixels / output pixels."""
    full = (int(round(mask_hw[0] * mask_stride)), int(round(mask_hw[1] * mask_stride)))
    if unpadded_sizes is None:
        valid = [full] * batch
    else:
        valid = [(int(s[0]), int(s[1])) for s in (unpadded_sizes.tolist() if torch.is_tensor(unpadded_sizes)
                                                  else unpadded_sizes)]
    if output_sizes is None:
        out = valid
    else:
        out = [(int(s[0]), int(s[1])) for s in (output_sizes.tolist() if torch.is_tensor(output_sizes)
                                                else output_sizes)]
    if len(valid) != batch or len(out) != batch:
        raise ValueError(f"expected {batch} unpadded/target sizes, got {len(valid)} and {len(out)}")
    for o in out:
        if o[0] <= 0 or o[1] <= 0:
            raise ValueError(f"output sizes must be positive, got {o}")
    return list(zip(valid, out))


def _stuff_ids(stuff_ids: Any, stuff_classes: Any, where: str) -> Any:
    """`stuff_ids`, or the value given under the keyword's earlier name ``stuff_classes`` (with a FutureWarning)."""
    if stuff_classes is None:
        return stuff_ids
    if stuff_ids is not None:
        raise TypeError(f"{where}: got both stuff_classes= and stuff_ids=; give stuff_ids= only")
    warnings.warn(f"{where}: stuff_classes= is now called stuff_ids=", FutureWarning, stacklevel=3)
    return stuff_classes


def _stuff_mask(stuff_ids: Iterable[int] | torch.Tensor | None, num_classes: int, device) -> torch.Tensor:
    mask = torch.zeros(num_classes + 1, dtype=torch.bool, device=device)
    if stuff_ids is not None:
        ids = torch.as_tensor(list(stuff_ids) if not torch.is_tensor(stuff_ids) else stuff_ids,
                              dtype=torch.long).to(device)
        ids = ids[(ids >= 0) & (ids < num_classes)]
        mask[ids] = True
    return mask


class _Ambiguous(NamedTuple):
    """Exact per-pixel argmax in cells whose winner is not decided by bounds."""

    ca: torch.Tensor  # (N,) cells
    cb: torch.Tensor
    winner: torch.Tensor  # (N, rmax, cmax) long winner per pixel (padding pixels: K)
    pair_cell: torch.Tensor  # (P,) local cell index of each evaluated (k, cell) pair
    pair_k: torch.Tensor  # (P,)
    pair_values: torch.Tensor  # (P, rmax, cmax) activated resampled values (before weighting)


class _Candidates(NamedTuple):
    """(cell, map) pairs that may win some pixel of an undecided cell, with the map's activated upper bound."""

    cell: torch.Tensor  # (P,) local cell index
    k: torch.Tensor  # (P,)
    upper: torch.Tensor  # (P,) activated upper bound of the map in the cell (before weights)


def _weighted(x: torch.Tensor, weights: torch.Tensor | None, k: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return x
    w = weights if k is None else weights[k]
    return w.view(-1, *([1] * (x.dim() - 1))) * x


def _candidate_pairs(
    grid: ResampleGrid,
    values: torch.Tensor,
    ca: torch.Tensor,
    cb: torch.Tensor,
    sigmoid: bool,
    weights,
    corner_winners: torch.Tensor | None = None,
) -> _Candidates:
    """Maps whose upper bound in the cell reaches a lower bound of the per-pixel maximum there (the others lose every
    pixel).

    The lower bound is the best single map's minimum and, with ``corner_winners`` ``(N, 4)`` (the best map at each
    corner), ``min_i w[q_i] * act(min over corners of mean_i x[q_i])``: at every pixel the maximum over the ``q_i``
    is at least their mean, which is bilinear, hence bounded by its corners. This keeps boundary cells, where every
    single map is low somewhere, from admitting every map as a candidate.
    """
    lo, hi = grid.cell_bounds_at(values, ca, cb)
    if sigmoid:
        lo, hi = lo.sigmoid(), hi.sigmoid()
    max_lower = _weighted(lo, weights, None).amax(0)
    if corner_winners is not None and ca.numel():
        h, w = values.shape[-2:]
        flat = values.reshape(-1)
        y0, y1, x0, x1 = grid.cy0[ca] * w, grid.cy1[ca] * w, grid.cx0[cb], grid.cx1[cb]
        corners = torch.stack([y0 + x0, y1 + x0, y0 + x1, y1 + x1], 1)  # (N, 4) positions
        gathered = flat[corner_winners[:, :, None] * (h * w) + corners[:, None, :]]  # (N, winner i, corner c)
        envelope = gathered.mean(1).amin(1)
        envelope = envelope - 1e-5 * (envelope.abs() + 1.0)  # as widen(): rounding in the interpolation
        if sigmoid:
            envelope = envelope.sigmoid()
        if weights is not None:
            envelope = weights[corner_winners].amin(1) * envelope
        max_lower = torch.maximum(max_lower, envelope)
    candidates = _weighted(hi, weights, None) >= max_lower[None]
    cell, k = candidates.t().nonzero(as_tuple=True)
    return _Candidates(cell, k, hi[k, cell])


def _exact_winners(
    grid: ResampleGrid,
    values: torch.Tensor,
    ca: torch.Tensor,
    cb: torch.Tensor,
    pair_cell: torch.Tensor,
    pair_k: torch.Tensor,
    sigmoid: bool,
    weights: torch.Tensor | None,
) -> _Ambiguous:
    """Per-pixel winners of cells ``(ca, cb)`` among the given (local cell, map) pairs; ties go to the lowest map."""
    num_k = values.shape[0]
    device = values.device
    pair_values = grid.eval_pairs(values, pair_k, ca[pair_cell], cb[pair_cell])
    if sigmoid:
        pair_values = pair_values.sigmoid()
    scored = _weighted(pair_values, weights, pair_k)
    index = pair_cell[:, None, None].expand_as(scored)
    block = (ca.numel(), grid.rmax, grid.cmax)
    if scored.dtype == torch.float32 and (scored.numel() == 0 or float(scored.min()) >= 0.0):
        # One scatter on packed keys: the bits of a non-negative float32 order like the float, and the low word
        # (num_k - 1 - k) makes the lowest k win ties.
        key = (scored.view(torch.int32).long() << 32) | (num_k - 1 - pair_k)[:, None, None]
        best_key = torch.full(block, -1, device=device, dtype=torch.long).scatter_reduce(0, index, key, "amax")
        winner = torch.where(best_key >= 0, num_k - 1 - (best_key & 0xFFFFFFFF), num_k)
    else:
        best = torch.full(block, float("-inf"), device=device, dtype=scored.dtype)
        best = best.scatter_reduce(0, index, scored, "amax")
        k_if_best = torch.where(scored == best.index_select(0, pair_cell), pair_k[:, None, None], num_k)
        winner = torch.full(block, num_k, device=device, dtype=torch.long)
        winner = winner.scatter_reduce(0, index, k_if_best, "amin")
    return _Ambiguous(ca, cb, winner, pair_cell, pair_k, pair_values)


def _exact_winners_of_cells(
    grid: ResampleGrid,
    logits: torch.Tensor,
    scores: torch.Tensor,
    undecided_ca: torch.Tensor,
    undecided_cb: torch.Tensor,
    cand: _Candidates,
    cell_selected: torch.Tensor,
    pair_selected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, _Ambiguous]:
    """Exact panoptic winners of the undecided cells flagged in `cell_selected`, among the candidate pairs flagged in
    `pair_selected` (whose cells must be selected): returns the cells' coordinates and their winners."""
    cells = cell_selected.nonzero(as_tuple=True)[0]
    local = torch.full((undecided_ca.numel(),), -1, dtype=torch.long, device=logits.device)
    local[cells] = torch.arange(cells.numel(), device=logits.device)
    ca, cb = undecided_ca[cells], undecided_cb[cells]
    winners = _exact_winners(grid, logits, ca, cb, local[cand.cell[pair_selected]], cand.k[pair_selected], True, scores)
    return ca, cb, winners


def _resolve_ambiguous(
    grid: ResampleGrid,
    values: torch.Tensor,
    ca: torch.Tensor,
    cb: torch.Tensor,
    budget: float,
    sigmoid: bool = False,
    weights: torch.Tensor | None = None,
    corner_winners: torch.Tensor | None = None,
) -> _Ambiguous | None:
    """Per-pixel ``argmax_k weights[k] * act(resampled values[k])`` in cells ``(ca, cb)``, ``act`` = sigmoid or
    identity, ``weights`` positive (or none), evaluating candidates only. ``None`` when more than ``budget`` pixel
    values would have to be evaluated.
    """
    if values.shape[0] > 1 and 2 * ca.numel() * grid.rmax * grid.cmax > budget:
        return None  # an undecided cell has at least two candidates: too much work whatever the bounds say
    candidates = _candidate_pairs(grid, values, ca, cb, sigmoid, weights, corner_winners)
    if candidates.k.numel() * grid.rmax * grid.cmax > budget:
        return None
    return _exact_winners(grid, values, ca, cb, candidates.cell, candidates.k, sigmoid, weights)


def _min4(corners):
    return torch.minimum(torch.minimum(corners[0], corners[1]), torch.minimum(corners[2], corners[3]))


def _max4(corners):
    return torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))


def _top2(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index of the maximum over dim 0 (first one on ties), the maximum, and the best value among the others."""
    best, first = values.max(0)
    if values.shape[0] == 1:
        return first, best, torch.full_like(best, float("-inf"))
    second = values.scatter(0, first[None], float("-inf")).amax(0)
    return first, best, second


def _threshold_cells(grid: ResampleGrid, probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (map, cell): all pixels ``>= threshold`` (``inside``), or undecided by the corners (``partial``)."""
    inside = grid.cell_all(probs >= threshold + _PROB_MARGIN)
    outside = grid.cell_all(probs < threshold - _PROB_MARGIN)
    return inside, ~(inside | outside)


def _count_above(
    grid: ResampleGrid, logits: torch.Tensor, threshold: float, inside: torch.Tensor, partial: torch.Tensor
) -> torch.Tensor:
    """Per-map number of output pixels with ``sigmoid(resampled logit) >= threshold``, ``(K,)`` int64."""
    total = grid.cell_sum(inside)
    k, ca, cb = partial.nonzero(as_tuple=True)
    if k.numel():
        _, _, valid = grid.pixel_blocks(ca, cb)
        above = (grid.eval_pairs(logits, k, ca, cb).sigmoid() >= threshold) & valid
        total = total.index_add(0, k, above.sum((1, 2)))
    return total


def _dense_budget(grid: ResampleGrid, num_maps: int, task: str) -> float:
    return _SPARSE_MAX_FRACTION[task] * num_maps * grid.out_size[0] * grid.out_size[1]


# --------------------------------------------------------------------------------------------------------------------
# Panoptic


def _panoptic_pixels_dense(grid, logits, scores, mask_threshold):
    """Winner map, winner-passes map, and per-query areas by dense evaluation (in cache-sized row blocks)."""
    num_k = logits.shape[0]
    device = logits.device
    cols = grid.dense_cols(logits)
    winner = torch.empty(grid.out_size, dtype=torch.long, device=device)
    passes = torch.empty(grid.out_size, dtype=torch.bool, device=device)
    original = torch.zeros(num_k, dtype=torch.long, device=device)
    for start, stop in grid.row_chunks(num_k):
        probs = grid.dense_rows(cols, start, stop).sigmoid()
        win = (scores[:, None, None] * probs).max(0).indices  # first maximum, as argmax
        winner[start:stop] = win
        passes[start:stop] = probs.gather(0, win[None])[0] >= mask_threshold
        original += (probs >= mask_threshold).sum((1, 2))
    area = torch.bincount(winner.flatten(), minlength=num_k)
    final = torch.bincount(winner[passes], minlength=num_k)

    def paint(lut: torch.Tensor) -> torch.Tensor:
        return torch.where(passes, lut[winner], -1)

    return area, original, final, paint


def _panoptic_pixels_sparse(grid, logits, scores, mask_threshold, overlap_threshold):
    """As :func:`_panoptic_pixels_dense`, deciding whole cells from their corners. ``None``: use dense.

    Undecided cells where no candidate can reach ``mask_threshold`` are void whoever wins; their winners only matter
    for the argmax areas, which are bounded instead and resolved exactly only for queries whose keep / drop
    decision the bounds leave open. The returned ``area`` then equals the exact area wherever the decision depends
    on it (and leads to the same decision elsewhere).
    """
    num_k = logits.shape[0]
    device = logits.device
    probs = logits.sigmoid()
    weighted = scores[:, None, None] * probs
    first, second = _top2(weighted)[::2]
    # A cell is decided when one query is best at all four corners and its worst value in the cell beats the best
    # value any other query reaches there (bilinear values lie between the corners; sigmoid is monotone).
    q = grid.corners(first)
    winner = q[0]
    same = (winner == q[1]) & (winner == q[2]) & (winner == q[3])
    winner_probs = grid.corners(probs.gather(0, first[None])[0])
    p_min, p_max = _min4(winner_probs), _max4(winner_probs)
    rival = _max4(grid.corners(second))
    certain = same & (scores[winner] * (p_min - _PROB_MARGIN) > rival + _PROB_MARGIN)

    undecided_ca, undecided_cb = (~certain).nonzero(as_tuple=True)
    budget = _dense_budget(grid, num_k, "panoptic")
    block_size = grid.rmax * grid.cmax
    corner_winners = torch.stack([c[undecided_ca, undecided_cb] for c in q], 1)
    cand = _candidate_pairs(grid, logits, undecided_ca, undecided_cb, True, scores, corner_winners)
    live_cell = torch.zeros(undecided_ca.numel(), dtype=torch.bool, device=device)
    live_cell[cand.cell[cand.upper >= mask_threshold - _PROB_MARGIN]] = True
    pair_live = live_cell[cand.cell]
    if int(pair_live.sum()) * block_size > budget:
        return None
    amb_ca, amb_cb, amb = _exact_winners_of_cells(grid, logits, scores, undecided_ca, undecided_cb, cand, live_cell,
                                                  pair_live)
    # Void cells: each candidate may win any of their pixels.
    void_cell, void_k = cand.cell[~pair_live], cand.k[~pair_live]
    void_count = grid.row_count[undecided_ca[void_cell]] * grid.col_count[undecided_cb[void_cell]]

    c_ca, c_cb = certain.nonzero(as_tuple=True)
    c_win = winner[c_ca, c_cb]
    c_inside = p_min[c_ca, c_cb] >= mask_threshold + _PROB_MARGIN
    c_partial = ~c_inside & (p_max[c_ca, c_cb] >= mask_threshold - _PROB_MARGIN)
    c_count = grid.row_count[c_ca] * grid.col_count[c_cb]
    _, _, amb_valid = grid.pixel_blocks(amb_ca, amb_cb)

    area = torch.zeros(num_k, dtype=torch.long, device=device).index_add(0, c_win, c_count)
    area += torch.bincount(amb.winner[amb_valid], minlength=num_k)

    # Does the winner pass the mask threshold? Decided cells: only partially covered ones need pixels.
    p_ca, p_cb, p_win = c_ca[c_partial], c_cb[c_partial], c_win[c_partial]
    _, _, p_valid = grid.pixel_blocks(p_ca, p_cb)
    p_pass = grid.eval_pairs(logits, p_win, p_ca, p_cb).sigmoid() >= mask_threshold
    is_winner_pair = amb.pair_k[:, None, None] == amb.winner.index_select(0, amb.pair_cell)
    pair_pass = is_winner_pair & (amb.pair_values >= mask_threshold)
    amb_pass = torch.zeros(amb.winner.shape, dtype=torch.uint8, device=device)
    amb_pass = amb_pass.scatter_reduce(
        0, amb.pair_cell[:, None, None].expand_as(pair_pass), pair_pass.to(torch.uint8), "amax"
    ).bool()

    final = torch.zeros(num_k, dtype=torch.long, device=device)
    final = final.index_add(0, c_win[c_inside], c_count[c_inside])
    final = final.index_add(0, p_win, (p_pass & p_valid).sum((1, 2)))
    final += torch.bincount(amb.winner[amb_valid & amb_pass], minlength=num_k)

    area_low = area
    area_high = area_low.index_add(0, void_k, void_count)

    # Binary-mask areas, only for queries that may win somewhere (the others are dropped anyway).
    original = torch.zeros(num_k, dtype=torch.long, device=device)
    active = (area_high > 0).nonzero(as_tuple=True)[0]
    if active.numel():
        inside, partial = _threshold_cells(grid, probs[active], mask_threshold)
        original[active] = _count_above(grid, logits[active], mask_threshold, inside, partial)

    def keeps(a: torch.Tensor) -> torch.Tensor:
        return (a > 0) & (a.double() >= overlap_threshold * original.double())

    keep_low, keep_high = keeps(area_low), keeps(area_high)
    open_question = keep_high & ~keep_low & (original > 0) & (final > 0)
    area = torch.where(keep_low, area_low, area_high)
    if bool(open_question.any()):
        # Exact winners in the void cells where an open query is a candidate, then its exact area.
        needed = torch.zeros(undecided_ca.numel(), dtype=torch.bool, device=device)
        needed[void_cell[open_question[void_k]]] = True
        pair_needed = needed[cand.cell] & ~pair_live
        if (int(pair_live.sum()) + int(pair_needed.sum())) * block_size > budget:
            return None
        void_ca, void_cb, resolved = _exact_winners_of_cells(grid, logits, scores, undecided_ca, undecided_cb, cand,
                                                             needed, pair_needed)
        _, _, void_valid = grid.pixel_blocks(void_ca, void_cb)
        exact = area_low + torch.bincount(resolved.winner[void_valid], minlength=num_k)
        area = torch.where(open_question, exact, area)

    def paint(lut: torch.Tensor) -> torch.Tensor:
        cell_values = torch.full(grid.num_cells, -1, dtype=torch.long, device=device)
        cell_values[c_ca[c_inside], c_cb[c_inside]] = lut[c_win[c_inside]]
        seg = grid.expand(cell_values)
        grid.scatter_blocks(seg, p_ca, p_cb, torch.where(p_pass, lut[p_win][:, None, None], -1))
        amb_values = torch.where(amb_pass, lut[amb.winner.clamp_max(num_k - 1)], -1)
        return grid.scatter_blocks(seg, amb_ca, amb_cb, amb_values)

    return area, original, final, paint


def panoptic_inference(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    threshold: float = 0.0,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    stuff_ids: Iterable[int] | torch.Tensor | None = None,
    output_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    unpadded_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
    mask_stride: float = MASK_STRIDE,
    method: str = "sparse",
    stuff_classes: Iterable[int] | torch.Tensor | None = None,
) -> list[PanopticSegments]:
    """Mask2Former panoptic inference (detectron2 convention) for a batch.

    Args:
        class_probs: ``(B, Q, C + 1)`` class posteriors, last = no object (e.g. ensembled, Eq. 6).
        mask_logits: ``(B, Q, h, w)`` mask logits at ``1/mask_stride`` of the padded input.
        threshold: keep queries whose top (non-void) class probability is ``> threshold`` (DEARLi uses 0.0).
        mask_threshold: binarisation threshold of ``sigmoid(mask logits)``.
        overlap_threshold: minimal ratio of a query's argmax area to its binary-mask area.
        stuff_ids: class indices whose segments are fused into one per class (``label_ids_to_fuse``;
            ``config.stuff_ids``). ``stuff_classes=`` is accepted as its earlier name.
        output_sizes: per-image ``(H, W)``; ``None`` = the unpadded input size.
        unpadded_sizes: ``(B, 2)`` valid input region ``(height, width)`` in input pixels; ``None`` = whole input.
        mask_stride: input pixels per mask pixel.
        method: ``"sparse"`` (default, exact and fast) or ``"dense"``.

    Returns:
        One :class:`PanopticSegments` per image, on the device of ``mask_logits``.
    """
    _check_inputs(class_probs, mask_logits)
    _check_method(method)
    batch, _, num_classes_p1 = class_probs.shape
    num_classes = num_classes_p1 - 1
    device = mask_logits.device
    class_probs = class_probs.to(device=device, dtype=torch.float32)
    is_stuff = _stuff_mask(_stuff_ids(stuff_ids, stuff_classes, "panoptic_inference"), num_classes, device)
    sizes = _sizes(batch, mask_logits.shape[-2:], output_sizes, unpadded_sizes, mask_stride)
    all_scores, all_labels = class_probs.max(-1)
    keep = all_labels.ne(num_classes) & (all_scores > threshold)

    results = []
    for b, (valid_size, out_size) in enumerate(sizes):
        query = keep[b].nonzero(as_tuple=True)[0]
        if query.numel() == 0:
            results.append(_empty_panoptic(out_size, device))
            continue
        logits = mask_logits[b].index_select(0, query).float()
        scores, labels = all_scores[b, query], all_labels[b, query]
        grid = ResampleGrid(logits.shape[-2:], out_size, valid_size, mask_stride, device)
        pixels = None
        if method == "sparse":
            pixels = _panoptic_pixels_sparse(grid, logits, scores, mask_threshold, overlap_threshold)
        if pixels is None:
            pixels = _panoptic_pixels_dense(grid, logits, scores, mask_threshold)
        area, original, final, paint = pixels
        ratio_ok = area.double() >= overlap_threshold * original.double()
        valid = (area > 0) & (original > 0) & (final > 0) & ratio_ok
        results.append(_assemble_panoptic(valid, scores, labels, is_stuff, num_classes, paint, out_size, device))
    return results


def _empty_panoptic(out_size, device) -> PanopticSegments:
    empty_long = torch.zeros(0, dtype=torch.long, device=device)
    return PanopticSegments(
        torch.full(out_size, -1, dtype=torch.long, device=device),
        empty_long,
        empty_long.clone(),
        torch.zeros(0, device=device),
        torch.zeros(0, dtype=torch.bool, device=device),
    )


def _assemble_panoptic(valid, scores, labels, is_stuff, num_classes, paint, out_size, device) -> PanopticSegments:
    """Segment ids in query order, stuff fused per class, and the painted id map."""
    kept = valid.nonzero(as_tuple=True)[0]
    n = kept.numel()
    if n == 0:
        return _empty_panoptic(out_size, device)
    lab = labels[kept]
    stuff = is_stuff[lab]
    position = torch.arange(n, device=device)
    key = torch.where(stuff, lab, num_classes + 1 + position)
    _, inverse = torch.unique(key, return_inverse=True)
    num_segments = int(inverse.max()) + 1
    first = torch.full((num_segments,), n, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, inverse, position, "amin")
    by_first = torch.argsort(first)
    rank = torch.empty_like(first)
    rank[by_first] = torch.arange(num_segments, device=device)
    segment_of_kept = rank[inverse]  # 0-based, in order of first appearance
    first_member = first[by_first]
    seg_scores = torch.full((num_segments,), float("-inf"), device=device, dtype=scores.dtype)
    seg_scores = seg_scores.scatter_reduce(0, segment_of_kept, scores[kept], "amax")
    lut = torch.full((valid.numel(),), -1, dtype=torch.long, device=device)
    lut[kept] = segment_of_kept + 1
    return PanopticSegments(
        segmentation=paint(lut),
        ids=torch.arange(1, num_segments + 1, device=device),
        labels=lab[first_member],
        scores=seg_scores,
        was_fused=stuff[first_member],
    )


def _check_method(method: str) -> None:
    if method not in ("sparse", "dense"):
        raise ValueError(f"method must be 'sparse' or 'dense', got {method!r}")


# --------------------------------------------------------------------------------------------------------------------
# Semantic


def semantic_inference(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    output_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    unpadded_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
    mask_stride: float = MASK_STRIDE,
    method: str = "sparse",
) -> list[torch.Tensor]:
    """Semantic segmentation ``argmax_c sum_q p(c|q) sigmoid(m_q)`` for a batch.

    Class scores are computed on the mask grid and resampled bilinearly to the output size (after cropping the
    padding). Returns a list of ``(H, W)`` int64 class-index maps.
    """
    _check_inputs(class_probs, mask_logits)
    _check_method(method)
    batch = class_probs.shape[0]
    device = mask_logits.device
    probs = class_probs.to(device=device, dtype=torch.float32)[..., :-1]
    sizes = _sizes(batch, mask_logits.shape[-2:], output_sizes, unpadded_sizes, mask_stride)
    # (B, C, h, w) class scores on the mask grid.
    scores = torch.einsum("bqc,bqhw->bchw", probs, mask_logits.float().sigmoid())
    maps = []
    for b, (valid_size, out_size) in enumerate(sizes):
        grid = ResampleGrid(scores.shape[-2:], out_size, valid_size, mask_stride, device)
        seg = _semantic_sparse(grid, scores[b]) if method == "sparse" else None
        maps.append(_semantic_dense(grid, scores[b]) if seg is None else seg)
    return maps


def _semantic_dense(grid: ResampleGrid, scores: torch.Tensor) -> torch.Tensor:
    cols = grid.dense_cols(scores)
    seg = torch.empty(grid.out_size, dtype=torch.long, device=scores.device)
    for start, stop in grid.row_chunks(scores.shape[0]):
        seg[start:stop] = grid.dense_rows(cols, start, stop).max(0).indices
    return seg


def _semantic_sparse(grid: ResampleGrid, scores: torch.Tensor) -> torch.Tensor | None:
    """Argmax of the resampled class scores, decided per cell where the four corners agree with a margin.

    If class ``c`` beats every other class by at least ``m`` at all four corners it does so at every bilinear
    combination of them, so only cells without such a winner are evaluated per pixel.
    """
    num_c = scores.shape[0]
    first, best, second = _top2(scores)
    margin = best - second
    c = grid.corners(first)
    winner = c[0]
    same = (winner == c[1]) & (winner == c[2]) & (winner == c[3])
    scale = _max4(grid.corners(best.abs()))
    certain = same & (_min4(grid.corners(margin)) > _REL_MARGIN * scale + 1e-30)
    amb_ca, amb_cb = (~certain).nonzero(as_tuple=True)
    corner_winners = torch.stack([k[amb_ca, amb_cb] for k in c], 1)
    amb = _resolve_ambiguous(
        grid, scores, amb_ca, amb_cb, _dense_budget(grid, num_c, "semantic"), corner_winners=corner_winners
    )
    if amb is None:
        return None
    return grid.scatter_blocks(grid.expand(winner), amb_ca, amb_cb, amb.winner)


# --------------------------------------------------------------------------------------------------------------------
# Instance


def instance_inference(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    *,
    threshold: float = 0.0,
    mask_threshold: float = 0.5,
    top_k: int | None = INSTANCE_TOP_K,
    min_area: int = 0,
    mask_iou_threshold: float | None = None,
    stuff_ids: Iterable[int] | torch.Tensor | None = None,
    output_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    unpadded_sizes: torch.Tensor | Sequence[tuple[int, int]] | None = None,
    mask_stride: float = MASK_STRIDE,
    method: str = "sparse",
    return_binary_masks: bool = False,
    stuff_classes: Iterable[int] | torch.Tensor | None = None,
) -> list[InstanceSegments]:
    """Mask2Former instance inference for a batch (detectron2 convention: top 100 per image, no score threshold).

    The ``top_k`` best (query, class) pairs by class probability are candidates; candidates of ``stuff_ids`` are
    dropped (``stuff_classes=`` is accepted as its earlier name). Score = class probability x mean ``sigmoid(mask)``
    over the binary mask (``>= mask_threshold``) on the mask grid; instances with score ``>= threshold`` and a non-empty
    binary mask at output resolution are returned, sorted by decreasing score.

    Args:
        class_probs: ``(B, Q, C + 1)`` class posteriors, last = no object.
        mask_logits: ``(B, Q, h, w)`` mask logits at ``1/mask_stride`` of the padded input.
        threshold: minimal instance score (default 0.0: every candidate, as detectron2).
        mask_threshold: binarisation threshold of ``sigmoid(mask logits)``.
        top_k: candidates per image (default 100, detectron2's ``test_topk_per_image``); ``None`` = one per query.
        min_area: drop instances whose binary mask at output resolution has fewer pixels (0 = keep all).
        mask_iou_threshold: when given, drop an instance whose binary mask at output resolution has an IoU above
            this with a higher-scoring kept instance of the same class (duplicate suppression); ``None`` = off.
        stuff_ids: classes without instances (their candidates are dropped).
        output_sizes: per-image ``(H, W)``; ``None`` = the unpadded input size.
        unpadded_sizes: ``(B, 2)`` valid input region ``(height, width)``; ``None`` = whole input.
        mask_stride: input pixels per mask pixel.
        method: ``"sparse"`` (default) or ``"dense"``; identical results.
        return_binary_masks: also return the ``(n, H, W)`` binary masks (overlaps kept).
    """
    _check_inputs(class_probs, mask_logits)
    _check_method(method)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be positive or None, got {top_k}")
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    if mask_iou_threshold is not None and not 0.0 <= mask_iou_threshold <= 1.0:
        raise ValueError(f"mask_iou_threshold must be in [0, 1] or None, got {mask_iou_threshold}")
    batch, num_queries, num_classes_p1 = class_probs.shape
    num_classes = num_classes_p1 - 1
    device = mask_logits.device
    probs = class_probs.to(device=device, dtype=torch.float32)[..., :-1]
    is_stuff = _stuff_mask(_stuff_ids(stuff_ids, stuff_classes, "instance_inference"), num_classes, device)
    sizes = _sizes(batch, mask_logits.shape[-2:], output_sizes, unpadded_sizes, mask_stride)
    k = min(top_k if top_k is not None else num_queries, num_queries * num_classes)
    top_scores, top_index = probs.flatten(1).topk(k, dim=1)
    top_query = torch.div(top_index, num_classes, rounding_mode="floor")
    top_label = top_index % num_classes
    h, w = mask_logits.shape[-2:]

    results = []
    for b, (valid_size, out_size) in enumerate(sizes):
        keep = ~is_stuff[top_label[b]]
        query, label, cls_score = top_query[b][keep], top_label[b][keep], top_scores[b][keep]
        logits = mask_logits[b].index_select(0, query).float()
        # Mask quality on the mask grid, inside the valid region.
        vh = min(h, int(-(-valid_size[0] // mask_stride)))
        vw = min(w, int(-(-valid_size[1] // mask_stride)))
        mask_probs = logits[:, :vh, :vw].sigmoid()
        binary = mask_probs >= mask_threshold
        mask_score = (mask_probs * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        score = cls_score * mask_score
        ok = score >= threshold
        order = torch.argsort(score[ok], descending=True, stable=True)
        sel = ok.nonzero(as_tuple=True)[0][order]
        query, label, score, logits = query[sel], label[sel], score[sel], logits[sel]
        if query.numel() == 0:
            results.append(_empty_instances(out_size, device, return_binary_masks))
            continue
        grid = ResampleGrid(logits.shape[-2:], out_size, valid_size, mask_stride, device)
        if min_area > 0 or mask_iou_threshold is not None:
            masks = _binary_masks(grid, logits, mask_threshold)
            kept = _filter_instances(masks, label, min_area, mask_iou_threshold)
            query, label, score, masks = query[kept], label[kept], score[kept], masks[kept]
            if kept.numel() == 0:
                results.append(_empty_instances(out_size, device, return_binary_masks))
                continue
            rank = torch.arange(kept.numel(), device=device)[:, None, None]
            first = torch.where(masks, rank, kept.numel()).amin(0)  # best-scoring instance on top
            seg = torch.where(first < kept.numel(), first, -1)
            results.append(InstanceSegments(seg, label, score, query, masks if return_binary_masks else None))
            continue
        result = None
        if method == "sparse":
            result = _instance_sparse(grid, logits, mask_threshold)
        if result is None:
            result = _instance_dense(grid, logits, mask_threshold)
        nonempty, paint = result
        lut = torch.full((query.numel() + 1,), -1, dtype=torch.long, device=device)
        kept = nonempty.nonzero(as_tuple=True)[0]
        lut[kept] = torch.arange(kept.numel(), device=device)
        seg = paint(lut)
        binary_masks = None
        if return_binary_masks:
            binary_masks = _binary_masks(grid, logits[nonempty], mask_threshold)
        results.append(InstanceSegments(seg, label[nonempty], score[nonempty], query[nonempty], binary_masks))
    return results


def _filter_instances(
    masks: torch.Tensor, labels: torch.Tensor, min_area: int, mask_iou_threshold: float | None
) -> torch.Tensor:
    """Indices (in score order) of the instances with at least ``max(min_area, 1)`` pixels that, when
    ``mask_iou_threshold`` is given, overlap no higher-scoring kept instance of their class with a larger IoU."""
    flat = masks.flatten(1)
    area = flat.sum(1)
    candidates = (area >= max(min_area, 1)).nonzero(as_tuple=True)[0].tolist()
    if mask_iou_threshold is None:
        return torch.tensor(candidates, dtype=torch.long, device=masks.device)
    kept: list[int] = []
    for i in candidates:
        same = [j for j in kept if labels[j] == labels[i]]
        if same:
            inter = (flat[same] & flat[i]).sum(1)
            iou = inter.double() / (area[same] + area[i] - inter).double()
            if bool((iou > mask_iou_threshold).any()):
                continue
        kept.append(i)
    return torch.tensor(kept, dtype=torch.long, device=masks.device)


def _binary_masks(grid: ResampleGrid, logits: torch.Tensor, mask_threshold: float) -> torch.Tensor:
    masks = torch.empty((logits.shape[0], *grid.out_size), dtype=torch.bool, device=logits.device)
    cols = grid.dense_cols(logits)
    for start, stop in grid.row_chunks(max(1, logits.shape[0])):
        masks[:, start:stop] = grid.dense_rows(cols, start, stop).sigmoid() >= mask_threshold
    return masks


def _empty_instances(out_size, device, with_masks: bool) -> InstanceSegments:
    empty_long = torch.zeros(0, dtype=torch.long, device=device)
    masks = torch.zeros((0, *out_size), dtype=torch.bool, device=device) if with_masks else None
    return InstanceSegments(
        torch.full(out_size, -1, dtype=torch.long, device=device),
        empty_long,
        torch.zeros(0, device=device),
        empty_long.clone(),
        masks,
    )


def _instance_dense(grid, logits, mask_threshold):
    num_k = logits.shape[0]
    device = logits.device
    cols = grid.dense_cols(logits)
    rank = torch.arange(num_k, device=device)[:, None, None]
    first = torch.empty(grid.out_size, dtype=torch.long, device=device)
    nonempty = torch.zeros(num_k, dtype=torch.bool, device=device)
    for start, stop in grid.row_chunks(num_k):
        binary = grid.dense_rows(cols, start, stop).sigmoid() >= mask_threshold
        nonempty |= binary.flatten(1).any(1)
        first[start:stop] = torch.where(binary, rank, num_k).amin(0)

    def paint(lut):
        return lut[first]

    return nonempty, paint


def _instance_sparse(grid, logits, mask_threshold):
    num_k = logits.shape[0]
    device = logits.device
    inside, partial = _threshold_cells(grid, logits.sigmoid(), mask_threshold)
    k, ca, cb = partial.nonzero(as_tuple=True)
    if k.numel() * grid.rmax * grid.cmax > _dense_budget(grid, num_k, "instance"):
        return None
    rank = torch.arange(num_k, device=device)[:, None, None]
    first_inside = torch.where(inside, rank, num_k).amin(0)  # (nA, nB)
    _, _, valid = grid.pixel_blocks(ca, cb)
    above = (grid.eval_pairs(logits, k, ca, cb).sigmoid() >= mask_threshold) & valid
    nonempty = inside.flatten(1).any(1)
    nonempty[k[above.flatten(1).any(1)]] = True
    # Pairs that may beat the best fully-covering instance of their cell.
    relevant = k < first_inside[ca, cb]
    k, ca, cb, above = k[relevant], ca[relevant], cb[relevant], above[relevant]
    cells = ca * grid.num_cells[1] + cb
    uniq, local = torch.unique(cells, return_inverse=True)
    u_ca, u_cb = uniq // grid.num_cells[1], uniq % grid.num_cells[1]
    block = torch.empty((uniq.numel(), grid.rmax, grid.cmax), dtype=torch.long, device=device)
    block[:] = first_inside[u_ca, u_cb][:, None, None]
    block = block.scatter_reduce(
        0, local[:, None, None].expand_as(above), torch.where(above, k[:, None, None], num_k), "amin"
    )

    def paint(lut):
        seg = grid.expand(lut[first_inside])
        return grid.scatter_blocks(seg, u_ca, u_cb, lut[block])

    return nonempty, paint
