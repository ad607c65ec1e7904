"""training/ssl.py: presets, one in-process SSL step, and the demo under a 2-process CPU launch with checkpoint/resume.

Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's simple launcher only spawns
several CPU processes through mpirun). Two real CPU processes (DDP over gloo) come from
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2``, which is what the test uses.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SSL_PRESETS = sorted(p.stem for p in (REPO / "training" / "configs").glob("ssl_*.yaml") if p.stem != "ssl_demo")


def test_every_paper_run_has_a_preset():
    expected = {f"ssl_ade20k_{p}" for p in ("1_128", "1_64", "1_32", "1_16", "1_8")}
    coco = ("1_512", "1_256", "1_128", "1_64", "1_32")
    expected |= {f"ssl_{d}_{p}" for d in ("coco_panoptic", "coco_objects") for p in coco}
    assert set(SSL_PRESETS) == expected


@pytest.mark.parametrize("preset", SSL_PRESETS)
def test_presets_parse_with_paper_settings(preset):
    from training.arguments import parse_args

    data = ["--ade20k_root", "ADE"] if "ade20k" in preset else [
        "--train_images_dir", "i", "--train_panoptic_dir", "p", "--train_annotations", "a.json"]
    args = parse_args("ssl", ["--config", preset, "--output_dir", "out", *data])
    crop = 640 if "ade20k" in preset else 512
    assert args.crop_size == [crop] and (args.min_scale, args.max_scale) == (0.5, 2.0)
    assert args.scale_augmentation == "shortest_edge" and args.train_longest_edge == 4 * crop
    assert (args.train_batch_size, args.unlabeled_batch_size, args.max_train_steps) == (8, 8, 80_000)
    assert (args.learning_rate, args.weight_decay, args.ema_decay) == (1e-4, 0.05, 0.999)
    assert (args.pseudo_label_threshold, args.pseudo_label_overlap_threshold, args.cutmix_prob) == (0.0, 0.8, 0.5)
    assert args.partition == preset.rsplit("_", 2)[-2] + "_" + preset.rsplit("_", 1)[-1]
    assert args.dataset_name in preset


def _prepared(student, optimizer, scheduler, gradient_clip: float = 0.0):
    from accelerate import Accelerator

    from training.loop import PreparedTraining

    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    return PreparedTraining(Accelerator(cpu=True), student, optimizer, scheduler, {}, {}, parameters, gradient_clip)


def _ssl_batches(g: torch.Generator) -> dict:
    masks = torch.zeros(2, 64, 64)
    masks[0, :32] = 1
    masks[1, 32:] = 1
    labeled = {"pixel_values": torch.randn(2, 3, 64, 64, generator=g), "mask_labels": [masks, masks.flip(-1)],
               "class_labels": [torch.tensor([0, 1]), torch.tensor([2, 0])]}
    unlabeled = {"pixel_values": torch.rand(2, 3, 64, 64, generator=g), "pixel_mask": torch.ones(2, 64, 64),
                 "cutmix_pixel_values": list(torch.rand(2, 3, 64, 64, generator=g)),
                 "cutmix_pixel_mask": list(torch.ones(2, 64, 64))}
    return {"labeled": labeled, "unlabeled": unlabeled}


def test_one_ssl_step_updates_student_and_teacher(tiny_model):
    from training.data.strong_augmentations import StrongAugmentation, StrongAugmentationConfig
    from training.ema import MeanTeacher
    from training.schedules import build_optimizer, build_poly_scheduler
    from training.ssl import MeanTeacherStep
    from training.student_views import StudentViewBuilder

    student = copy.deepcopy(tiny_model).train()
    optimizer = build_optimizer(student)
    run = _prepared(student, optimizer, build_poly_scheduler(optimizer, 10), gradient_clip=0.01)
    teacher = MeanTeacher(student, decay=0.999)
    views = StudentViewBuilder(teacher, StrongAugmentation(StrongAugmentationConfig(cutmix_prob=1.0)),
                               stuff_ids=[1, 2], num_classes=3, ensemble_alpha=0.6)
    before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    out = MeanTeacherStep(teacher, views)(run, _ssl_batches(torch.Generator().manual_seed(0)), 1)
    metrics = out.metrics
    assert metrics["loss"] == pytest.approx(metrics["loss_labeled"] + metrics["loss_unlabeled"])
    assert out.last["ema_decay"] == 0.0 and teacher.step == 1  # first ramped update copies the student
    for name, value in teacher.teacher_weights().items():
        torch.testing.assert_close(value, dict(student.named_parameters())[name].detach(), rtol=0, atol=0)
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters() if p.requires_grad)
    stats = {k.removeprefix("pseudo/") for k in metrics if k.startswith("pseudo/")}
    assert {"segments_per_image", "mean_confidence", "void_fraction", "cutmix_fraction"} <= stats
    assert metrics["pseudo/cutmix_fraction"] == 1.0
    assert {"labeled/loss_dice", "unlabeled/loss_dice", "grad_norm"} <= set(out.last)


def test_ssl_step_gives_the_gradient_of_the_summed_loss(tiny_model):
    """Back-propagating L_sup and w * L_unl one after the other (half the activation memory) updates the weights as
    one backward of L_sup + w * L_unl computed by hand on the same targets."""
    from training.data.collator import model_inputs
    from training.data.strong_augmentations import StrongAugmentation
    from training.ema import MeanTeacher
    from training.ssl import MeanTeacherStep
    from training.student_views import StudentViewBuilder, strong_augmentation_generator

    batches = _ssl_batches(torch.Generator().manual_seed(1))
    weight, step = 0.7, 3
    results = []
    for by_hand in (False, True):
        student = copy.deepcopy(tiny_model).train()
        optimizer = torch.optim.SGD(student.trainable_parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        teacher = MeanTeacher(student)
        views = StudentViewBuilder(teacher, StrongAugmentation(), stuff_ids=[1, 2], num_classes=3)
        torch.manual_seed(0)  # the loss samples points with the global RNG, in the same order in both variants
        if by_hand:
            unlabeled = views(batches["unlabeled"], strong_augmentation_generator(0, step, 0))
            loss_sup = student(**model_inputs(batches["labeled"])).loss
            loss_unl = student(**unlabeled.model_inputs()).loss
            (loss_sup + weight * loss_unl).backward()
            optimizer.step()
            losses = (float(loss_sup.detach()), weight * float(loss_unl.detach()))
        else:
            out = MeanTeacherStep(teacher, views, unlabeled_weight=weight)(
                _prepared(student, optimizer, scheduler), batches, step)
            losses = (out.metrics["loss_labeled"], out.metrics["loss_unlabeled"])
        results.append((losses, {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}))
    (losses_a, weights_a), (losses_b, weights_b) = results
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    changed = 0
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-4, atol=1e-5, msg=name)
        changed += int(not torch.equal(weights_a[name], tiny_model.state_dict()[name]))
    assert changed > 0


def _launch(args: list[str], log: Path) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "training/ssl.py",
           "--config", "ssl_demo", "--max_train_steps", "3", "--checkpointing_steps", "2", "--logging_steps", "1",
           *args]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "Num processes: 2" in text and "MULTI_CPU" in text


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_demo_two_processes_checkpoints_and_resumes_exactly(tmp_path, check_saved_processor):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    _launch(["--output_dir", str(run_a)], tmp_path / "a.log")
    log_a = (tmp_path / "a.log").read_text()
    assert "Per step: 2 labeled + 4 unlabeled images (2 processes)" in log_a
    assert "Teacher weights identical on 2 processes (EMA step 2)" in log_a
    checkpoint = run_a / "checkpoints" / "step_00000002"
    assert (checkpoint / "COMPLETE").is_file()
    from training.checkpointing import load_state_files

    teacher_state = load_state_files(checkpoint, "ema_teacher")  # safetensors + JSON, no pickle
    assert teacher_state["step"] == 2 and not any(k.startswith("backbone.") for k in teacher_state["teacher"])
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    assert {"rng_state_0.json", "rng_state_1.json", "training_state.json"} <= {p.name for p in checkpoint.iterdir()}
    # Validation of student and teacher at the last step, tensorboard logs, final models.
    import json

    metrics = json.loads((run_a / "eval_results.json").read_text())
    assert metrics["step"] == 3 and "eval/student/PQ" in metrics and "eval/teacher/mIoU" in metrics
    assert list((run_a / "logs").rglob("events.out.tfevents*"))
    for folder in (run_a, run_a / "teacher"):  # the demo's validation size (ssl_demo.yaml)
        check_saved_processor(folder, {"shortest_edge": 128, "longest_edge": 256})

    # Resume from step 2 into a new folder: same step count, same teacher, same final weights.
    _launch(["--output_dir", str(run_b), "--resume_from_checkpoint", str(checkpoint), "--val_annotations="],
            tmp_path / "b.log")
    log_b = (tmp_path / "b.log").read_text()
    assert "at step 2" in log_b and "Teacher restored at EMA step 2" in log_b
    assert load_state_files(run_b / "checkpoints" / "step_00000003", "ema_teacher")["step"] == 3
    for sub in ("", "teacher"):
        a, b = _weights(run_a / sub), _weights(run_b / sub)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{sub or 'student'} {key}")

    from modeling_dearli import DearliForPanopticSegmentation

    model = DearliForPanopticSegmentation.from_pretrained(run_b)
    assert model.config.num_classes == 8 and not any(p.requires_grad for p in model.backbone.parameters())


def _constant_batch(values: list[float], size: int = 64) -> torch.Tensor:
    return torch.stack([torch.full((3, size, size), v) for v in values])


def _class_map(mask_labels: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """(H, W) class of each pixel's target (-1: no target)."""
    out = torch.full(mask_labels.shape[-2:], -1, dtype=torch.long)
    for mask, label in zip(mask_labels, class_labels):
        out[mask.bool()] = int(label)
    return out


