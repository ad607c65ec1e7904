"""Ensembling (Eq. 6), resampling and panoptic / semantic / instance inference against plain references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from modeling_dearli import segmentation_inference
from modeling_dearli.ensembling import class_probabilities, ensemble_class_probabilities
from modeling_dearli.image_processing_dearli import DearliImageProcessor
from modeling_dearli.mask_resampling import ResampleGrid
from modeling_dearli.segmentation_inference import instance_inference, panoptic_inference, semantic_inference

STRIDE = 4


def model_like_outputs(batch=2, queries=24, classes=8, h=20, w=24, seed=0, noise=1.5, regions=6, duplicates=True):
    """Mask2Former-like random outputs: one confident query per region of a smooth partition, noisy duplicates."""
    g = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.randn(batch, regions, 5, 5, generator=g), size=(h, w), mode="bicubic")
    region = field.argmax(1)
    owner = torch.randint(0, regions, (batch, queries), generator=g)
    owner[:, :regions] = torch.arange(regions)
    inside = (region[:, None] == owner[:, :, None, None]).float()
    masks = (inside * 2 - 1) * 4 + torch.randn(batch, queries, h, w, generator=g) * noise
    logits = torch.randn(batch, queries, classes + 1, generator=g)
    top = torch.randint(0, classes, (batch, queries), generator=g)
    logits.scatter_add_(-1, top[..., None], torch.full((batch, queries, 1), 5.0))
    if duplicates:  # an exact duplicate query: ties must go to the lower index, as torch.argmax does
        masks[:, -1], logits[:, -1] = masks[:, 0], logits[:, 0]
    clip = torch.randn(batch, queries, classes, generator=g) * 3
    return logits, masks, clip


# ---------------------------------------------------------------------------------------------------------------------
# Plain references (loops over queries / classes, written for clarity, not speed)


def reference_panoptic(probs, masks, threshold, mask_threshold, overlap, stuff, valid_size, out_size):
    """detectron2's Mask2Former panoptic_inference, one query at a time."""
    num_classes = probs.shape[-1] - 1
    scores, labels = probs.max(-1)
    seg = torch.full(out_size, -1, dtype=torch.long)
    info: list[dict] = []
    keep = [q for q in range(len(scores)) if labels[q] != num_classes and scores[q] > threshold]
    if not keep:
        return seg, info
    grid = ResampleGrid(masks.shape[-2:], out_size, valid_size, STRIDE)
    mask_probs = grid.dense(masks[keep].float()).sigmoid()
    weighted = torch.stack([scores[q] * mask_probs[i] for i, q in enumerate(keep)])
    winner = weighted.argmax(0)
    stuff_segment: dict[int, int] = {}
    for i, q in enumerate(keep):
        label = int(labels[q])
        area = int((winner == i).sum())
        original = int((mask_probs[i] >= mask_threshold).sum())
        segment = (winner == i) & (mask_probs[i] >= mask_threshold)
        if area == 0 or original == 0 or int(segment.sum()) == 0 or area / original < overlap:
            continue
        if label in stuff and label in stuff_segment:
            seg[segment] = stuff_segment[label]
            entry = info[stuff_segment[label] - 1]
            entry["score"] = max(entry["score"], float(scores[q]))
            continue
        new_id = len(info) + 1
        if label in stuff:
            stuff_segment[label] = new_id
        seg[segment] = new_id
        info.append({"id": new_id, "label_id": label, "was_fused": label in stuff, "score": float(scores[q])})
    return seg, info


def reference_semantic(probs, masks, valid_size, out_size):
    num_classes = probs.shape[-1] - 1
    mask_probs = masks.float().sigmoid()
    scores = torch.stack([(probs[:, c, None, None] * mask_probs).sum(0) for c in range(num_classes)])
    grid = ResampleGrid(masks.shape[-2:], out_size, valid_size, STRIDE)
    return grid.dense(scores).argmax(0)


