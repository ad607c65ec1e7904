"""Teacher outputs -> hard panoptic pseudo-labels -> Mask2Former targets, on a hand-built teacher output."""

from __future__ import annotations

import math

import torch

from training.pseudo_labels import panoptic_pseudo_labels, segments_to_targets

BIG = 12.0  # mask logit magnitude: sigmoid(12) ~ 1


def _known_output(clip: bool = True):
    """4 queries on an 8x8 mask grid (32x32 input), 3 classes (0 thing; 1, 2 stuff), queries:

    q0: left half, class 0 (thing); q1: top-right quadrant, class 1; q2: bottom-right quadrant, decoder unsure
    between classes 1 and 2, CLIP confident in class 2; q3: no-object.
    """
    masks = torch.full((1, 4, 8, 8), -BIG)
    masks[0, 0, :, :4] = BIG
    masks[0, 1, :4, 4:] = BIG
    masks[0, 2, 4:, 4:] = BIG
    masks[0, 3] = BIG  # covers everything but is "no object"
    logits = torch.tensor([[[8.0, 0.0, 0.0, 0.0], [0.0, 6.0, 0.0, 0.0], [0.0, 2.0, 1.8, 0.0], [0.0, 0.0, 0.0, 9.0]]])
    clip_logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 6.0], [0.0, 0.0, 0.0]]])
    return {"class_queries_logits": logits, "masks_queries_logits": masks,
            "clip_class_logits": clip_logits if clip else None}


def _eq6(logits: torch.Tensor, clip_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Independent Eq. 6 in float64 with plain exponentials."""
    z = logits.double().exp()
    p_void = z[-1] / z.sum()
    p_m2f = z[:-1] / z[:-1].sum()
    p_clip = clip_logits.double().exp() / clip_logits.double().exp().sum()
    geo = p_m2f**alpha * p_clip ** (1 - alpha)
    geo = geo / geo.sum()
    return torch.cat([geo * (1 - p_void), p_void[None]])


def test_known_teacher_output_gives_expected_segments():
    out = _known_output()
    pseudo = panoptic_pseudo_labels(out, stuff_ids=[1, 2], ensemble_alpha=0.6)
    seg = pseudo.segmentation[0]
    assert seg.shape == (32, 32)
    # Segments in query order: q0 -> 1 (class 0), q1 -> 2 (class 1), q2 -> 3 (class 2 thanks to CLIP).
    assert pseudo.labels[0].tolist() == [0, 1, 2]
    # Away from the (bilinearly blurred) borders between the masks.
    assert (seg[:, :14] == 1).all() and (seg[:14, 18:] == 2).all() and (seg[18:, 18:] == 3).all()
    assert set(seg.unique().tolist()) <= {-1, 1, 2, 3}
    expected_scores = [float(_eq6(out["class_queries_logits"][0, q], out["clip_class_logits"][0, q], 0.6).max())
                       for q in range(3)]
    torch.testing.assert_close(pseudo.scores[0].double(), torch.tensor(expected_scores, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)

    # Without ensembling the decoder's (wrong) class 1 wins for q2 and both class-1 stuff segments are fused.
    plain = panoptic_pseudo_labels(out, stuff_ids=[1, 2], ensemble_alpha=1.0)
    assert plain.labels[0].tolist() == [0, 1]
    assert (plain.segmentation[0][:, 18:] == 2).all()


def test_targets_and_statistics():
    pseudo = panoptic_pseudo_labels(_known_output(), stuff_ids=[1, 2], ensemble_alpha=0.6)
    mask_labels, class_labels = pseudo.to_targets()
    assert mask_labels[0].shape == (3, 32, 32) and mask_labels[0].dtype == torch.float32
    assert class_labels[0].tolist() == [0, 1, 2]
    assert (mask_labels[0].sum(0) <= 1).all()  # panoptic: no overlaps
    assert (mask_labels[0].sum(0) == 1).float().mean() > 0.95
    assert torch.equal(mask_labels[0][2].bool(), pseudo.segmentation[0] == 3)
    stats = pseudo.statistics()
    assert stats["segments_per_image"] == 3
    assert math.isclose(stats["mean_confidence"], float(pseudo.scores[0].mean()), rel_tol=1e-6)
    void = float((pseudo.segmentation[0] == -1).float().mean())
    assert math.isclose(stats["void_fraction"], void) and void < 0.05


def test_padding_is_void_and_overlap_rule_drops_occluded_queries():
    out = _known_output()
    masks = out["masks_queries_logits"]
    masks[0, 1:3, :, 4] = -BIG  # q1 and q2 leave mask column 4 free
    # A 5th query (class 0, lower score than q0) whose mask spans columns 3-4: it wins column 4 only, i.e. about half
    # of its own mask, below the 0.8 overlap threshold.
    q4 = torch.full((1, 1, 8, 8), -BIG)
    q4[0, 0, :, 3:5] = BIG
    out["masks_queries_logits"] = torch.cat([masks, q4], dim=1)
    out["class_queries_logits"] = torch.cat([out["class_queries_logits"], torch.tensor([[[2.0, 0, 0, 0]]])], 1)
    out["clip_class_logits"] = torch.cat([out["clip_class_logits"], torch.tensor([[[2.0, 0, 0]]])], 1)
    pseudo = panoptic_pseudo_labels(out, stuff_ids=[1, 2], ensemble_alpha=0.6,
                                    unpadded_sizes=torch.tensor([[24, 32]]))
    seg = pseudo.segmentation[0]
    assert (seg[24:] == -1).all() and not pseudo.valid[0, 24:].any() and pseudo.valid[0, :24].all()
    assert pseudo.labels[0].tolist() == [0, 1, 2]
    assert (seg[:24, 17:19] == -1).all()  # q4's column: its query was rejected, nobody else covers it
    assert (seg[:24, :14] == 1).all() and (seg[:14, 22:] == 2).all()
    # A lower overlap threshold keeps q4 as a fourth (thing) segment.
    lenient = panoptic_pseudo_labels(out, stuff_ids=[1, 2], ensemble_alpha=0.6, overlap_threshold=0.3,
                                     unpadded_sizes=torch.tensor([[24, 32]]))
    assert lenient.labels[0].tolist() == [0, 1, 2, 0]
    assert (lenient.segmentation[0][:24, 17:19] == 4).all()


def test_segments_to_targets_drops_empty_segments():
    seg = torch.tensor([[[1, 1], [3, -1]]])
    masks, classes = segments_to_targets(seg, [torch.tensor([4, 5, 6])])
    assert classes[0].tolist() == [4, 6]
    assert masks[0].tolist() == [[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]]


def test_tiny_teacher_outputs_to_targets(tiny_model):
    pixel_values = torch.randn(2, 3, 64, 64)
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixel_mask[1, 48:] = 0
    with torch.no_grad():
        out = tiny_model(pixel_values, pixel_mask=pixel_mask)
    config = tiny_model.config
    pseudo = panoptic_pseudo_labels(out, stuff_ids=config.stuff_ids, ensemble_alpha=config.ensemble_alpha,
                                    image_size=(64, 64))
    assert pseudo.segmentation.shape == (2, 64, 64)
    assert (pseudo.segmentation[1, 48:] == -1).all()
    masks, classes = pseudo.to_targets()
    for m, c, lab in zip(masks, classes, pseudo.labels):
        assert m.shape[1:] == (64, 64) and m.shape[0] == c.numel() <= lab.numel()
        assert (c >= 0).all() and (c < tiny_model.config.num_classes).all()
        assert (m.sum(0) <= 1).all()  # panoptic: no overlaps
