"""Geometric augmentation keeps images and labels aligned; targets; collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.collator import DearliDataCollator
from training.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    GeometricParams,
    LargeScaleJitter,
    ResizeShortestEdgeJitter,
    apply_to_id_map,
    apply_to_image,
    apply_to_masks,
    fixed_params,
    normalize_image,
    panoptic_to_targets,
    shortest_edge_output_shape,
    shortest_edge_sizes,
    valid_pixel_mask,
)


def _coded_image(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose channels are the pixel's own row and column (linear ramps, which bilinear and antialiased
    resampling reproduce exactly away from the borders) and an id map with one id per pixel (row * width + col + 1)."""
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    id_map = (rows * width + cols).long() + 1
    return torch.stack([rows, cols, torch.zeros(height, width)]), id_map


def test_constants_match_the_contract():
    assert CLIP_MEAN == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert CLIP_STD == pytest.approx((0.26862954, 0.26130258, 0.27577711))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("scheme", ["lsj", "shortest_edge"])
def test_image_and_labels_stay_aligned(seed, scheme):
    image, id_map = _coded_image(96, 144)
    if scheme == "lsj":
        transform = LargeScaleJitter((64, 80), min_scale=0.3, max_scale=2.0, flip_prob=0.5)
    else:
        transform = ResizeShortestEdgeJitter((64, 80), min_scale=0.5, max_scale=2.0, flip_prob=0.5)
    params = transform.sample(96, 144, torch.Generator().manual_seed(seed))
    out_image = apply_to_image(image, params, pad_value=0.0)
    out_ids = apply_to_id_map(id_map, params)
    masks = torch.stack([(id_map % 3) == k for k in range(3)]).to(torch.uint8)
    out_masks = apply_to_masks(masks, params)
    assert out_image.shape == (3, 64, 80) and out_ids.shape == (64, 80) and out_masks.shape == (3, 64, 80)

    h, w = params.valid_size
    assert (out_ids[h:] == 0).all() and (out_ids[:, w:] == 0).all()  # padding is void
    assert (out_image[:, h:] == 0).all() and (out_image[:, :, w:] == 0).all()
    assert torch.equal(valid_pixel_mask(params)[:h, :w], torch.ones(h, w, dtype=torch.long))
    assert valid_pixel_mask(params).sum() == h * w
    # Labels are never mixed: every label pixel is an id of the source map.
    assert set(out_ids[:h, :w].unique().tolist()) <= set(id_map.unique().tolist())
    # Mask stack follows the id map exactly.
    assert torch.equal(out_masks[:, :h, :w].bool(), torch.stack([(out_ids[:h, :w] % 3) == k for k in range(3)]))
    # Each label pixel comes from the source pixel nearest to where the image pixel was sampled: the image (a ramp of
    # source coordinates) and the label's source coordinates differ by at most half a pixel (away from the borders,
    # where the antialiasing filter is clamped).
    src_rows, src_cols = (out_ids[:h, :w] - 1) // 144, (out_ids[:h, :w] - 1) % 144
    margin = int(np.ceil(96 / params.resized_size[0])) + 1
    inside = (src_rows >= margin) & (src_rows < 96 - margin) & (src_cols >= margin) & (src_cols < 144 - margin)
    assert inside.any()
    assert ((out_image[0, :h, :w] - src_rows)[inside].abs() <= 0.5 + 1e-4).all()
    assert ((out_image[1, :h, :w] - src_cols)[inside].abs() <= 0.5 + 1e-4).all()


def test_flip_mirrors_content_and_keeps_padding_bottom_right():
    image, id_map = _coded_image(32, 40)
    base = GeometricParams((32, 40), (32, 40), 0, 0, (48, 48), False)
    flipped = GeometricParams((32, 40), (32, 40), 0, 0, (48, 48), True)
    a, b = apply_to_id_map(id_map, base), apply_to_id_map(id_map, flipped)
    assert torch.equal(a[:32, :40].flip(-1), b[:32, :40])
    assert (b[32:] == 0).all() and (b[:, 40:] == 0).all()
    ia, ib = apply_to_image(image / 255, base), apply_to_image(image / 255, flipped)
    assert torch.allclose(ia[:, :32, :40].flip(-1), ib[:, :32, :40])
    # Image padding is the CLIP mean: zero after normalisation.
    assert torch.allclose(normalize_image(ib)[:, 40:, :], torch.zeros(3, 8, 48), atol=1e-6)