def reference_instance(probs, masks, threshold, mask_threshold, stuff, valid_size, out_size, top_k=100, min_area=0,
                       mask_iou_threshold=None):
    """detectron2's Mask2Former instance_inference (top-k pairs, thing classes, score = class x mask quality), with the
    optional area and same-class IoU filters, one candidate at a time."""
    num_queries, num_classes = probs.shape[0], probs.shape[1] - 1
    pairs = sorted(
        ((float(probs[q, c]), q * num_classes + c) for q in range(num_queries) for c in range(num_classes)),
        key=lambda t: (-t[0], t[1]),
    )[: top_k if top_k is not None else num_queries]
    vh, vw = -(-valid_size[0] // STRIDE), -(-valid_size[1] // STRIDE)
    grid = ResampleGrid(masks.shape[-2:], out_size, valid_size, STRIDE)
    candidates = []
    for cls_score, flat in pairs:
        q, c = divmod(flat, num_classes)
        if c in stuff:
            continue
        m = masks[q, :vh, :vw].float().sigmoid()
        binary = m >= mask_threshold
        score = cls_score * float((m * binary).sum() / (binary.sum() + 1e-6))
        full = grid.dense(masks[q : q + 1].float()).sigmoid()[0] >= mask_threshold
        if score >= threshold and int(full.sum()) >= max(min_area, 1):
            candidates.append((score, q, c, full))
    candidates.sort(key=lambda t: -t[0])
    if mask_iou_threshold is not None:
        kept = []
        for candidate in candidates:
            duplicate = any(
                c == candidate[2] and float((m & candidate[3]).sum()) / float((m | candidate[3]).sum())
                > mask_iou_threshold
                for _, _, c, m in kept
            )
            if not duplicate:
                kept.append(candidate)
        candidates = kept
    seg = torch.full(out_size, -1, dtype=torch.long)
    for i in reversed(range(len(candidates))):  # paint worst first: the best-scoring instance stays on top
        seg[candidates[i][3]] = i
    return seg, [(c, s) for s, _, c, _ in candidates]


# ---------------------------------------------------------------------------------------------------------------------
# Ensembling


def test_ensembling_limits_and_normalisation():
    logits, _, clip = model_like_outputs()
    plain = logits.softmax(-1)
    torch.testing.assert_close(ensemble_class_probabilities(logits, clip, 1.0), plain)
    torch.testing.assert_close(ensemble_class_probabilities(logits, clip, torch.tensor(1.0)), plain)
    p_void = plain[..., -1:]
    clip_only = ensemble_class_probabilities(logits, clip, 0.0)
    torch.testing.assert_close(clip_only, torch.cat([clip.softmax(-1) * (1 - p_void), p_void], -1))
    for alpha in (0.0, 0.3, 0.6, 1.0):
        out = ensemble_class_probabilities(logits, clip, alpha)
        assert out.shape == logits.shape
        assert (out >= 0).all()
        torch.testing.assert_close(out.sum(-1), torch.ones(out.shape[:-1]))


def test_ensembling_matches_geometric_mean_in_float64():
    logits, _, clip = model_like_outputs(seed=3)
    alpha = 0.6
    z, c = logits.double(), clip.double()
    p_m2f, p_clip = z[..., :-1].softmax(-1), c.softmax(-1)
    geometric = p_m2f**alpha * p_clip ** (1 - alpha)
    p_ens = geometric / geometric.sum(-1, keepdim=True)
    p_void = z.softmax(-1)[..., -1:]
    expected = torch.cat([p_ens * (1 - p_void), p_void], -1).float()
    torch.testing.assert_close(ensemble_class_probabilities(logits, clip, alpha), expected)


def test_ensembling_is_stable_for_extreme_logits():
    logits = torch.tensor([[[1e4, -1e4, 0.0, 5.0]]])
    clip = torch.tensor([[[-1e4, 1e4, 0.0]]])
    out = ensemble_class_probabilities(logits, clip, 0.6)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 1))
    half = ensemble_class_probabilities(logits.half(), clip.half(), 0.6)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_ensembling_validates_inputs():
    logits, _, clip = model_like_outputs()
    with pytest.raises(ValueError, match="alpha"):
        ensemble_class_probabilities(logits, clip, 1.5)
    with pytest.raises(ValueError, match="shape"):
        ensemble_class_probabilities(logits, clip[..., :-1], 0.6)
    outputs = ModelOutput(class_queries_logits=logits)
    torch.testing.assert_close(class_probabilities(outputs, 0.6), logits.softmax(-1))  # no CLIP logits: plain


