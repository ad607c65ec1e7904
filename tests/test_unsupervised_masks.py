"""Class-agnostic masks without labels (Felzenszwalb, scikit-image) behind the SAM masks' shard format: the records
decode to the algorithm's segments, the generation script writes them, and DeWa trains on them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.mask_generation import generate_masks
from training.data.mask_reading import decode_masks, load_masks
from training.data.unsupervised_masks import FelzenszwalbConfig, FelzenszwalbMaskGenerator, segments_to_annotations
from training.miniature import world as W


@pytest.fixture(scope="module")
def world_images(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, list[dict]]]]:
    """Four miniature-world scenes (never panoptic images of a world: the CLIP evaluation stream) as PNG files, with
    their ground-truth id maps."""
    folder = tmp_path_factory.mktemp("images")
    truth = {}
    for k in range(4):
        rng = W.scene_rng(7, "clip_eval", 99, k)
        image, ids, segments = W.render_scene(W.sample_scene(rng), rng)
        Image.fromarray(image).save(folder / f"scene_{k}.png")
        truth[f"scene_{k}"] = (ids, segments)
    return folder, truth


def test_annotations_decode_to_the_segments_largest_first_without_scores():
    labels = np.zeros((20, 30), np.int64)
    labels[2:12, 3:9] = 4  # 60 px
    labels[15:17, 0:3] = 9  # 6 px: below min_area
    annotations = segments_to_annotations(labels, min_area=10)
    record = {"height": 20, "width": 30, "masks": annotations}
    masks = decode_masks(record)
    assert len(annotations) == 2 and [a["area"] for a in annotations] == [600 - 66, 60]
    np.testing.assert_array_equal(masks[0], labels == 0)
    np.testing.assert_array_equal(masks[1], labels == 4)
    assert annotations[1]["bbox"] == [3.0, 2.0, 6.0, 10.0]
    assert all(math.isnan(a["predicted_iou"]) and math.isnan(a["stability_score"]) for a in annotations)


def test_felzenszwalb_shards_find_the_objects_and_refuse_other_settings(world_images, tmp_path):
    folder, truth = world_images
    out = tmp_path / "masks"
    stats = generate_masks(folder, out, mask_generator=FelzenszwalbMaskGenerator(), progress=False,
                               process_index=0, num_processes=1)
    assert stats.num_images == 4 and stats.num_masks > 4 * 4
    records = load_masks(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 4 and manifest["config"]["mask_source"] == "felzenszwalb"
    recalled, total = 0, 0
    for record in records:
        masks = decode_masks(record).astype(bool)
        assert masks.shape[1:] == (record["height"], record["width"]) == (256, 256)
        assert masks.sum(0).max() == 1  # a partition (minus the dropped fragments)
        assert masks.sum((1, 2)).min() >= FelzenszwalbConfig().min_area
        ids, segments = truth[record["image_id"]]
        for segment in segments:
            gt = ids == segment["id"]
            iou = (masks & gt).sum((1, 2)) / (masks | gt).sum((1, 2))
            recalled += int(iou.max() > 0.5)
            total += 1
    assert recalled / total >= 0.6  # measured 0.75 (things) / 0.97 (stuff) on 40 scenes
    with pytest.raises(ValueError, match="other settings"):
        generate_masks(folder, out, mask_generator=FelzenszwalbMaskGenerator(FelzenszwalbConfig(scale=100)),
                           progress=False, process_index=0, num_processes=1)


def test_script_writes_masks_that_dewa_trains_on(world_images, tmp_path, load_script, fresh_accelerate_state):
    from training import dewa

    folder, _ = world_images
    module = load_script("generate_sam_masks")
    with pytest.raises(SystemExit):  # SAM needs its checkpoint
        module.parse_args(["--image-dir", str(folder), "--output-dir", str(tmp_path / "x")])
    module.main(["--mask_source", "felzenszwalb", "--image-dir", str(folder), "--output-dir", str(tmp_path / "masks"),
                 "--no-progress"])
    assert len(load_masks(tmp_path / "masks")) == 4
    result = dewa.main(["--model_preset", "tiny", "--mixed_precision", "no", "--num_workers", "0", "--seed", "0",
                        "--masks_dir", str(tmp_path / "masks"), "--image_dir", str(folder),
                        "--output_dir", str(tmp_path / "dewa"), "--max_train_steps", "2", "--train_batch_size", "2",
                        "--crop_size", "128", "--checkpointing_steps", "0", "--logging_steps", "1"])
    assert result.final_step == 2 and math.isfinite(result.last_loss)
    assert (tmp_path / "dewa" / "model.safetensors").is_file()