def _pseudo_classes(pseudo, b: int) -> torch.Tensor:
    """(H, W) pseudo-label class of image b (-1: void)."""
    lookup = torch.cat([torch.tensor([-1]), pseudo.labels[b].long()])
    return lookup[pseudo.segmentation[b].clamp_min(0)]


@pytest.mark.parametrize("source", ["separate_image", "same_batch"])
def test_cutmix_pastes_a_box_and_its_pseudo_label_from_the_source(tiny_model, source):
    """Reference CutMix (separate_image): the box lies inside the separate crop's real content, the student sees that
    crop's pixels there and learns the teacher's pseudo-label *of that crop* (a second teacher pass on the crops that
    got a box); outside the box, the image's own pixels and pseudo-label. same_batch pastes the next image instead."""
    from training.data.strong_augmentations import StrongAugmentation, StrongAugmentationConfig
    from training.data.transforms import normalize_image
    from training.ema import MeanTeacher
    from training.pseudo_labels import panoptic_pseudo_labels
    from training.student_views import StudentViewBuilder

    teacher = MeanTeacher(copy.deepcopy(tiny_model))
    calls = []
    forward = teacher.teacher.forward
    teacher.teacher.forward = lambda *a, **k: calls.append(k["pixel_values"].shape[0]) or forward(*a, **k)
    photometric_off = StrongAugmentationConfig(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                                               cutmix_prob=1.0)
    builder = StudentViewBuilder(teacher, StrongAugmentation(photometric_off), stuff_ids=[1, 2], num_classes=3,
                                 ensemble_alpha=1.0, cutmix_source=source)
    g = torch.Generator().manual_seed(3)
    weak = torch.rand(3, 3, 64, 64, generator=g) * 0.3  # dark images; the sources are bright
    sources = 0.7 + torch.rand(3, 3, 64, 64, generator=g) * 0.3
    source_mask = torch.zeros(3, 64, 64, dtype=torch.long)
    source_mask[:, :40, :48] = 1  # the sources' real content; the rest is padding
    batch = {"pixel_values": weak, "pixel_mask": torch.ones(3, 64, 64, dtype=torch.long)}
    if source == "separate_image":
        batch.update(cutmix_pixel_values=sources, cutmix_pixel_mask=source_mask)
    out = builder(batch, torch.Generator().manual_seed(0))
    assert out.cutmix_applied == 3
    pixels = out.pixel_values
    if source == "same_batch":
        assert calls == [3]
        donors, donor_images = torch.roll(torch.arange(3), -1), weak
    else:
        assert calls == [3, 3]  # the batch, then the three crops with a box
        donors, donor_images = torch.arange(3), sources
    own_pseudo = panoptic_pseudo_labels(teacher(pixel_values=normalize_image(weak)), stuff_ids=[1, 2],
                                        ensemble_alpha=1.0, image_size=(64, 64))
    donor_pseudo = own_pseudo if source == "same_batch" else panoptic_pseudo_labels(
        teacher(pixel_values=normalize_image(sources), pixel_mask=source_mask), stuff_ids=[1, 2],
        ensemble_alpha=1.0, image_size=(64, 64))
    labelled = 0
    for b in range(3):
        box = (pixels[b] - normalize_image(weak[b])).abs().amax(0) > 1e-5
        assert box.any() and not box.all()
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert int(box.sum()) == len(rows) * len(cols)  # one rectangle
        if source == "separate_image":
            assert int(rows.max()) < 40 and int(cols.max()) < 48  # inside the source's real content
        j = int(donors[b])
        torch.testing.assert_close(pixels[b][:, box], normalize_image(donor_images[j])[:, box])
        classes = _class_map(out.mask_labels[b], out.class_labels[b])
        own, donor = _pseudo_classes(own_pseudo, b), _pseudo_classes(donor_pseudo, j)
        assert torch.equal(classes[box], donor[box]) and torch.equal(classes[~box], own[~box])
        labelled += int((donor[box] >= 0).sum())
    assert labelled > 0


