"""Mean Teacher EMA: update math, shared frozen backbone, no gradients, checkpoint round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from training.ema import MeanTeacher, ema_decay_at


@pytest.fixture()
def student(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.train()
    return model


def _perturb(model: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * torch.randn_like(p))


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_decay_schedule():
    assert [ema_decay_at(t, 0.999, True) for t in range(3)] == [0.0, 0.5, 1 - 1 / 3]
    assert ema_decay_at(10**6, 0.999, True) == 0.999
    assert ema_decay_at(0, 0.999, False) == 0.999


@pytest.mark.parametrize("ramp_up", [True, False])
def test_ema_update_matches_reference(student, ramp_up):
    teacher = MeanTeacher(student, decay=0.9, ramp_up=ramp_up)
    reference = _trainable(student)  # the teacher starts as a copy of the student
    for step in range(4):
        _perturb(student)
        gamma = min(1 - 1 / (step + 1), 0.9) if ramp_up else 0.9
        current = _trainable(student)
        reference = {n: gamma * reference[n] + (1 - gamma) * current[n] for n in reference}
        assert teacher.update(student) == pytest.approx(gamma)
    assert teacher.step == 4
    for name, value in teacher.teacher_weights().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-6)
    # Frozen parts are untouched and shared.
    assert teacher.teacher.backbone is student.backbone


def test_first_ramped_update_copies_student(student):
    teacher = MeanTeacher(student)
    _perturb(student, 1.0)
    teacher.update(student)
    for name, value in _trainable(student).items():
        torch.testing.assert_close(teacher.teacher_weights()[name], value, rtol=0, atol=0)


def test_teacher_shares_backbone_and_text_buffers_but_not_decoder(student):
    mean_teacher = MeanTeacher(student)
    teacher = mean_teacher.teacher
    assert teacher.backbone is student.backbone
    assert teacher.text_embeddings is student.text_embeddings
    assert teacher.text_class_index is student.text_class_index
    # No second copy of any frozen parameter; every trainable parameter has its own teacher storage.
    student_ptrs = {p.data_ptr() for p in student.parameters()}
    teacher_own = [p for n, p in teacher.named_parameters() if not n.startswith("backbone.")]
    assert all(p.data_ptr() not in student_ptrs for p in teacher_own)
    frozen_ptrs = {p.data_ptr() for p in student.backbone.parameters()}
    teacher_frozen = {p.data_ptr() for n, p in teacher.named_parameters() if n.startswith("backbone.")}
    assert teacher_frozen == frozen_ptrs
    assert sum(p.numel() for p in teacher_own) == sum(p.numel() for p in student.trainable_parameters())


def test_teacher_never_receives_gradients(student):
    mean_teacher = MeanTeacher(student)
    pixel_values = torch.randn(2, 3, 64, 64)
    masks = [torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)]
    masks[0][0, :32] = 1
    masks[1][0, :, :32] = 1
    labels = [torch.tensor([0]), torch.tensor([1])]
    with torch.enable_grad():
        teacher_out = mean_teacher(pixel_values)
        out = student(pixel_values, mask_labels=masks, class_labels=labels)
        out.loss.backward()
    assert not teacher_out.class_queries_logits.requires_grad
    assert not teacher_out.masks_queries_logits.requires_grad
    assert teacher_out.clip_class_logits is not None  # eval-mode forward
    frozen = set(student.backbone.parameters())
    own = [p for p in mean_teacher.teacher.parameters() if p not in frozen]
    assert own and all(p.grad is None and not p.requires_grad for p in own)
    assert any(p.grad is not None for p in student.trainable_parameters())
    # The teacher stays in eval mode whatever happens to the student or to itself.
    student.train()
    mean_teacher.teacher.train()
    assert not mean_teacher.teacher.training
    assert student.training and not student.backbone.training


def test_teacher_forward_is_model_forward_with_teacher_weights(student):
    mean_teacher = MeanTeacher(student, decay=0.5)
    _perturb(student)
    mean_teacher.update(student)
    _perturb(student)
    mean_teacher.update(student)
    reference = copy.deepcopy(student).eval()
    reference.load_state_dict(mean_teacher.teacher_weights(), strict=False)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(pixel_values)
    got = mean_teacher(pixel_values)
    torch.testing.assert_close(got.class_queries_logits, expected.class_queries_logits)
    torch.testing.assert_close(got.masks_queries_logits, expected.masks_queries_logits)
    torch.testing.assert_close(got.clip_class_logits, expected.clip_class_logits)


def test_state_dict_round_trip(student, tmp_path):
    mean_teacher = MeanTeacher(student, decay=0.99)
    for _ in range(3):
        _perturb(student)
        mean_teacher.update(student)
    torch.save(mean_teacher.state_dict(), tmp_path / "teacher.pt")
    state = torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert not any(k.startswith("backbone.") for k in state["teacher"])

    other_student = copy.deepcopy(student)
    _perturb(other_student)
    restored = MeanTeacher(other_student, decay=0.99)
    restored.load_state_dict(state)
    assert restored.step == 3 and restored.ramp_up
    for name, value in mean_teacher.teacher_weights().items():
        torch.testing.assert_close(restored.teacher_weights()[name], value, rtol=0, atol=0)
    # The next update is identical too.
    mean_teacher.update(student)
    restored.update(student)
    for name, value in mean_teacher.teacher_weights().items():
        torch.testing.assert_close(restored.teacher_weights()[name], value, rtol=0, atol=0)


def test_given_teacher_weights_disable_ramp_up_and_wrappers_are_unwrapped(student):
    weights = {n: p + 1.0 for n, p in _trainable(student).items()}
    mean_teacher = MeanTeacher(nn.DataParallel(student), decay=0.999, teacher_state_dict=weights)
    assert not mean_teacher.ramp_up
    torch.testing.assert_close(mean_teacher.teacher_weights()["logit_scale"], weights["logit_scale"])
    assert mean_teacher.update(nn.DataParallel(student)) == pytest.approx(0.999)


@pytest.mark.parametrize(("init_from", "schedule", "ramped"), [
    ("dewa", "auto", False), (None, "auto", True), ("dewa", "ramp_up", True), (None, "constant", False)])
def test_ssl_teacher_schedule_follows_the_reference(student, init_from, schedule, ramped):
    """DEARLi (student from DeWa, --init_from): teacher = the same DeWa weights, constant 0.999 from step 0, so after
    the first update theta_t = 0.999 theta_DeWa + 0.001 theta_s(1); DEAR (fresh): ramp-up, theta_t = theta_s(1)."""
    from types import SimpleNamespace

    from training.ssl import build_teacher

    args = SimpleNamespace(teacher_init=None, init_from=init_from, ema_schedule=schedule, ema_decay=0.999)
    initial = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    teacher = build_teacher(args, student, class_names=None)
    assert teacher.ramp_up is ramped
    moved = copy.deepcopy(student)
    with torch.no_grad():
        for p in moved.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert teacher.update(moved) == (0.0 if ramped else 0.999)
    for name, value in teacher.teacher_weights().items():
        if name in initial:
            expected = initial[name] + 1.0 if ramped else 0.999 * initial[name] + 0.001 * (initial[name] + 1.0)
            torch.testing.assert_close(value, expected, msg=name)


def test_ema_decay_auto_keeps_the_papers_horizon_relative_to_the_schedule():
    """--ema_decay auto: 0.999 at the paper's 80k steps; a 1,000-step run averages over 1/80 of itself too."""
    from training.arguments import parse_args
    from training.ema import ema_decay_for_schedule

    data = ["--train_images_dir", "i", "--train_panoptic_dir", "p", "--train_annotations", "a.json",
            "--labeled_fraction", "0.5", "--output_dir", "out"]
    for steps, expected in ((80_000, 0.999), (1_000, 0.92), (50, 0.0)):
        args = parse_args("ssl", [*data, "--ema_decay", "auto", "--max_train_steps", str(steps)])
        assert args.ema_decay == expected == ema_decay_for_schedule(steps)
    assert parse_args("ssl", [*data, "--ema_decay", "0.99"]).ema_decay == 0.99
    with pytest.raises(SystemExit):
        parse_args("ssl", [*data, "--ema_decay", "often"])
