"""One frozen-backbone call for several batches (`compute_backbone_features`) and forwards on precomputed features
(``backbone_features=``): the same outputs and gradients as forwards on the images."""

from __future__ import annotations

import pytest
import torch

from modeling_dearli import tiny_model


def _model():
    model = tiny_model(class_names=["person,man", "sky", "grass"], thing_ids=[0], seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the initial values (exact zeros in the sampling offsets)
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def _labels(batch: int, height: int, width: int):
    masks = torch.zeros(batch, 2, height, width)
    masks[:, 0, : height // 2] = 1
    masks[:, 1, height // 2 :] = 1
    return list(masks), [torch.tensor([0, 2]) for _ in range(batch)]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= 1e-5 * expected.double().abs().max().item() + 1e-7, f"{name}: max error {error:.3g}"


def test_one_backbone_call_gives_the_forwards_and_gradients_of_separate_calls():
    model = _model().train()
    generator = torch.Generator().manual_seed(2)
    labeled = torch.randn(2, 3, 64, 96, generator=generator)
    unlabeled = torch.randn(3, 3, 64, 96, generator=generator)
    labeled_features, unlabeled_features = model.compute_backbone_features(labeled, unlabeled)
    assert [f.shape[0] for f in labeled_features] == [2] * 4 and [f.shape[0] for f in unlabeled_features] == [3] * 4

    for images, features in ((labeled, labeled_features), (unlabeled, unlabeled_features)):
        mask_labels, class_labels = _labels(images.shape[0], 64, 96)
        results = []
        for kwargs in ({"pixel_values": images}, {"backbone_features": features}):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)  # the loss's point sampling
            outputs = model(mask_labels=mask_labels, class_labels=class_labels, **kwargs)
            outputs.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((outputs, grads))
        (expected, expected_grads), (actual, actual_grads) = results
        for name in ("loss", "class_queries_logits", "masks_queries_logits"):
            _assert_close(actual[name], expected[name], name)
        assert actual_grads.keys() == expected_grads.keys() and len(expected_grads) > 20
        for name, grad in expected_grads.items():
            _assert_close(actual_grads[name], grad, name)


def test_teacher_forward_on_features_from_the_shared_backbone():
    """A Mean Teacher shares the student's backbone: the student's call serves the teacher's weak views and CutMix
    sources (eval-mode outputs, CLIP logits included)."""
    from training.ema import MeanTeacher

    student = _model()
    teacher = MeanTeacher(student)
    generator = torch.Generator().manual_seed(3)
    weak, sources = torch.randn(2, 3, 64, 64, generator=generator), torch.randn(1, 3, 64, 64, generator=generator)
    weak_features, source_features = student.compute_backbone_features(weak, sources)
    with torch.no_grad():
        for images, features in ((weak, weak_features), (sources, source_features)):
            expected = teacher(pixel_values=images, output_clip_logits=True)
            actual = teacher(backbone_features=features, output_clip_logits=True)
            for name in ("class_queries_logits", "masks_queries_logits", "clip_class_logits"):
                _assert_close(actual[name], expected[name], name)


def test_backbone_features_are_checked():
    model = _model().eval()
    images = torch.randn(2, 3, 64, 64)
    (features,) = model.compute_backbone_features(images)
    with pytest.raises(ValueError, match="one image size"):
        model.compute_backbone_features(images, torch.randn(1, 3, 64, 96))
    with pytest.raises(ValueError, match="four stage outputs"):
        model(backbone_features=features[:3])
    with pytest.raises(ValueError, match="batch size"):
        model(pixel_values=images[:1], backbone_features=features)
    with pytest.raises(ValueError, match="pixel_values"):
        model()
    with pytest.raises(ValueError, match="mask_labels"):
        model(backbone_features=features, mask_labels=[torch.zeros(1, 64, 64)], class_labels=[torch.tensor([0])])
