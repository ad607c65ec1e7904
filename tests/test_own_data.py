"""Your own data, start to finish (README "Training on your own data"): a small dataset made here (three classes of
its own, 192x160 images, a few labeled in COCO panoptic format, a plain folder of unannotated images with one broken
file), then the commands the README lists, in its order, on the shipped tiny CLIP: supervised baseline ->
unsupervised masks -> DeWa -> SSL -> evaluate (α sweep) -> predict (scored with evaluate_panoptic.py) -> the web
demo's segmenter. A few steps each; the outcomes are checked, not the quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from training.miniature.tiny_clip import SHIPPED_CONFIG, SHIPPED_WEIGHTS

WIDTH, HEIGHT = 192, 160
# category id -> (names with synonyms, isthing); ids need not be contiguous
CLASSES = {3: ("red disc,red circle", 1), 8: ("blue square,blue box", 1), 21: ("sand,beach", 0)}
FIRST_NAMES = {"red disc", "blue square", "sand"}
TINY_CLIP = ["--clip_model_name", str(SHIPPED_CONFIG), "--clip_pretrained", str(SHIPPED_WEIGHTS)]
FEW_STEPS = ["--max_train_steps", "3", "--train_batch_size", "2", "--crop_size", "128", "--num_workers", "0",
             "--seed", "0", "--checkpointing_steps", "0", "--logging_steps", "1"]
EVAL_SIZE = ["--eval_shortest_edge", "160", "--eval_longest_edge", "192"]


def _scene(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """An image (sand with one to three red discs and blue squares), its segment-id map and segments."""
    image = Image.new("RGB", (WIDTH, HEIGHT), tuple(int(v) for v in rng.integers([200, 170, 110], [230, 200, 140])))
    ids = Image.new("I", (WIDTH, HEIGHT), 1)
    segments = [{"id": 1, "category_id": 21}]
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    for k in range(int(rng.integers(1, 4))):
        category = 3 if k % 2 == 0 else 8
        size = int(rng.integers(28, 48))
        x, y = int(rng.integers(0, WIDTH - size)), int(rng.integers(0, HEIGHT - size))
        box = (x, y, x + size, y + size)
        colour = (int(rng.integers(190, 240)), 30, 30) if category == 3 else (30, 40, int(rng.integers(190, 240)))
        shape = draw.ellipse if category == 3 else draw.rectangle
        shape(box, fill=colour)
        (draw_ids.ellipse if category == 3 else draw_ids.rectangle)(box, fill=k + 2)
        segments.append({"id": k + 2, "category_id": category})
    id_map = np.asarray(ids, dtype=np.int64)
    kept = []
    for s in segments:
        mask = id_map == s["id"]
        if mask.any():  # a later object may cover an earlier one completely
            rows, cols = np.nonzero(mask)
            kept.append({**s, "iscrowd": 0, "area": int(mask.sum()),
                         "bbox": [int(cols.min()), int(rows.min()), int(np.ptp(cols)) + 1, int(np.ptp(rows)) + 1]})
    return image, id_map, kept


def _write_split(root: Path, names: list[str], rng: np.random.Generator) -> dict[str, Path]:
    """A COCO panoptic folder: images/, panoptic/ (segment ids as RGB), panoptic.json."""
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    images, annotations = [], []
    for image_id, name in enumerate(names, start=1):
        image, id_map, segments = _scene(rng)
        image.save(root / "images" / f"{name}.jpg", quality=95)
        rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": WIDTH, "height": HEIGHT})
        annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments})
    categories = [{"id": c, "name": n.split(",")[0], "isthing": t} for c, (n, t) in CLASSES.items()]
    (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                    "categories": categories}))
    return {"images": root / "images", "panoptic": root / "panoptic", "json": root / "panoptic.json"}


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own_data")
    rng = np.random.default_rng(0)
    data = {"train": _write_split(root / "train", [f"photo_{i:02d}" for i in range(6)], rng),
            "val": _write_split(root / "val", [f"val_{i:02d}" for i in range(3)], rng)}
    unlabeled = root / "unlabeled"
    (unlabeled / "day2").mkdir(parents=True)
    for i in range(5):
        _scene(rng)[0].save(unlabeled / ("day2" if i % 2 else "") / f"frame_{i:03d}.png")
    (unlabeled / "broken.jpg").write_bytes(b"not an image at all")
    (root / "class_names.txt").write_text("".join(f"{c}:{n}\n" for c, (n, _) in CLASSES.items()))
    (root / "labeled.txt").write_text("photo_00.jpg\nphoto_02.jpg\nphoto_04.jpg\nphoto_05.jpg\n")
    return {"root": root, "unlabeled": unlabeled, "class_names": root / "class_names.txt",
            "labeled": root / "labeled.txt", **{f"{s}_{k}": v for s in data for k, v in data[s].items()}}


def _data_args(d: dict[str, Path]) -> list[str]:
    return ["--dataset_name", "custom", "--class_names_file", str(d["class_names"]),
            "--train_images_dir", str(d["train_images"]), "--train_panoptic_dir", str(d["train_panoptic"]),
            "--train_annotations", str(d["train_json"]), "--val_images_dir", str(d["val_images"]),
            "--val_panoptic_dir", str(d["val_panoptic"]), "--val_annotations", str(d["val_json"]), "--eval_steps", "0"]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_partition_file_and_unlabeled_folder(own_data):
    """--partition FILE labels the listed images; the rest and the folder's readable images are the unlabeled set,
    the broken file counted once in the log."""
    from training.arguments import load_panoptic_training_data, parse_args

    args = parse_args("ssl", [*_data_args(own_data), "--output_dir", "unused", "--partition", str(own_data["labeled"]),
                              "--unlabeled_images_dir", str(own_data["unlabeled"])])
    data = load_panoptic_training_data(args)
    assert sorted(data.labeled["file_name"]) == ["photo_00.jpg", "photo_02.jpg", "photo_04.jpg", "photo_05.jpg"]
    assert data.unlabeled["file_name"] == ["photo_01.jpg", "photo_03.jpg", "day2/frame_001.png", "day2/frame_003.png",
                                           "frame_000.png", "frame_002.png", "frame_004.png"]
    assert data.unlabeled["image_id"][2] == "day2/frame_001"
    assert [names.split(",")[0] for names in data.class_names.names] == ["red disc", "blue square", "sand"]
    assert data.class_names.thing_ids == [0, 1] and len(data.validation) == 3


def test_labeled_keys_from_a_file_a_folder_or_a_shipped_name(tmp_path):
    from training.data.partitions import labeled_keys

    (tmp_path / "mine.txt").write_text("a/photo_1.jpg\n\nphoto_2.png ann/photo_2.png\n17\n")
    assert labeled_keys(tmp_path / "mine.txt") == ["photo_1", "photo_2", "17"]
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "labeled.txt").write_text("x.jpg\n")
    assert labeled_keys(tmp_path / "split") == ["x"]
    assert len(labeled_keys("1_128", "ade20k")) == 158
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        labeled_keys(tmp_path / "missing.txt", "ade20k")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="lists no image"):
        labeled_keys(tmp_path / "empty.txt")


def test_ssl_needs_unlabeled_data(own_data, capsys):
    from training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args("ssl", [*_data_args(own_data), "--output_dir", "unused"])
    assert "--unlabeled_images_dir" in capsys.readouterr().err


@pytest.mark.slow
def test_own_data_start_to_finish(own_data, tmp_path, load_script, caplog):
    from training import dewa, ssl, supervised
    from training.evaluation.segmenter import load_segmenter

    d = own_data
    data = _data_args(d)
    runs = tmp_path / "runs"

    # 1. supervised baseline on the labeled images of the partition file
    result = supervised.main(["--config", "miniature_supervised", *data, *TINY_CLIP, *FEW_STEPS, *EVAL_SIZE,
                              "--partition", str(d["labeled"]), "--output_dir", str(runs / "supervised")])
    _reset_accelerate()
    assert result.final_step == 3 and 0.0 <= result.metrics["eval/PQ"] <= 100.0

    # 2. unsupervised class-agnostic masks of the labeled images and of the unlabeled folder (its broken file skipped)
    masks = load_script("generate_sam_masks")
    common = ["--mask_source", "felzenszwalb", "--no_progress"]
    assert masks.main([*common, "--image_dir", str(d["train_images"]), "--output_dir", str(runs / "masks_l")]) == 0
    assert masks.main([*common, "--image_dir", str(d["unlabeled"]), "--output_dir", str(runs / "masks_u"),
                       "--allow_skips"]) == 0
    assert json.loads((runs / "masks_u" / "manifest.json").read_text())["num_images"] == 5
    _reset_accelerate()

    # 3. DeWa on all masks
    result = dewa.main(["--config", "miniature_dewa", *TINY_CLIP, *FEW_STEPS, "--masks_dir", str(runs / "masks_l"),
                        str(runs / "masks_u"), "--image_dir", str(d["train_images"]), str(d["unlabeled"]),
                        "--output_dir", str(runs / "dewa")])
    _reset_accelerate()
    assert result.final_step == 3 and (runs / "dewa" / "model.safetensors").is_file()

    # 4. SSL from DeWa: the partition file's labeled images, the rest and the unlabeled folder as unlabeled data
    with caplog.at_level("WARNING", logger="training.data.unlabeled_images"):
        result = ssl.main(["--config", "miniature_ssl", *data, *TINY_CLIP, *FEW_STEPS, *EVAL_SIZE,
                           "--unlabeled_batch_size", "2", "--partition", str(d["labeled"]),
                           "--unlabeled_images_dir", str(d["unlabeled"]), "--init_from", str(runs / "dewa"),
                           "--ema_decay", "auto", "--output_dir", str(runs / "ssl")])
    _reset_accelerate()
    assert "skipped 1 file(s)" in caplog.text and "broken.jpg" in caplog.text
    assert result.final_step == 3 and 0.0 <= result.metrics["eval/student/PQ"] <= 100.0
    model_dir = runs / "ssl"
    config = json.loads((model_dir / "config.json").read_text())
    assert [n.split(",")[0] for n in config["class_names"]] == ["red disc", "blue square", "sand"]

    # 5. choose α on held-out labeled images
    evaluate = load_script("evaluate")
    report_file = runs / "alpha_sweep.json"
    assert evaluate.main(["--model_name_or_path", str(model_dir), "--dataset", "custom",
                          "--images_dir", str(d["val_images"]), "--gt_json", str(d["val_json"]),
                          "--gt_folder", str(d["val_panoptic"]), "--ensemble_alpha", "1.0", "0.6", "0.0",
                          "--device", "cpu", "--no_progress", "--output", str(report_file)]) == 0
    _reset_accelerate()
    sweep = json.loads(report_file.read_text())
    assert [r["ensemble_alpha"] for r in sweep["reports"]] == [1.0, 0.6, 0.0]
    assert all(r["num_images"] == 3 and 0.0 <= r["All"]["pq"] <= 1.0 for r in sweep["reports"])
    assert sweep["best_ensemble_alpha"] == max(sweep["reports"], key=lambda r: r["All"]["pq"])["ensemble_alpha"]

    # 6. predict in the dataset's ids, scored by evaluate_panoptic.py
    predict = load_script("predict")
    predictions = runs / "predictions"
    assert predict.main([str(d["val_images"]), "--model_name_or_path", str(model_dir), "--output_dir",
                         str(predictions), "--gt_json", str(d["val_json"]), "--ensemble_alpha",
                         str(sweep["best_ensemble_alpha"]), "--device", "cpu", "--num_workers", "0"]) == 0
    written = json.loads((predictions / "predictions.json").read_text())
    assert sorted(a["image_id"] for a in written["annotations"]) == [1, 2, 3]
    assert {s["category_id"] for a in written["annotations"] for s in a["segments_info"]} <= set(CLASSES)
    per_image = json.loads((predictions / "val_00.json").read_text())
    assert per_image["segments_info"] and {s["label"] for s in per_image["segments_info"]} <= FIRST_NAMES
    scored = runs / "scored.json"
    assert load_script("evaluate_panoptic").main(
        ["--gt_json", str(d["val_json"]), "--gt_folder", str(d["val_panoptic"]), "--pred_json",
         str(predictions / "predictions.json"), "--pred_folder", str(predictions), "--no_progress",
         "--output", str(scored)]) == 0
    assert 0.0 <= json.loads(scored.read_text())["All"]["pq"] <= 1.0

    # 7. the web demo's segmenter on an unlabeled image, with the user's class names
    segmenter = load_segmenter(model_dir, device="cpu")
    decoder_only, ensembled = segmenter.predict(d["unlabeled"] / "frame_000.png", "panoptic", [1.0, 0.6])
    assert ensembled.picture.width == WIDTH and ensembled.result.segments
    assert {s.label for s in ensembled.result.segments} <= FIRST_NAMES