def test_unlabeled_items_carry_a_separate_cutmix_crop(coco_sample_dir):
    from training.data.panoptic_datasets import load_coco_panoptic
    from training.data.train_datasets import UnlabeledTrainDataset
    from training.data.transforms import ResizeShortestEdgeJitter

    ds = load_coco_panoptic(coco_sample_dir / "images", coco_sample_dir / "panoptic",
                            coco_sample_dir / "panoptic_annotations.json")
    dataset = UnlabeledTrainDataset(ds, ResizeShortestEdgeJitter(128), cutmix_source=True)
    items = [dataset[(0, seed)] for seed in range(8)]
    assert all(item["cutmix_pixel_values"].shape == (3, 128, 128) for item in items)
    assert {item["cutmix_image_id"] for item in items} == set(ds["image_id"])  # drawn at random, with replacement
    assert any(not torch.equal(i["cutmix_pixel_values"], i["pixel_values"]) for i in items)
    again = dataset[(0, 5)]
    assert torch.equal(again["cutmix_pixel_values"], items[5]["cutmix_pixel_values"])
    assert "cutmix_pixel_values" not in UnlabeledTrainDataset(ds, ResizeShortestEdgeJitter(128))[(0, 1)]


def test_separate_cutmix_crops_smaller_than_the_padded_batch(tiny_model):
    """A --crop_size that is not a multiple of 32 (48): the collator pads the batch's own crops to 64, not the separate
    CutMix crops; they are padded alike (the box stays inside their 48 x 48 content) instead of ending the run with
    'CutMix crops (1, 3, 48, 48) must match the batch (1, 3, 64, 64)'."""
    from training.data.strong_augmentations import StrongAugmentation, StrongAugmentationConfig
    from training.data.transforms import normalize_image
    from training.ema import MeanTeacher
    from training.student_views import StudentViewBuilder

    photometric_off = StrongAugmentationConfig(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0,
                                               cutmix_prob=1.0)
    builder = StudentViewBuilder(MeanTeacher(copy.deepcopy(tiny_model)), StrongAugmentation(photometric_off),
                                 stuff_ids=[1, 2], num_classes=3, ensemble_alpha=1.0, cutmix_source="separate_image")
    g = torch.Generator().manual_seed(3)
    weak = torch.zeros(2, 3, 64, 64)
    weak[:, :, :48, :48] = torch.rand(2, 3, 48, 48, generator=g) * 0.3
    mask = torch.zeros(2, 64, 64, dtype=torch.long)
    mask[:, :48, :48] = 1
    sources = 0.7 + torch.rand(2, 3, 48, 48, generator=g) * 0.3
    out = builder({"pixel_values": weak, "pixel_mask": mask, "cutmix_pixel_values": list(sources)},
                  torch.Generator().manual_seed(0))
    assert out.cutmix_applied == 2 and out.pixel_values.shape == (2, 3, 64, 64)
    for b in range(2):  # inside the images' content (the strong view fills the padding itself)
        content = out.pixel_values[b][:, :48, :48]
        box = (content - normalize_image(weak[b][:, :48, :48])).abs().amax(0) > 1e-5
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert box.any() and int(box.sum()) == len(rows) * len(cols)  # one rectangle of the source's pixels
        torch.testing.assert_close(content[:, box], normalize_image(sources[b])[:, box])
