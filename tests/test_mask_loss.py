"""`FactoredMaskLoss` on mask logits kept as factors against transformers' `Mask2FormerLoss` on the full logits: the
same matching, losses and gradients (same seed, so the same random points)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerConfig,
    Mask2FormerHungarianMatcher,
    Mask2FormerLoss,
    pair_wise_sigmoid_cross_entropy_loss,
    sample_point,
)

from modeling_dearli.mask_loss import (
    FactoredHungarianMatcher,
    FactoredMaskLogits,
    FactoredMaskLoss,
    pair_wise_sigmoid_cross_entropy,
    pixel_rows_of,
)

WEIGHTS = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def _problem(seed: int, batch: int = 2, queries: int = 12, channels: int = 8, size=(20, 28), layers: int = 3,
             targets=(3, 5), classes: int = 6):
    generator = torch.Generator().manual_seed(seed)
    embeddings = [torch.randn(batch, queries, channels, generator=generator) for _ in range(layers)]
    pixels = torch.randn(batch, channels, *size, generator=generator)
    class_logits = [torch.randn(batch, queries, classes + 1, generator=generator) for _ in range(layers)]
    # targets at 4x the logits' size, as the model's (the loss samples both in normalised coordinates)
    mask_labels = [(torch.rand(n, size[0] * 4, size[1] * 4, generator=generator) > 0.6).float() for n in targets]
    class_labels = [torch.randint(0, classes, (n,), generator=generator) for n in targets]
    return embeddings, pixels, class_logits, mask_labels, class_labels


def _losses_and_gradients(criterion, factored: bool, problem, seed: int = 0):
    embeddings, pixels, class_logits, mask_labels, class_labels = problem
    embeddings = [e.clone().requires_grad_() for e in embeddings]
    pixels = pixels.clone().requires_grad_()
    if factored:
        rows = pixel_rows_of(pixels)
        masks = [FactoredMaskLogits(e, pixels, rows) for e in embeddings]
    else:
        masks = [torch.einsum("bqc,bchw->bqhw", e, pixels) for e in embeddings]
    auxiliary = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(masks[:-1], class_logits[:-1])]
    torch.manual_seed(seed)
    losses = criterion(masks[-1], class_logits[-1], mask_labels, class_labels, auxiliary)
    sum(w * losses[k] for k in losses for t, w in WEIGHTS.items() if k.startswith(t)).backward()
    return losses, [pixels.grad, *(e.grad for e in embeddings)]


@pytest.mark.parametrize("targets", [(3, 5), (0, 4), (12, 1)])
def test_factored_loss_equals_transformers_loss_on_full_logits(targets):
    config = Mask2FormerConfig(num_labels=6, train_num_points=300)
    problem = _problem(seed=1, targets=targets)
    theirs, their_grads = _losses_and_gradients(Mask2FormerLoss(config, WEIGHTS), False, problem)
    ours, our_grads = _losses_and_gradients(FactoredMaskLoss(config, WEIGHTS), True, problem)
    assert ours.keys() == theirs.keys() and len(ours) == 9
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    for ours_grad, their_grad in zip(our_grads, their_grads):
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-4, atol=1e-6)
    # full logits take transformers' path through the same criterion
    dense, dense_grads = _losses_and_gradients(FactoredMaskLoss(config, WEIGHTS), False, problem)
    for name in theirs:
        torch.testing.assert_close(dense[name], theirs[name], rtol=1e-6, atol=0.0, msg=name)


def test_factored_matcher_matches_as_transformers_matcher():
    embeddings, pixels, class_logits, mask_labels, class_labels = _problem(seed=2, queries=20, targets=(6, 9))
    # well separated costs, so that rounding cannot change an assignment
    masks = FactoredMaskLogits(embeddings[0] * 4, pixels)
    torch.manual_seed(3)
    theirs = Mask2FormerHungarianMatcher(num_points=500)(masks.dense(), class_logits[0], mask_labels, class_labels)
    torch.manual_seed(3)
    ours = FactoredHungarianMatcher(num_points=500)(masks, class_logits[0], mask_labels, class_labels)
    for (a, b), (c, d) in zip(ours, theirs):
        assert a.tolist() == c.tolist() and b.tolist() == d.tolist()


def test_sample_image_equals_grid_sample_of_full_logits_including_borders():
    embeddings, pixels, *_ = _problem(seed=4, size=(9, 13))
    masks = FactoredMaskLogits(embeddings[0], pixels)
    generator = torch.Generator().manual_seed(5)
    points = torch.cat([torch.rand(200, 2, generator=generator),
                        torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.999, 0.001], [0.5, 0.5]])])
    dense = masks.dense()
    for image in range(2):
        expected = sample_point(dense[image][:, None], points[None].expand(dense.shape[1], -1, -1),
                                align_corners=False).squeeze(1)
        torch.testing.assert_close(masks.sample_image(image, points), expected, rtol=1e-5, atol=1e-5)


def test_select_forms_only_the_selected_masks_in_order():
    embeddings, pixels, *_ = _problem(seed=6)
    masks = FactoredMaskLogits(embeddings[0], pixels)
    batch, query = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([7, 2, 0, 11, 5])
    torch.testing.assert_close(masks.select(batch, query), masks.dense()[batch, query], rtol=1e-5, atol=1e-5)
    assert masks.select(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)).shape == (0, 20, 28)


def test_pair_wise_cross_entropy_equals_transformers():
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(30, 400, generator=generator) * 5
    labels = (torch.rand(4, 400, generator=generator) > 0.5).float()
    torch.testing.assert_close(pair_wise_sigmoid_cross_entropy(logits, labels),
                               pair_wise_sigmoid_cross_entropy_loss(logits, labels), rtol=1e-5, atol=1e-5)


def test_remote_code_needs_no_scipy_to_load():
    """transformers refuses remote code whose imports are missing: the loss imports scipy only when it matches."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports

    import modeling_dearli

    folder = Path(modeling_dearli.__file__).parent
    imports = {name for path in folder.glob("*.py") for name in get_imports(path)}
    assert "scipy" not in imports and "transformers" in imports
