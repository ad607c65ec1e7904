"""Mask2Former's loss on mask logits kept as their two factors: transformers' loss, same numbers, less work.

A query's mask logits are the channel sum of its mask embedding with the pixel decoder's per-pixel embeddings
(``einsum("bqc,bchw->bqhw")``). transformers' `Mask2FormerLoss` receives them as a full tensor for every decoder layer
(10 x 200 queries at 1/4 of the input: at 640² each layer's is 200 x 160 x 160) and then reads them only at points:

- the Hungarian matcher samples every query's mask at the same random points of its image; bilinear sampling and the
  channel sum are both linear, so sampling the pixel embeddings there and taking the channel sum gives the same
  logits (to rounding) without forming the masks;
- the mask loss samples only the *matched* queries' masks (one per target), at points chosen by uncertainty on those
  masks: only the matched queries' masks are formed (``FactoredMaskLogits.select``), and their gradient reaches
  the embeddings through one small product per image instead of the backward of the full product for all queries.

`FactoredMaskLoss` is `Mask2FormerLoss` (same configuration, same weights, same terms and random point draws in the
same order) that accepts `FactoredMaskLogits` wherever transformers' takes a mask-logit tensor; a tensor still takes
transformers' path. The costs and losses agree to float32 rounding, which can only change which points the
uncertainty sampling picks, or the matching, where two candidates are within rounding of each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerHungarianMatcher,
    Mask2FormerLoss,
    dice_loss,
    pair_wise_dice_loss,
    sample_point,
    sigmoid_cross_entropy_loss,
)

__all__ = ["FactoredMaskLogits", "FactoredMaskLoss", "bilinear_corners", "matched_masks", "pixel_rows_of"]


@dataclass
class FactoredMaskLogits:
    """Mask logits ``einsum("bqc,bchw->bqhw", embeddings, pixels)`` kept as their factors.

    Args:
        embeddings: ``(batch, queries, channels)`` mask embeddings of one decoder layer.
        pixels: ``(batch, channels, height, width)`` per-pixel embeddings of the pixel decoder.
        pixel_rows: the same pixel embeddings detached, as contiguous rows ``(batch, height * width, channels)``
            (the matcher's layout; ``pixel_rows_of(pixels)``); computed on use when not given. The decoder's layers
            share one.
    """

    embeddings: torch.Tensor
    pixels: torch.Tensor
    pixel_rows: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        """The shape ``(batch, queries, height, width)`` of the logits."""
        batch, queries, _ = self.embeddings.shape
        return torch.Size((batch, queries, *self.pixels.shape[-2:]))

    def dense(self) -> torch.Tensor:
        """The full logits ``(batch, queries, height, width)``."""
        return torch.einsum("bqc,bchw->bqhw", self.embeddings, self.pixels)

    def select(self, batch_indices: torch.Tensor, query_indices: torch.Tensor) -> torch.Tensor:
        """``dense()[batch_indices, query_indices]`` ``(n, height, width)``, forming only those masks: one batched
        product of each image's selected embeddings (padded to the most selected) with its pixel embeddings (indexing
        the pixel embeddings per image instead would cost a full-size zero gradient per image in the backward)."""
        batch, _, channels = self.embeddings.shape
        height, width = self.pixels.shape[-2:]
        batch_indices = batch_indices.to(self.embeddings.device)
        query_indices = query_indices.to(self.embeddings.device)
        counts = torch.bincount(batch_indices, minlength=batch)
        if batch_indices.numel() == 0:
            return self.embeddings.new_zeros((0, height, width))
        # position of each selected mask among its image's
        order = torch.argsort(batch_indices, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        positions = torch.empty_like(batch_indices)
        ranks = torch.arange(batch_indices.numel(), device=batch_indices.device)
        positions[order] = ranks - starts[batch_indices[order]]
        slots = torch.zeros(batch, int(counts.max()), dtype=torch.long, device=batch_indices.device)
        slots[batch_indices, positions] = query_indices
        selected = self.embeddings.gather(1, slots[..., None].expand(-1, -1, channels))
        masks = torch.bmm(selected, self.pixels.flatten(2))  # (batch, most selected, height * width)
        return masks[batch_indices, positions].view(-1, height, width)

    def sample_image(self, image: int, point_coordinates: torch.Tensor) -> torch.Tensor:
        """Every query's logits of one image at the points ``(num_points, 2)`` in ``[0, 1]²`` (``x, y``), as
        transformers' ``sample_point`` (bilinear, ``align_corners=False``, zero outside): ``(queries, num_points)``.
        The pixel embeddings are sampled first, by one weighted gather of their rows (``grid_sample`` on 256
        channels costs several times more here)."""
        height, width = self.pixels.shape[-2:]
        if self.pixel_rows is None:
            self.pixel_rows = pixel_rows_of(self.pixels)
        rows = self.pixel_rows[image]
        index, weights = bilinear_corners(point_coordinates, height, width)
        sampled = torch.nn.functional.embedding_bag(index, rows, per_sample_weights=weights.to(rows.dtype),
                                                    mode="sum")
        return self.embeddings[image] @ sampled.t()


def pixel_rows_of(pixels: torch.Tensor) -> torch.Tensor:
    """``(batch, channels, height, width)`` -> detached contiguous rows ``(batch, height * width, channels)``."""
    return pixels.detach().permute(0, 2, 3, 1).flatten(1, 2).contiguous()


def bilinear_corners(point_coordinates: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pixel indices and weights ``(num_points, 4)`` of bilinear sampling at ``(num_points, 2)`` points ``x, y``
    in ``[0, 1]²``, as ``grid_sample(..., align_corners=False)`` with zero padding (corners outside get weight 0)."""
    x = point_coordinates[:, 0] * width - 0.5
    y = point_coordinates[:, 1] * height - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=1)
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=1)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=1)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    index = (ys.clamp(0, height - 1) * width + xs.clamp(0, width - 1)).long()
    return index, torch.where(inside, weights, torch.zeros_like(weights))