# ---------------------------------------------------------------------------------------------------------------------
# Resampling


def test_resampling_equals_interpolate_without_crop_and_with_aligned_crop():
    values = torch.randn(3, 10, 12)
    grid = ResampleGrid((10, 12), (37, 53), None, STRIDE)
    expected = F.interpolate(values[None], size=(37, 53), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(grid.dense(values), expected, atol=1e-5, rtol=1e-5)
    # A crop at mask-pixel boundaries equals cropping first when the padding repeats the border (near the crop edge
    # samples beyond it are used, like detectron2's upsample-then-crop).
    values[:, 7:] = values[:, 6:7]
    values[:, :, 9:] = values[:, :, 8:9]
    grid = ResampleGrid((10, 12), (29, 31), (7 * STRIDE, 9 * STRIDE), STRIDE)
    expected = F.interpolate(values[None, :, :7, :9], size=(29, 31), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(grid.dense(values), expected, atol=1e-5, rtol=1e-5)


def test_resampling_cells_reproduce_dense_values_exactly():
    values = torch.randn(4, 9, 11)
    grid = ResampleGrid((9, 11), (33, 25), (30, 41), STRIDE)
    dense = grid.dense(values)
    num_a, num_b = grid.num_cells
    ca, cb = torch.meshgrid(torch.arange(num_a), torch.arange(num_b), indexing="ij")
    ca, cb = ca.flatten(), cb.flatten()
    for k in range(values.shape[0]):
        block = grid.eval_pairs(values, torch.full_like(ca, k), ca, cb)
        painted = grid.scatter_blocks(torch.zeros(grid.out_size), ca, cb, block)
        assert torch.equal(painted, dense[k])
    assert int(grid.cell_sum(torch.ones(1, num_a, num_b, dtype=torch.bool))) == 33 * 25  # cells tile the output


# ---------------------------------------------------------------------------------------------------------------------
# Inference against the references

CASES = [
    {},  # whole input, output = input size
    {"output_sizes": [(50, 70), (33, 90)], "unpadded_sizes": torch.tensor([[70, 90], [80, 61]])},
    {"output_sizes": [(13, 17), (21, 11)]},  # downsampling
]


METHODS = ["sparse", "sparse-forced", "dense"]


@pytest.fixture
def use_method(monkeypatch):
    """``method`` argument for a test variant; "sparse-forced" disables the dense fallback (small test inputs would
    otherwise take it) and fails if any dense path runs."""

    def setup(variant: str) -> str:
        if variant == "sparse-forced":
            budgets = {task: float("inf") for task in segmentation_inference._SPARSE_MAX_FRACTION}
            monkeypatch.setattr(segmentation_inference, "_SPARSE_MAX_FRACTION", budgets)
            for name in ("_panoptic_pixels_dense", "_semantic_dense", "_instance_dense"):
                monkeypatch.setattr(segmentation_inference, name, _no_dense)
            return "sparse"
        monkeypatch.undo()
        return variant

    return setup


def _no_dense(*args, **kwargs):
    raise AssertionError("dense fallback used")


def _valid_and_out(kw, b, h, w):
    unpadded = kw.get("unpadded_sizes")
    valid = tuple(unpadded[b].tolist()) if unpadded is not None else (h * STRIDE, w * STRIDE)
    out = kw["output_sizes"][b] if "output_sizes" in kw else valid
    return valid, out


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_panoptic_matches_reference(case, seed, use_method):
    kw = CASES[case]
    logits, masks, clip = model_like_outputs(seed=seed, noise=1.0 + seed % 3)
    probs = ensemble_class_probabilities(logits, clip, 0.6)
    stuff = {5, 6, 7}
    threshold = (0.0, 0.0, 0.4, 0.7)[seed]
    for variant in METHODS:
        method = use_method(variant)
        results = panoptic_inference(
            probs, masks, threshold=threshold, stuff_ids=stuff, method=method, **kw
        )
        for b, result in enumerate(results):
            valid, out = _valid_and_out(kw, b, *masks.shape[-2:])
            seg, info = reference_panoptic(probs[b], masks[b], threshold, 0.5, 0.8, stuff, valid, out)
            assert torch.equal(result.segmentation, seg), method
            assert result.labels.tolist() == [i["label_id"] for i in info]
            assert result.was_fused.tolist() == [i["was_fused"] for i in info]
            torch.testing.assert_close(result.scores, torch.tensor([i["score"] for i in info]))
            assert result.ids.tolist() == list(range(1, len(info) + 1))


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_sparse_path_at_model_scale_equals_dense(threshold, monkeypatch):
    """At realistic sizes the sparse path runs without falling back, and agrees with dense evaluation."""
    logits, masks, clip = model_like_outputs(batch=1, queries=60, classes=20, h=64, w=80, seed=7, noise=1.0,
                                             regions=12)
    logits[:, :12, :-1] *= 2  # like a trained model: one confident query per region,
    logits[:, 12:, -1] += 6.0  # the duplicates mostly "no object"
    probs = ensemble_class_probabilities(logits, clip, 0.6)
    calls = []
    sparse = segmentation_inference._panoptic_pixels_sparse
    monkeypatch.setattr(segmentation_inference, "_panoptic_pixels_sparse",
                        lambda *a, **k: calls.append(sparse(*a, **k)) or calls[-1])
    kw = dict(threshold=threshold, stuff_ids=range(10, 20), output_sizes=[(250, 330)],
              unpadded_sizes=torch.tensor([[250, 300]]))
    fast = panoptic_inference(probs, masks, method="sparse", **kw)[0]
    assert calls and (calls[0] is not None or threshold > 0)  # uncovered regions may make dense cheaper
    slow = panoptic_inference(probs, masks, method="dense", **kw)[0]
    assert torch.equal(fast.segmentation, slow.segmentation) and torch.equal(fast.labels, slow.labels)
    assert len(fast.ids) >= 5
    assert torch.equal(semantic_inference(probs, masks, method="sparse", **{k: kw[k] for k in kw if "sizes" in k})[0],
                       semantic_inference(probs, masks, method="dense", **{k: kw[k] for k in kw if "sizes" in k})[0])


def test_panoptic_finds_segments_and_fuses_stuff():
    logits, masks, clip = model_like_outputs(seed=4, noise=0.5, duplicates=False)
    labels = torch.arange(24).remainder(5).expand(2, -1).clone()
    labels[:, 6:] = 8  # only the six region owners predict a class, the rest "no object"
    # Two queries of one stuff class covering different regions become one segment.
    labels[0, 1] = labels[0, 2] = 6
    probs = F.one_hot(labels, 9).float() * 0.9 + 0.1 / 9
    result = panoptic_inference(probs, masks, stuff_ids=[6])[0]
    assert len(result.ids) == 5
    assert sorted(result.labels.tolist()) == [0, 0, 3, 4, 6]  # queries 1 and 2 fused, class-0 things not
    assert result.was_fused[result.labels == 6].all() and not result.was_fused[result.labels != 6].any()
    present = set(result.segmentation.unique().tolist()) - {-1}
    assert present == set(result.ids.tolist())
    masks_out, classes_out = result.to_mask_labels()
    assert masks_out.shape == (len(result.ids), *result.segmentation.shape)
    assert (masks_out.sum(0) <= 1).all() and torch.equal(classes_out, result.labels)
    with pytest.warns(FutureWarning, match="stuff_classes= is now called stuff_ids="):
        earlier = panoptic_inference(probs, masks, stuff_classes=[6])[0]
    assert torch.equal(earlier.segmentation, result.segmentation) and torch.equal(earlier.labels, result.labels)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_semantic_matches_reference(case, use_method):
    kw = CASES[case]
    logits, masks, clip = model_like_outputs(seed=5)
    probs = ensemble_class_probabilities(logits, clip, 0.6)
    for variant in METHODS:
        method = use_method(variant)
        maps = semantic_inference(probs, masks, method=method, **kw)
        for b, seg in enumerate(maps):
            valid, out = _valid_and_out(kw, b, *masks.shape[-2:])
            assert torch.equal(seg, reference_semantic(probs[b], masks[b], valid, out)), method


@pytest.mark.parametrize("case", range(len(CASES)))
def test_instance_matches_reference(case, use_method):
    kw = CASES[case]
    logits, masks, clip = model_like_outputs(seed=6)
    probs = logits.softmax(-1)
    stuff = {6, 7}
    for variant in METHODS:
        method = use_method(variant)
        results = instance_inference(probs, masks, threshold=0.2, stuff_ids=stuff, method=method,
                                     return_binary_masks=True, **kw)
        for b, result in enumerate(results):
            valid, out = _valid_and_out(kw, b, *masks.shape[-2:])
            seg, instances = reference_instance(probs[b], masks[b], 0.2, 0.5, stuff, valid, out)
            assert torch.equal(result.segmentation, seg), method
            assert result.labels.tolist() == [c for c, _ in instances]
            torch.testing.assert_close(result.scores, torch.tensor([s for _, s in instances]))
            assert result.binary_masks.shape == (len(instances), *out)
            assert ((result.segmentation >= 0) == result.binary_masks.any(0)).all()


@pytest.mark.parametrize("options", [{}, {"top_k": None}, {"top_k": 7}, {"min_area": 300},
                                     {"mask_iou_threshold": 0.5}, {"min_area": 300, "mask_iou_threshold": 0.0}])
def test_instance_defaults_and_filters_match_reference(options, use_method):
    """Defaults are detectron2's (top 100 pairs of 24 x 8, no threshold); min_area and the same-class IoU
    suppression match the loop reference, with and without binary masks."""
    logits, masks, _ = model_like_outputs(seed=7, queries=24, classes=8)
    probs = logits.softmax(-1)
    stuff = {6, 7}
    kw = {"output_sizes": [(37, 53), (80, 96)], "unpadded_sizes": [(70, 90), (80, 96)]}
    for variant in METHODS:
        method = use_method(variant)
        for binary in (False, True):
            results = instance_inference(probs, masks, stuff_ids=stuff, method=method, return_binary_masks=binary,
                                         **options, **kw)
            for b, result in enumerate(results):
                seg, instances = reference_instance(probs[b], masks[b], 0.0, 0.5, stuff, kw["unpadded_sizes"][b],
                                                    kw["output_sizes"][b], **options)
                assert torch.equal(result.segmentation, seg), (method, options)
                assert result.labels.tolist() == [c for c, _ in instances]
                torch.testing.assert_close(result.scores, torch.tensor([s for _, s in instances]))
                if binary:
                    assert ((result.segmentation >= 0) == result.binary_masks.any(0)).all()
    counts = {name: sum(len(r.labels) for r in instance_inference(probs, masks, stuff_ids=stuff, **extra, **kw))
              for name, extra in {"default": {}, "all": {"top_k": 24 * 8}, "area": {"min_area": 300},
                                  "iou": {"mask_iou_threshold": 0.5}}.items()}
    # Every option changes the result on these outputs (the comparison above is not vacuous).
    assert counts["all"] > counts["default"] > counts["area"] > 0 and counts["default"] > counts["iou"] > 0, counts


def test_instance_options_are_checked():
    logits, masks, _ = model_like_outputs()
    probs = logits.softmax(-1)
    for bad in ({"top_k": 0}, {"min_area": -1}, {"mask_iou_threshold": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            instance_inference(probs, masks, **bad)


def test_empty_predictions():
    logits, masks, _ = model_like_outputs()
    logits[..., -1] = 100.0  # every query says "no object"
    probs = logits.softmax(-1)
    for result in panoptic_inference(probs, masks, output_sizes=[(30, 40)] * 2):
        assert result.segmentation.shape == (30, 40) and (result.segmentation == -1).all()
        assert result.ids.numel() == 0
    for result in instance_inference(probs, masks, threshold=0.5, return_binary_masks=True):
        assert (result.segmentation == -1).all() and result.binary_masks.shape[0] == 0
    maps = semantic_inference(probs, masks)
    assert maps[0].shape == (masks.shape[-2] * STRIDE, masks.shape[-1] * STRIDE)


# ---------------------------------------------------------------------------------------------------------------------
# Processor post-processing API


def _outputs(seed=0, **extra):
    logits, masks, clip = model_like_outputs(seed=seed)
    return ModelOutput(class_queries_logits=logits, masks_queries_logits=masks, clip_class_logits=clip, **extra)


def test_processor_formats():
    processor = DearliImageProcessor(num_labels=8, label_ids_to_fuse=[5, 6, 7])
    outputs = _outputs(unpadded_sizes=torch.tensor([[70, 90], [80, 61]]))
    panoptic = processor.post_process_panoptic_segmentation(outputs)
    assert [tuple(r["segmentation"].shape) for r in panoptic] == [(70, 90), (80, 61)]
    for r in panoptic:
        assert r["segmentation"].dtype == torch.int32
        assert r["segments_info"] and set(r["segments_info"][0]) == {"id", "label_id", "was_fused", "score"}
        ids = {s["id"] for s in r["segments_info"]}
        assert set(r["segmentation"].unique().tolist()) - {-1} == ids
        assert all(s["was_fused"] == (s["label_id"] in {5, 6, 7}) for s in r["segments_info"])
    sizes = [(40, 50), (60, 30)]
    semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
    assert [tuple(s.shape) for s in semantic] == sizes and semantic[0].dtype == torch.long
    instance = processor.post_process_instance_segmentation(outputs, threshold=0.1, target_sizes=sizes)
    assert [tuple(r["segmentation"].shape) for r in instance] == sizes
    assert all(s["label_id"] not in {5, 6, 7} for r in instance for s in r["segments_info"])
    scores = [s["score"] for s in instance[0]["segments_info"]]
    assert scores == sorted(scores, reverse=True)
    binary = processor.post_process_instance_segmentation(outputs, threshold=0.1, target_sizes=sizes,
                                                          return_binary_maps=True)
    assert binary[0]["segmentation"].shape == (len(instance[0]["segments_info"]), *sizes[0])
    coco = processor.post_process_instance_segmentation(outputs, threshold=0.1, target_sizes=sizes,
                                                        return_coco_annotation=True)
    rle = coco[0]["segmentation"][0]
    assert rle["size"] == list(sizes[0]) and sum(rle["counts"]) == sizes[0][0] * sizes[0][1]
    # Decoding the RLE (column-major runs starting with zeros) gives back the binary map.
    flat = torch.cat([torch.full((n,), i % 2, dtype=torch.bool) for i, n in enumerate(rle["counts"])])
    assert torch.equal(flat.view(sizes[0][1], sizes[0][0]).t(), binary[0]["segmentation"][0])


def test_processor_alpha_controls_recognition():
    logits = torch.zeros(1, 1, 4)
    logits[0, 0, 0] = 6.0  # decoder: class 0
    clip = torch.zeros(1, 1, 3)
    clip[0, 0, 1] = 6.0  # CLIP: class 1
    masks = torch.full((1, 1, 4, 4), 5.0)
    outputs = ModelOutput(class_queries_logits=logits, masks_queries_logits=masks, clip_class_logits=clip)
    processor = DearliImageProcessor(num_labels=3, label_ids_to_fuse=[])
    label = lambda alpha: processor.post_process_panoptic_segmentation(outputs, ensemble_alpha=alpha)[0][  # noqa: E731
        "segments_info"
    ][0]["label_id"]
    assert label(1.0) == 0 and label(0.0) == 1
    processor.ensemble_alpha = 0.0
    assert label(None) == 1
    no_clip = ModelOutput(class_queries_logits=logits, masks_queries_logits=masks)
    assert processor.post_process_panoptic_segmentation(no_clip)[0]["segments_info"][0]["label_id"] == 0


def test_processor_validates_outputs():
    processor = DearliImageProcessor(num_labels=5)
    with pytest.raises(ValueError, match="classes"):
        processor.post_process_panoptic_segmentation(_outputs())
    processor = DearliImageProcessor()
    with pytest.raises(ValueError, match="target sizes"):
        processor.post_process_semantic_segmentation(_outputs(), target_sizes=[(10, 10)])
    with pytest.raises(ValueError, match="masks_queries_logits"):
        processor.post_process_panoptic_segmentation(ModelOutput(class_queries_logits=torch.zeros(1, 2, 3)))
    with pytest.raises(ValueError, match="both"):
        processor.post_process_instance_segmentation(_outputs(), return_binary_maps=True,
                                                     return_coco_annotation=True)
