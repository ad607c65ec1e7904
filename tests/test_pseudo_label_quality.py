"""The SSL loop's pseudo-label monitor: what it reports is the quality of the pseudo-labels the training uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def sample_rows(coco_sample_dir, trained_tiny_model_dir):
    from modeling_dearli import DearliForPanopticSegmentation
    from training.data.panoptic_datasets import (
        load_class_names,
        load_coco_panoptic,
        restrict_to_present_classes,
    )

    names = load_class_names("coco_panoptic")
    rows = load_coco_panoptic(coco_sample_dir / "images", coco_sample_dir / "panoptic",
                              coco_sample_dir / "panoptic_annotations.json", class_names=names)
    rows, present, _ = restrict_to_present_classes(rows, names)
    model = DearliForPanopticSegmentation.from_pretrained(trained_tiny_model_dir).eval()
    assert list(model.config.class_names) == list(present.names)
    return rows, present, model


def test_monitor_scores_the_pseudo_labels_of_the_training_path(sample_rows, tmp_path):
    """The monitor's ``pseudo_labels/PQ`` equals the PQ of the teacher's pseudo-labels made by the training's own
    labelling function (StudentViewBuilder.pseudo_labels: weak view in [0, 1] with its pixel mask -> hard labels) on
    the same unaugmented images, each at its own size (padded to the model's multiple as in training)."""
    from accelerate import Accelerator

    from training.data.collator import DearliDataCollator
    from training.data.strong_augmentations import StrongAugmentation
    from training.ema import MeanTeacher
    from training.evaluation.panoptic_quality import PanopticQuality
    from training.evaluation.pseudo_label_quality import PseudoLabelMonitor
    from training.evaluation.validation import PanopticEvalDataset
    from training.student_views import StudentViewBuilder

    rows, class_names, model = sample_rows
    teacher = MeanTeacher(model)
    views = StudentViewBuilder(teacher, StrongAugmentation(), stuff_ids=model.config.stuff_ids,
                               num_classes=model.config.num_classes, ensemble_alpha=0.6, threshold=0.0,
                               overlap_threshold=0.8)
    size = 128
    monitor = PseudoLabelMonitor(Accelerator(cpu=True), rows, class_names, teacher.teacher, model,
                                 ensemble_alpha=0.6, threshold=0.0, overlap_threshold=0.8, shortest_edge=size,
                                 longest_edge=None, num_images=4, output_dir=tmp_path)
    reported = monitor(7)

    metric = PanopticQuality.from_class_names(model.config.class_names, model.config.thing_ids)
    items = PanopticEvalDataset(rows, size, None, with_semantic=False, class_names=class_names)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (items.processor.image_mean, items.processor.image_std))
    for i in range(len(items)):
        batch = DearliDataCollator()([items[i]])
        pseudo = views.pseudo_labels(batch["pixel_values"] * std + mean, batch["pixel_mask"])
        h, w = (int(v) for v in batch["pixel_mask"][0].nonzero().amax(0) + 1)
        labels = torch.nn.functional.interpolate(pseudo.segmentation[:, None, :h, :w].float(),
                                                 size=batch["target_size"][0], mode="nearest")[0, 0].long()
        segments = [{"id": k + 1, "category_id": int(c)} for k, c in enumerate(pseudo.labels[0])]
        metric.update(labels.clamp_min(0).numpy(), segments, np.asarray(batch["gt_id_map"][0]),
                      batch["gt_segments"][0])
    expected = metric.compute()
    assert 0 < reported["pseudo_labels/PQ"] <= 100
    assert reported["pseudo_labels/PQ"] == pytest.approx(100 * expected["All"]["pq"], abs=1.0)
    assert reported["pseudo_labels/PQ_th"] == pytest.approx(100 * expected["Things"]["pq"], abs=1.5)
    # The teacher is the student here: the decoder-only scores of both agree.
    assert reported["pseudo_labels_decoder_only/PQ"] == pytest.approx(reported["student_decoder_only/PQ"])
    assert reported["pseudo_labels_decoder_only/PQ"] != pytest.approx(reported["pseudo_labels/PQ"])
    lines = [json.loads(line) for line in (tmp_path / "pseudo_label_quality.jsonl").read_text().splitlines()]
    assert lines == [{"step": 7, "images": 2, **reported}]


def test_monitor_refuses_unlabeled_images_without_ground_truth(sample_rows):
    from accelerate import Accelerator

    from training.evaluation.pseudo_label_quality import PseudoLabelMonitor

    rows, class_names, model = sample_rows
    with pytest.raises(ValueError, match="ground truth of the unlabeled images"):
        PseudoLabelMonitor(Accelerator(cpu=True), rows.remove_columns(["panoptic"]), class_names, model, model,
                           ensemble_alpha=0.6, threshold=0.0, overlap_threshold=0.8, shortest_edge=96,
                           longest_edge=None)