def test_sampling_is_deterministic_and_covers_the_range():
    transform = LargeScaleJitter(64, min_scale=0.1, max_scale=2.0)
    a = [transform.sample(100, 150, torch.Generator().manual_seed(s)) for s in range(50)]
    b = [transform.sample(100, 150, torch.Generator().manual_seed(s)) for s in range(50)]
    assert a == b
    sizes = [p.resized_size[1] for p in a]  # the long side fits scale * 64
    assert min(sizes) < 30 and max(sizes) > 100
    assert 10 < sum(p.flip for p in a) < 40
    for p in a:
        assert 0 <= p.crop_top <= max(p.resized_size[0] - 64, 0)
        assert 0 <= p.crop_left <= max(p.resized_size[1] - 64, 0)


def test_shortest_edge_choices_are_the_released_configs():
    """``[int(x * 0.1 * C) for x in range(5, 21)]`` (mask2former configs: MIN_SIZE_TRAIN, sampling "choice")."""
    assert shortest_edge_sizes(640) == list(range(320, 1281, 64))
    assert shortest_edge_sizes(512) == [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972,
                                        1024]
    assert shortest_edge_sizes(640, 1.0, 1.0) == [640]


@pytest.mark.parametrize(("size", "short_edge", "longest_edge", "expected"), [
    ((600, 800), 320, 2560, (320, 427)),  # shorter side to 320, aspect kept, rounded half up
    ((600, 1500), 1280, 2560, (1024, 2560)),  # 1280 x 3200 exceeds 2560: both scaled by 2560 / 3200
    ((480, 640), 307, 2048, (307, 409)),
    ((800, 600), 320, 2560, (427, 320)),  # portrait
])
def test_shortest_edge_resize_is_detectron2s(size, short_edge, longest_edge, expected):
    assert shortest_edge_output_shape(*size, short_edge, longest_edge) == expected


def test_shortest_edge_jitter_draws_the_list_crops_uniformly_and_pads_only_small_draws():
    transform = ResizeShortestEdgeJitter(640, flip_prob=0.5)
    assert transform.longest_edge == 2560 and len(transform.sizes) == 16
    draws = [transform.sample(600, 800, torch.Generator().manual_seed(s)) for s in range(400)]
    assert draws == [transform.sample(600, 800, torch.Generator().manual_seed(s)) for s in range(400)]
    short_sides = [p.resized_size[0] for p in draws]
    assert set(short_sides) == set(transform.sizes)  # every choice appears, nothing else
    assert max(short_sides.count(v) for v in transform.sizes) < 3 * 400 / 16
    for p in draws:
        h, w = p.resized_size
        assert (h, w) == shortest_edge_output_shape(600, 800, h, 2560)
        assert p.output_size == (640, 640)
        assert 0 <= p.crop_top <= max(h - 640, 0) and 0 <= p.crop_left <= max(w - 640, 0)
        assert p.valid_size == (min(h, 640), min(w, 640))  # padding only where the resized image is smaller
    lefts = [p.crop_left / max(p.resized_size[1] - 640, 1) for p in draws if p.resized_size[1] > 1000]
    assert min(lefts) < 0.1 and max(lefts) > 0.9 and 0.35 < float(np.mean(lefts)) < 0.65  # uniform offsets
    assert 150 < sum(p.flip for p in draws) < 250
    padded = sum(p.valid_size != (640, 640) for p in draws) / len(draws)
    assert 0.2 < padded < 0.45  # 5 of the 16 shorter sides are below the crop


def test_identity_geometry_is_exact():
    image, id_map = _coded_image(24, 40)
    params = fixed_params((24, 40))
    assert torch.equal(apply_to_id_map(id_map, params), id_map)
    assert torch.allclose(apply_to_image(image, params), image)


def test_pil_and_uint8_inputs():
    from PIL import Image

    array = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    params = fixed_params((20, 30))
    expected = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    assert torch.allclose(apply_to_image(Image.fromarray(array), params), expected)
    assert torch.allclose(apply_to_image(array, params), expected)