def pair_wise_sigmoid_cross_entropy(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' ``pair_wise_sigmoid_cross_entropy_loss`` ``(queries, points) x (targets, points) -> (queries,
    targets)`` with one ``logsigmoid`` instead of two: ``BCE(x, 0) = BCE(x, 1) + x``, so the mean over points of
    ``BCE(x, 1) * y + BCE(x, 0) * (1 - y)`` is ``mean(BCE(x, 1)) + x @ (1 - y) / points``."""
    points = inputs.shape[1]
    positive = -torch.nn.functional.logsigmoid(inputs)
    return positive.mean(1, keepdim=True) + (inputs / points) @ (1 - labels).T


def _linear_sum_assignment(cost: torch.Tensor):
    """scipy's Hungarian algorithm, imported when a loss is computed (inference, remote code included, needs no
    scipy)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as error:
        raise ImportError("the training loss's Hungarian matcher needs scipy: pip install scipy") from error
    return linear_sum_assignment(cost)


class FactoredHungarianMatcher(Mask2FormerHungarianMatcher):
    """transformers' `Mask2FormerHungarianMatcher` that also takes `FactoredMaskLogits` (see the module docstring)."""

    @torch.no_grad()
    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        if not isinstance(masks_queries_logits, FactoredMaskLogits):
            return super().forward(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
        indices = []
        for i in range(masks_queries_logits.shape[0]):
            pred_probs = class_queries_logits[i].softmax(-1)
            cost_class = -pred_probs[:, class_labels[i]]
            target_mask = mask_labels[i].to(masks_queries_logits.pixels.dtype)[:, None]
            # the same draw as transformers' matcher
            point_coordinates = torch.rand(1, self.num_points, 2, device=target_mask.device)
            target_coordinates = point_coordinates.expand(target_mask.shape[0], -1, -1)
            target_mask = sample_point(target_mask, target_coordinates, align_corners=False).squeeze(1)
            pred_mask = masks_queries_logits.sample_image(i, point_coordinates[0])
            cost_mask = pair_wise_sigmoid_cross_entropy(pred_mask, target_mask)
            cost_dice = pair_wise_dice_loss(pred_mask, target_mask)
            cost_matrix = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            max_value = torch.finfo(cost_matrix.dtype).max
            cost_matrix = torch.nan_to_num(cost_matrix, nan=max_value, posinf=max_value, neginf=max_value)
            indices.append(_linear_sum_assignment(cost_matrix.cpu()))
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


class FactoredMaskLoss(Mask2FormerLoss):
    """transformers' `Mask2FormerLoss` that also takes `FactoredMaskLogits` for ``masks_queries_logits`` (final and
    auxiliary); see the module docstring."""

    def __init__(self, config, weight_dict: dict[str, float]) -> None:
        super().__init__(config=config, weight_dict=weight_dict)
        self.matcher = FactoredHungarianMatcher(
            cost_class=config.class_weight, cost_dice=config.dice_weight, cost_mask=config.mask_weight,
            num_points=self.num_points,
        )

    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                auxiliary_predictions=None) -> dict[str, torch.Tensor]:
        """transformers' forward: the final layer's terms, then each auxiliary layer's, with the same random draws in
        the same order. The targets are padded once, and the matched queries' masks of all layers are formed
        together (`matched_masks`)."""
        num_masks = self.get_num_masks(class_labels, device=class_labels[0].device)
        target_masks, _ = self._pad_images_to_max_in_batch(mask_labels)
        layers = [("", masks_queries_logits, class_queries_logits)] + [
            (f"_{i}", aux["masks_queries_logits"], aux["class_queries_logits"])
            for i, aux in enumerate(auxiliary_predictions or ())
        ]
        # Matching, then the loss's random points, layer by layer: transformers' order of draws.
        matched = []
        for _, masks, classes in layers:
            indices = self.matcher(masks, classes, mask_labels, class_labels)
            matched.append((indices, *self._draw_points(sum(len(i) for i, _ in indices), target_masks.device)))
        predictions = matched_masks([masks for _, masks, _ in layers],
                                    [self._get_predictions_permutation_indices(indices) for indices, *_ in matched])
        losses: dict[str, torch.Tensor] = {}
        for (suffix, _, classes), (indices, candidates, extra), pred_masks in zip(layers, matched, predictions):
            targets = target_masks[self._get_targets_permutation_indices(indices)]
            terms = {**self._point_terms(pred_masks, targets, candidates, extra, num_masks),
                     **self.loss_labels(classes, class_labels, indices)}
            losses.update({name + suffix: value for name, value in terms.items()})
        return losses

    def loss_masks(self, masks_queries_logits, mask_labels, indices, num_masks):
        target_masks, _ = self._pad_images_to_max_in_batch(mask_labels)
        candidates, extra = self._draw_points(sum(len(i) for i, _ in indices), target_masks.device)
        (pred_masks,) = matched_masks([masks_queries_logits], [self._get_predictions_permutation_indices(indices)])
        targets = target_masks[self._get_targets_permutation_indices(indices)]
        return self._point_terms(pred_masks, targets, candidates, extra, num_masks)

    def _draw_points(self, num_masks: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The random draws of transformers' ``sample_points_using_uncertainty`` for ``num_masks`` masks, in its
        order: the oversampled candidates ``(n, oversample_ratio * num_points, 2)``, then the uniformly random points
        ``(n, num_points - importance points, 2)`` (``None`` if there are none)."""
        candidates = torch.rand(num_masks, int(self.num_points * self.oversample_ratio), 2, device=device)
        num_random = self.num_points - int(self.importance_sample_ratio * self.num_points)
        extra = torch.rand(num_masks, num_random, 2, device=device) if num_random > 0 else None
        return candidates, extra

    def _point_terms(self, pred_masks, target_masks, candidates, extra, num_masks) -> dict[str, torch.Tensor]:
        """transformers' ``loss_masks`` on the matched ``(n, height, width)`` prediction and target masks with the
        drawn points: the most uncertain candidates (``|logit|`` smallest) plus the random points."""
        pred_masks, target_masks = pred_masks[:, None], target_masks[:, None]
        with torch.no_grad():
            uncertainty = self.calculate_uncertainty(sample_point(pred_masks, candidates, align_corners=False))
            top = torch.topk(uncertainty[:, 0, :], k=int(self.importance_sample_ratio * self.num_points), dim=1)[1]
            points = candidates.gather(1, top[..., None].expand(-1, -1, 2))
            if extra is not None:
                points = torch.cat([points, extra], dim=1)
            point_labels = sample_point(target_masks, points, align_corners=False).squeeze(1)
        point_logits = sample_point(pred_masks, points, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }


def matched_masks(
    layers: list[torch.Tensor | FactoredMaskLogits], selections: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """Per layer, its mask logits at ``(batch_indices, query_indices)``: ``(n, height, width)``. Factored layers that
    share their pixel embeddings are formed by one batched product, so that their gradient to the pixel embeddings
    is one product too (ten products of 4 masks each cost several times one of 40)."""
    masks: list[torch.Tensor | None] = [None] * len(layers)
    factored = [i for i, layer in enumerate(layers) if isinstance(layer, FactoredMaskLogits)]
    for i, (layer, (batch_indices, query_indices)) in enumerate(zip(layers, selections)):
        if i not in factored:
            masks[i] = layer[batch_indices, query_indices]
    if not factored:
        return masks
    pixels = layers[factored[0]].pixels
    if any(layers[i].pixels is not pixels for i in factored):
        for i in factored:
            masks[i] = layers[i].select(*selections[i])
        return masks
    num_queries = layers[factored[0]].embeddings.shape[1]
    together = FactoredMaskLogits(torch.cat([layers[i].embeddings for i in factored], dim=1), pixels)
    batch_indices = torch.cat([selections[i][0] for i in factored])
    query_indices = torch.cat([selections[i][1] + k * num_queries for k, i in enumerate(factored)])
    for i, layer_masks in zip(factored, together.select(batch_indices, query_indices).split(
            [len(selections[i][0]) for i in factored])):
        masks[i] = layer_masks
    return masks
