"""Plain supervised fine-tuning with `transformers.Trainer`: the collator's batches train the model."""

from __future__ import annotations

import math

import torch
from transformers import Trainer, TrainingArguments

from training.data.collator import DearliDataCollator


def test_trainer_runs_a_few_steps_with_finite_loss(coco_sample_dir, tmp_path):
    from modeling_dearli import tiny_model
    from training.data.class_names import load_class_names
    from training.data.panoptic_datasets import load_coco_panoptic
    from training.data.train_datasets import PanopticTrainDataset
    from training.data.transforms import LargeScaleJitter

    class_names = load_class_names("coco_panoptic")
    rows = load_coco_panoptic(coco_sample_dir / "images", coco_sample_dir / "panoptic",
                              coco_sample_dir / "panoptic_annotations.json", class_names=class_names)
    dataset = PanopticTrainDataset(rows, LargeScaleJitter((64, 96), 0.2, 1.0))
    model = tiny_model(class_names=list(class_names.names), thing_ids=class_names.thing_ids, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        weight_decay=0.05,
        max_grad_norm=0.01,
        lr_scheduler_type="polynomial",
        label_names=["mask_labels", "class_labels"],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=DearliDataCollator())
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert trainer.state.global_step == 3 and len(losses) == 3
    assert all(math.isfinite(v) for v in losses) and math.isfinite(result.training_loss)

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable  # only the decoder moved; the frozen CLIP towers did not
    assert not any(n.startswith("backbone.") for n in changed)