def test_panoptic_to_targets_ignores_void_crowd_and_missing():
    id_map = torch.tensor([[0, 5, 5], [7, 7, 9], [11, 11, 11]])
    masks, classes = panoptic_to_targets(id_map, {5: 2, 7: 0, 9: 1, 11: 3, 13: 4}, crowd_ids=[9])
    assert classes.tolist() == [2, 0, 3]  # crowd 9 and absent 13 dropped, order of the mapping kept
    assert masks.dtype == torch.float32 and masks.shape == (3, 3, 3)
    assert torch.equal(masks[0].bool(), id_map == 5)
    assert torch.equal(masks[2].bool(), id_map == 11)
    assert not masks.sum(0)[0, 0]  # void pixel in no mask
    empty_masks, empty_classes = panoptic_to_targets(id_map, {})
    assert empty_masks.shape == (0, 3, 3) and empty_classes.shape == (0,)


def test_sam_record_targets_follow_the_geometry():
    from pycocotools import mask as mask_utils

    from training.data.transforms import mask_record_to_targets

    dense = np.zeros((2, 30, 40), dtype=np.uint8)
    dense[0, 2:10, 3:20] = 1
    dense[1, 5:25, 10:38] = 1  # overlaps mask 0
    rles = mask_utils.encode(np.asfortranarray(dense.transpose(1, 2, 0)))
    record = {"height": 30, "width": 40,
              "masks": [{"segmentation": {"size": r["size"], "counts": r["counts"].decode()}} for r in rles]}
    params = GeometricParams((30, 40), (60, 80), 10, 30, (32, 32), True)
    masks, classes = mask_record_to_targets(record, params)
    assert classes.tolist() == [0] * len(masks)
    expected = apply_to_masks(torch.from_numpy(dense), params).float()
    expected = expected[expected.flatten(1).any(1)]
    assert torch.equal(masks, expected)


def test_collator_pads_and_builds_pixel_mask():
    collate = DearliDataCollator(size_divisor=32)
    features = [
        {"pixel_values": torch.ones(3, 40, 50), "mask_labels": torch.ones(2, 40, 50),
         "class_labels": torch.tensor([1, 2]), "image_id": "a"},
        {"pixel_values": torch.ones(3, 70, 20), "mask_labels": torch.ones(1, 70, 20), "class_labels": torch.tensor([0]),
         "pixel_mask": torch.cat([torch.ones(60, 20), torch.zeros(10, 20)]).long(), "image_id": "b"},
    ]
    batch = collate(features)
    assert batch["pixel_values"].shape == (2, 3, 96, 64)
    assert batch["pixel_mask"].shape == (2, 96, 64) and batch["pixel_mask"].dtype == torch.long
    assert batch["pixel_mask"][0].sum() == 40 * 50 and batch["pixel_mask"][1].sum() == 60 * 20
    assert (batch["pixel_values"][0, :, 40:] == 0).all() and (batch["pixel_values"][0, :, :, 50:] == 0).all()
    assert [m.shape for m in batch["mask_labels"]] == [(2, 96, 64), (1, 96, 64)]
    assert batch["mask_labels"][1][:, 70:].sum() == 0
    assert [c.tolist() for c in batch["class_labels"]] == [[1, 2], [0]]
    assert batch["image_id"] == ["a", "b"]
    unlabeled = collate([{"pixel_values": torch.ones(3, 8, 8)}])
    assert "mask_labels" not in unlabeled and unlabeled["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError):
        collate([{"pixel_values": torch.ones(3, 8, 8), "mask_labels": torch.ones(1, 4, 4),
                  "class_labels": torch.tensor([0])}])


def test_collated_batch_runs_through_the_model(tiny_model):
    from training.data.transforms import image_to_tensor

    transform = LargeScaleJitter((48, 64), 0.5, 1.5)
    image, id_map = _coded_image(60, 90)
    features = []
    for seed in range(2):
        sample = transform(image, id_map=id_map, generator=torch.Generator().manual_seed(seed))
        masks, classes = panoptic_to_targets(sample.id_map, {int(i): int(i) % 3 for i in id_map.unique()[:6]})
        features.append({"pixel_values": normalize_image(sample.image), "pixel_mask": valid_pixel_mask(sample.params),
                         "mask_labels": masks, "class_labels": classes})
    batch = DearliDataCollator()(features)
    with torch.no_grad():
        out = tiny_model(**batch)
    assert torch.isfinite(out.loss)
    assert out.unpadded_sizes.tolist() == [list(f["pixel_mask"].shape) if f["pixel_mask"].all() else
                                           [int(f["pixel_mask"].any(1).sum()), int(f["pixel_mask"].any(0).sum())]
                                           for f in features]
    assert image_to_tensor(image).shape == (3, 60, 90)
