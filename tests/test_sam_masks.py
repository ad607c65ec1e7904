"""Class-agnostic SAM masks: generation, resume, sharding, loading, DeWa targets."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

import training.data.mask_generation as mask_generation
from training.data.mask_generation import generate_masks
from training.data.mask_reading import decode_masks, load_masks, masks_index, masks_to_targets
from training.data.package_data import COCO_PANOPTIC_SAMPLE
from training.data.sam_models import SamGeneratorConfig, build_sam

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = COCO_PANOPTIC_SAMPLE.images

# Random weights: no mask passes SAM's quality thresholds, so they are off; no box NMS keeps every point's 3 masks.
TINY = SamGeneratorConfig(
    model_type="vit_tiny",
    points_per_side=2,
    points_per_batch=3,  # two point batches per image
    pred_iou_thresh=0.0,
    stability_score_thresh=0.0,
    box_nms_thresh=1.0,
)
GOOD_IDS = ["000000142238", "000000439180", "gray"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """The two shipped COCO images, a small grayscale PNG made from one, and a truncated (unreadable) JPEG."""
    folder = tmp_path_factory.mktemp("images")
    for path in sorted(SAMPLE_IMAGES.glob("*.jpg")):
        shutil.copy(path, folder / path.name)
    first = sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]
    Image.open(first).convert("L").crop((100, 50, 260, 170)).save(folder / "gray.png")
    (folder / "broken.jpg").write_bytes(first.read_bytes()[:2000])
    return folder


@pytest.fixture(scope="module")
def generated(tmp_path_factory, image_dir, tiny_sam_checkpoint):
    out = tmp_path_factory.mktemp("sam_out")
    stats = generate_masks(
        image_dir, out, tiny_sam_checkpoint, config=TINY, device="cpu", shard_size=2, process_index=0, num_processes=1
    )
    return out, stats


def _load(out: Path, tmp_path: Path) -> datasets.Dataset:
    return load_masks(out, cache_dir=tmp_path / "hf_cache")


def test_generation_writes_parquet_shards_with_decodable_rles(generated, image_dir, tmp_path):
    out, stats = generated
    assert (stats.num_images, stats.num_failed, stats.num_skipped) == (3, 1, 0)
    assert stats.num_masks == 3 * 4 * 3  # 4 points x 3 multimask outputs, nothing filtered
    assert sorted(p.name for p in out.glob("*.parquet")) == ["shard-r000-000000.parquet", "shard-r000-000001.parquet"]
    assert not list(out.glob("*.tmp"))

    # Plain datasets reads the shards directly; load_masks is the same thing.
    raw = datasets.load_dataset(
        "parquet", data_files=str(out / "shard-*.parquet"), split="train", cache_dir=str(tmp_path / "raw_cache")
    )
    dataset = _load(out, tmp_path)
    assert sorted(raw["image_id"]) == sorted(dataset["image_id"]) == GOOD_IDS
    assert set(masks_index(dataset)) == set(GOOD_IDS)

    for record in dataset:
        with Image.open(image_dir / record["file_name"]) as image:
            width, height = image.size
        assert (record["height"], record["width"]) == (height, width)
        assert record["num_masks"] == len(record["masks"]) == 12
        dense = decode_masks(record)
        assert dense.shape == (12, height, width)
        for mask, ann in zip(dense, record["masks"]):
            assert list(ann["segmentation"]["size"]) == [height, width]
            assert ann["area"] == int(mask.sum())
            if ann["area"]:
                ys, xs = np.nonzero(mask)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
            assert 0.0 <= ann["stability_score"] <= 1.0
    assert any(0 < m["area"] < record["height"] * record["width"] for r in dataset for m in r["masks"])

    failures = [json.loads(line) for line in (out / "failures-r000.jsonl").read_text().splitlines()]
    assert [f["image_id"] for f in failures] == ["broken"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_images"], manifest["num_masks"], manifest["num_failed"]) == (3, 36, 1)
    assert manifest["config"]["model_type"] == "vit_tiny"
    assert [s["num_images"] for s in manifest["shards"]] == [2, 1]


def test_stored_masks_equal_segment_anything_output(generated, image_dir, tiny_sam_checkpoint, tmp_path):
    """Independent reference: SamAutomaticMaskGenerator with dense binary masks on the same image."""
    out, _ = generated
    record = next(r for r in _load(out, tmp_path) if r["image_id"] == "000000439180")
    sam = build_sam("vit_tiny", tiny_sam_checkpoint)
    kwargs = {**TINY.generator_kwargs(), "output_mode": "binary_mask"}
    image = np.asarray(Image.open(image_dir / "000000439180.jpg").convert("RGB"))
    reference = SamAutomaticMaskGenerator(sam, **kwargs).generate(image)
    assert len(reference) == record["num_masks"]
    np.testing.assert_array_equal(decode_masks(record), np.stack([r["segmentation"] for r in reference]))
    for ref, ann in zip(reference, record["masks"]):
        assert ann["bbox"] == pytest.approx(ref["bbox"])
        assert ann["predicted_iou"] == pytest.approx(ref["predicted_iou"], abs=1e-6)
        assert ann["stability_score"] == pytest.approx(ref["stability_score"], abs=1e-6)


def test_rerun_skips_done_and_failed_images_without_loading_sam(generated, image_dir, tiny_sam_checkpoint, monkeypatch):
    out, _ = generated
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}

    def no_model(*args, **kwargs):
        raise AssertionError("SAM must not be loaded when every image is done")

    monkeypatch.setattr(mask_generation, "build_sam", no_model)
    stats = generate_masks(image_dir, out, tiny_sam_checkpoint, config=TINY, process_index=0, num_processes=1)
    assert (stats.num_images, stats.num_failed, stats.num_skipped) == (0, 0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before

    # Other mask-changing settings are refused in the same folder (points_per_batch does not change masks).
    with pytest.raises(ValueError, match="other settings"):
        other = SamGeneratorConfig(model_type="vit_tiny")
        generate_masks(image_dir, out, tiny_sam_checkpoint, config=other, process_index=0, num_processes=1)
    monkeypatch.undo()
    retry = generate_masks(
        image_dir, out, tiny_sam_checkpoint, config=TINY, retry_failed=True, process_index=0, num_processes=1
    )
    assert (retry.num_images, retry.num_failed, retry.num_skipped) == (0, 1, 3)
    assert json.loads((out / "manifest.json").read_text())["num_failed"] == 1


def test_interrupted_run_resumes_without_duplicates(generated, image_dir, tiny_sam_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write = mask_generation.write_shard
    calls = []

    def dying_write(records, path):
        calls.append(path.name)
        if len(calls) == 2:  # the process dies while writing its second shard
            path.with_name(path.name + ".tmp").write_bytes(b"half a parquet file")
            raise KeyboardInterrupt("killed")
        real_write(records, path)

    monkeypatch.setattr(mask_generation, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate_masks(image_dir, out, tiny_sam_checkpoint, config=TINY, shard_size=1, process_index=0, num_processes=1)
    assert [p.name for p in out.glob("*.parquet")] == ["shard-r000-000000.parquet"]
    assert len(_load(out, tmp_path)) == 1  # the half-written shard is invisible

    monkeypatch.undo()
    stats = generate_masks(
        image_dir, out, tiny_sam_checkpoint, config=TINY, shard_size=1, process_index=0, num_processes=1, progress=False
    )
    assert (stats.num_images, stats.num_failed, stats.num_skipped) == (2, 1, 1)
    assert not list(out.glob("*.tmp"))
    resumed = _load(out, tmp_path)
    assert sorted(resumed["image_id"]) == GOOD_IDS  # each image exactly once
    clean = {r["image_id"]: r for r in _load(generated[0], tmp_path)}
    for record in resumed:  # same masks as the uninterrupted run
        assert record["masks"] == clean[record["image_id"]]["masks"]


def test_processes_split_images_into_distinct_shards(image_dir, tiny_sam_checkpoint, tmp_path):
    out = tmp_path / "out"
    seen = []
    for rank in (0, 1):
        stats = generate_masks(
            image_dir, out, tiny_sam_checkpoint, config=TINY, process_index=rank, num_processes=2, progress=False
        )
        seen.append(stats.num_images + stats.num_failed)
    assert seen == [2, 2]
    assert sorted(p.name for p in out.glob("*.parquet")) == ["shard-r000-000000.parquet", "shard-r001-000000.parquet"]
    dataset = _load(out, tmp_path)
    assert sorted(dataset["image_id"]) == GOOD_IDS
    ordered = ["000000142238", "000000439180", "broken", "gray"]  # sorted files; process i takes i::2
    rank0 = _load_one(out / "shard-r000-000000.parquet")
    assert rank0 == [i for i in ordered[0::2] if i != "broken"]


def _load_one(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()


def test_hf_dataset_source_with_corrupt_image(tiny_sam_checkpoint, tmp_path):
    first = sorted(SAMPLE_IMAGES.glob("*.jpg"))[0]
    images = [{"bytes": first.read_bytes(), "path": None}, {"bytes": b"not an image", "path": None}]
    source = datasets.Dataset.from_dict({"id": [139, 7], "image": images}).cast_column("image", datasets.Image())
    out = tmp_path / "out"
    stats = generate_masks(source, out, tiny_sam_checkpoint, config=TINY, process_index=0, num_processes=1)
    assert (stats.num_images, stats.num_failed) == (1, 1)
    record = _load(out, tmp_path)[0]
    assert record["image_id"] == "139"
    assert decode_masks(record).shape[1:] == (427, 640)  # (height, width) of the first sample image
    assert json.loads((out / "failures-r000.jsonl").read_text())["image_id"] == "7"


def _record_from_masks(masks: np.ndarray) -> dict:
    height, width = masks.shape[1:]
    anns = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m))
        anns.append({"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "area": int(m.sum())})
    return {"image_id": "x", "height": height, "width": width, "masks": anns}


def test_targets_are_class_agnostic_overlapping_and_unfiltered():
    masks = np.zeros((4, 6, 8), dtype=np.uint8)
    masks[0, :4, :5] = 1  # large
    masks[1, 2:6, 3:8] = 1  # overlaps mask 0
    masks[2, 5, 7] = 1  # a single pixel: no area filter
    record = _record_from_masks(masks)  # mask 3 is empty

    mask_labels, class_labels = masks_to_targets(record)
    assert mask_labels.dtype == torch.float32 and class_labels.dtype == torch.long
    torch.testing.assert_close(mask_labels, torch.from_numpy(masks[:3]).float())
    assert class_labels.tolist() == [0, 0, 0]
    assert (mask_labels.sum(0) > 1).any()  # overlaps kept

    kept, labels = masks_to_targets(record, drop_empty=False)
    assert kept.shape == (4, 6, 8) and labels.shape == (4,)

    cropped, labels = masks_to_targets(record, transform=lambda m: m[:, :2, :3])  # crop hook
    torch.testing.assert_close(cropped, torch.from_numpy(masks[:1, :2, :3]).float())  # masks 1, 2 cropped away
    assert labels.tolist() == [0]

    resized, _ = masks_to_targets(record, size=(12, 16))
    upsampled = torch.from_numpy(masks[:3]).float().repeat_interleave(2, 1).repeat_interleave(2, 2)
    torch.testing.assert_close(resized, upsampled)


def test_targets_from_generated_record(generated, tmp_path):
    record = next(iter(_load(generated[0], tmp_path)))
    mask_labels, class_labels = masks_to_targets(record, drop_empty=False)
    assert mask_labels.shape == (record["num_masks"], record["height"], record["width"])
    torch.testing.assert_close(mask_labels, torch.from_numpy(decode_masks(record)).float())
    assert torch.equal(class_labels, torch.zeros(record["num_masks"], dtype=torch.long))


def test_real_registry_loads_random_vit_b_checkpoint(tiny_sam_checkpoint, tmp_path):
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(reference.state_dict(), path)
    del reference
    loaded = build_sam("vit_b", path)
    state = torch.load(path, weights_only=True)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    assert loaded.image_encoder.img_size == 1024 and len(loaded.image_encoder.blocks) == 12

    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        build_sam("vit_h", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="does not fit --model_type vit_b: .* image_encoder.pos_embed"):
        build_sam("vit_b", tiny_sam_checkpoint)  # a checkpoint of another model type: one line, not a 168-line dump
    with pytest.raises(ValueError, match="Unknown SAM model type"):
        build_sam("vit_x", path)


def test_cli(image_dir, tiny_sam_checkpoint, tmp_path, load_script, capsys):
    out = tmp_path / "out"
    argv = [
        "--image_dir", str(image_dir),
        "--sam_checkpoint", str(tiny_sam_checkpoint),
        "--model_type", "vit_tiny",
        "--points_per_side", "2",
        "--pred_iou_thresh", "0",
        "--stability_score_thresh", "0",
        "--output_dir", str(out),
        "--device", "cpu",
        "--shard_size", "2",
        "--max_images", "2",
    ]  # fmt: skip
    assert load_script("generate_sam_masks").main(argv) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "masks/s" in printed
    assert sorted(_load(out, tmp_path)["image_id"]) == GOOD_IDS[:2]


def test_folders_with_the_earlier_settings_file_name_are_still_checked(tmp_path):
    """A masks folder written with ``sam_config.json`` (the earlier name) keeps guarding its settings: other settings
    are refused, the same ones accepted without writing a second settings file."""
    from training.data.mask_shards import CONFIG_FILE, EARLIER_CONFIG_FILE, check_config

    (tmp_path / EARLIER_CONFIG_FILE).write_text(json.dumps(TINY.identity()))
    check_config(tmp_path, TINY, write=True)
    assert not (tmp_path / CONFIG_FILE).exists()
    with pytest.raises(ValueError, match="other settings"):
        check_config(tmp_path, SamGeneratorConfig(model_type="vit_tiny", points_per_side=3), write=True)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    check_config(fresh, TINY, write=True)
    assert json.loads((fresh / CONFIG_FILE).read_text()) == TINY.identity()
