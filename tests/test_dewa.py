"""DeWa (training/dewa.py): class-agnostic SAM targets, localization-only loss, resumable Accelerate loop, NaN guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors.torch import load_file

from modeling_dearli.image_processing_dearli import rgb_to_id
from training.data.mask_shards import MASKS_SCHEMA

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model_preset", "tiny", "--mixed_precision", "no", "--num_workers", "0", "--seed", "0"]


def _sam_records(sample_dir: Path, limit: int | None = None) -> list[dict]:
    """SAM-format records (COCO RLE + scores) whose masks are the shipped panoptic segments (crowd included)."""
    data = json.loads((sample_dir / "panoptic_annotations.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    records = []
    for ann in data["annotations"][:limit]:
        image = images[ann["image_id"]]
        id_map = rgb_to_id(np.asarray(Image.open(sample_dir / "panoptic" / ann["file_name"]).convert("RGB")))
        masks = []
        for segment in ann["segments_info"]:
            rle = mask_utils.encode(np.asfortranarray((id_map == segment["id"]).astype(np.uint8)))
            masks.append({
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
                "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "predicted_iou": 0.95, "stability_score": 0.97,
            })
        records.append({"image_id": Path(image["file_name"]).stem, "file_name": image["file_name"],
                        "height": image["height"], "width": image["width"], "num_masks": len(masks), "masks": masks})
    return records


def _write_sam_dir(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=MASKS_SCHEMA), path / "shard-r000-000000.parquet")
    return path


@pytest.fixture(scope="module")
def sam_dir(coco_sample_dir, tmp_path_factory) -> Path:
    return _write_sam_dir(tmp_path_factory.mktemp("sam") / "masks", _sam_records(coco_sample_dir))


def test_sam_dataset_gives_class_agnostic_targets(sam_dir, coco_sample_dir):
    """Every SAM mask is one class-0 target; as in the released DeWa, masks the crop leaves empty stay as (empty)
    targets, unless drop_empty_masks (--drop_empty_masks)."""
    from training.data.mask_reading import load_masks
    from training.data.train_datasets import MasksTrainDataset
    from training.data.transforms import ResizeShortestEdgeJitter

    records = load_masks(sam_dir)
    transform = ResizeShortestEdgeJitter((96, 128), 1.5, 2.0)  # 144..192 shorter side: the crop cuts masks away
    dataset = MasksTrainDataset([(records, coco_sample_dir / "images")], transform)
    item = dataset[(1, 123)]
    assert item["pixel_values"].shape == (3, 96, 128)
    assert item["mask_labels"].shape[1:] == (96, 128) and len(item["mask_labels"]) == records[1]["num_masks"]
    assert item["class_labels"].tolist() == [0] * len(item["mask_labels"])
    non_empty = item["mask_labels"].flatten(1).any(1)
    assert 5 < int(non_empty.sum()) < len(non_empty)  # some masks were cropped away and are kept, empty
    assert (item["mask_labels"] * (1 - item["pixel_mask"])).sum() == 0  # nothing in the padding
    again = dataset[(1, 123)]
    assert torch.equal(item["pixel_values"], again["pixel_values"]) and torch.equal(item["mask_labels"],
                                                                                     again["mask_labels"])
    dropping = MasksTrainDataset([(records, coco_sample_dir / "images")], transform, drop_empty_masks=True)
    dropped = dropping[(1, 123)]
    assert torch.equal(dropped["mask_labels"], item["mask_labels"][non_empty])
    assert torch.equal(dropped["pixel_values"], item["pixel_values"])


def test_localization_only_loss_ignores_classes():
    from modeling_dearli import tiny_model

    model = tiny_model(class_names=["object"], localization_only=True, seed=0).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(3, 64, 64)
    masks[0, :32], masks[1, 32:, :40], masks[2, 10:50, 30:60] = 1, 1, 1
    mask_labels = [masks, masks[:2]]
    class_labels = [torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long)]

    def loss_terms() -> dict[str, float]:
        torch.manual_seed(0)  # same loss point sampling
        out = model(pixel_values, mask_labels=mask_labels, class_labels=class_labels)
        return {k: v.item() for k, v in out.loss_dict.items()}

    before = loss_terms()
    assert all(v == 0 for k, v in before.items() if k.startswith("loss_cross_entropy"))
    with torch.no_grad():  # scramble the recognition head: matching and loss must not change
        for p in model.class_embed.parameters():
            p.add_(torch.randn_like(p))
        model.void_embedding.weight.mul_(-3.0)
    after = loss_terms()
    assert after == pytest.approx(before, rel=1e-6)
    model.set_localization_only(False)  # control: the full loss does see the class head
    full = loss_terms()
    assert full["loss_cross_entropy"] > 0


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "training" / "dewa.py"), *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_accelerate_launch_checkpoint_and_exact_resume(sam_dir, coco_sample_dir, tmp_path, check_saved_processor):
    common = [*TINY, "--masks_dir", str(sam_dir), "--image_dir", str(coco_sample_dir / "images"),
              "--train_batch_size", "2", "--crop_size", "64", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--checkpoints_total_limit", "0", "--logging_steps", "1", "--with_tracking", "--report_to", "tensorboard"]
    straight = tmp_path / "straight"
    _launch([*common, "--output_dir", str(straight)], tmp_path)
    steps = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert steps == ["step_00000002", "step_00000004"]
    assert (straight / "model.safetensors").is_file() and (straight / "config.json").is_file()
    check_saved_processor(straight, {"shortest_edge": 640, "longest_edge": 2560})  # one class-agnostic thing class
    assert list((straight / "logs").rglob("events.out.tfevents.*"))  # tensorboard, offline

    # Resume the same run from its step-2 checkpoint in another folder: it continues at step 2 and ends exactly where
    # the uninterrupted run ended (same data order, augmentation, loss point sampling, optimizer and LR state).
    resumed = tmp_path / "resumed"
    result = _launch([*common, "--output_dir", str(resumed), "--resume_from_checkpoint",
                      str(straight / "checkpoints" / "step_00000002")], tmp_path)
    assert "starting at 2" in result.stderr + result.stdout
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000004"]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    from modeling_dearli import DearliForPanopticSegmentation

    model = DearliForPanopticSegmentation.from_pretrained(straight)
    assert model.config.localization_only and model.config.class_names == ["segment,object,regular shape"]


def test_nan_loss_is_reported_and_never_checkpointed(sam_dir, coco_sample_dir, tmp_path, monkeypatch,
                                                     fresh_accelerate_state):
    from training import dewa
    from training.checkpointing import NonFiniteError

    real_build_model = dewa.build_model
    calls = {"n": 0}

    def build_model_with_nan(*args, **kwargs):
        model = real_build_model(*args, **kwargs)

        def poison(module, inputs, output):
            calls["n"] += 1
            if calls["n"] == 3:  # the third training step
                output.mask_features.fill_(float("nan"))
            return output

        model.pixel_decoder.register_forward_hook(poison)
        return model

    monkeypatch.setattr(dewa, "build_model", build_model_with_nan)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError) as error:
        dewa.main([*TINY, "--masks_dir", str(sam_dir), "--image_dir", str(coco_sample_dir / "images"),
                   "--train_batch_size", "1", "--crop_size", "48", "--max_train_steps", "5", "--checkpointing_steps",
                   "1", "--checkpoints_total_limit", "0", "--output_dir", str(out)])
    assert error.value.step == 3 and "step 3" in str(error.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert not (out / "model.safetensors").exists()
    for name in ("step_00000001", "step_00000002"):
        weights = load_file(out / "checkpoints" / name / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_tiny_model_overfits_one_image_of_sam_masks(coco_sample_dir, tmp_path, fresh_accelerate_state):
    from training import dewa

    records = _sam_records(coco_sample_dir, limit=1)
    records[0]["masks"] = [m for m in records[0]["masks"] if m["area"] > 8000]  # 4 regions: tree, grass, sky, crowd
    assert len(records[0]["masks"]) == 4
    sam_one = _write_sam_dir(tmp_path / "one", records)
    result = dewa.main([*TINY, "--masks_dir", str(sam_one), "--image_dir", str(coco_sample_dir / "images"),
                        "--train_batch_size", "1", "--crop_size", "96", "144", "--scale_augmentation", "lsj",
                        "--min_scale", "1", "--max_scale", "1", "--flip_prob", "0", "--color_augmentation", "none",
                        "--learning_rate", "0.001", "--max_train_steps", "90",
                        "--checkpointing_steps", "0", "--logging_steps", "1", "--output_dir", str(tmp_path / "out")])
    losses = [h["train/loss"] for h in result.history]
    assert len(losses) == 90
    start, end = np.mean(losses[:3]), np.mean(losses[-5:])
    assert end < 0.4 * start, (start, end)  # measured: about 22 -> 5
    assert all(h["train/loss_cross_entropy"] == 0 for h in result.history)
