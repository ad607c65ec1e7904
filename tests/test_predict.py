"""scripts/predict.py on the shipped sample images (plus a corrupt file) with a tiny model, and the overlay library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_dearli.image_processing_dearli import rgb_to_id
from training.data.package_data import COCO_PANOPTIC_SAMPLE
from training.evaluation.visualization import Segment, SegmentationResult, class_colour, from_semantic, overlay

REPO = Path(__file__).resolve().parents[1]
SAMPLE = COCO_PANOPTIC_SAMPLE.root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predict_inputs")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a complete JPEG")
    return folder


def test_predict_panoptic_writes_png_json_overlay(
    load_script, tiny_model_with_processor_dir, inputs, tmp_path, tiny_model
):
    predict = load_script("predict")
    out = tmp_path / "out"
    code = predict.main(
        [
            str(SAMPLE / "images"),
            str(inputs / "*.jpg"),
            "--model_name_or_path",
            str(tiny_model_with_processor_dir),
            "--output_dir",
            str(out),
            "--batch_size",
            "2",
            "--device",
            "cpu",
            "--ensemble_alpha",
            "0.6",
        ]
    )
    assert code == 1  # an input was skipped (--allow_skips would make it 0)
    skipped = json.loads((out / "skipped.json").read_text())
    assert [Path(s["path"]).name for s in skipped] == ["corrupt.jpg"]
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions["annotations"]) == 2
    assert [c["name"] for c in predictions["categories"]] == list(tiny_model.config.id2label.values())
    for image_path in sorted((SAMPLE / "images").glob("*.jpg")):
        name = image_path.stem
        image = Image.open(image_path)
        ids = rgb_to_id(np.asarray(Image.open(out / f"{name}.png"))).astype(np.int64)
        assert ids.shape == (image.height, image.width)
        entry = json.loads((out / f"{name}.json").read_text())
        assert entry["file_name"] == f"{name}.png" and entry["task"] == "panoptic"
        segments = entry["segments_info"]
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in segments}
        for s in segments:
            ys, xs = np.nonzero(ids == s["id"])
            assert s["area"] == len(ys)
            x0, y0 = int(xs.min()), int(ys.min())
            assert s["bbox"] == [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
            assert s["label"] == tiny_model.config.id2label[s["category_id"]]
        picture = Image.open(out / f"{name}_overlay.png")  # the image, and the legend below it
        assert picture.width == image.width and picture.height > image.height


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_predict_other_tasks(load_script, tiny_model_with_processor_dir, tmp_path, task):
    predict = load_script("predict")
    image = SAMPLE / "images" / "000000439180.jpg"
    out = tmp_path / task
    assert (
        predict.main(
            [
                str(image),
                "--model_name_or_path",
                str(tiny_model_with_processor_dir),
                "--output_dir",
                str(out),
                "--task",
                task,
                "--threshold",
                "0.0",
                "--no_labels",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    entry = json.loads((out / "000000439180.json").read_text())
    assert entry["task"] == task and entry["segments_info"]
    if task == "semantic":  # one segment per class, covering the image
        ids = rgb_to_id(np.asarray(Image.open(out / "000000439180.png")))
        assert (ids > 0).all()
        assert len({s["category_id"] for s in entry["segments_info"]}) == len(entry["segments_info"])


def test_predict_reports_missing_inputs(load_script, tiny_model_with_processor_dir, tmp_path):
    from training.cli import CliError

    predict = load_script("predict")
    with pytest.raises(CliError, match="no images found"):
        predict.main(
            [
                str(tmp_path / "nothing-here"),
                "--model_name_or_path",
                str(tiny_model_with_processor_dir),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )


def test_predict_cli_help():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "predict.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--ensemble_alpha" in done.stdout and "--task" in done.stdout
    assert "--output_dir" in done.stdout and "--output-dir" not in done.stdout and "--debug" in done.stdout


def test_overlay_colours_outlines_and_labels():
    id_map = np.zeros((60, 80), dtype=np.int64)
    id_map[10:50, 5:40] = 1
    id_map[10:50, 40:75] = 2
    segments = [Segment(1, 0, "person", 0.9, True, 1400), Segment(2, 1, "sky", None, False, 1400)]
    result = SegmentationResult(id_map, segments)
    image = Image.new("RGB", (80, 60), (0, 0, 0))
    picture = np.asarray(overlay(image, result, num_classes=2, alpha=1.0, draw_labels=False, legend=False))
    assert (picture[0, 0] == 0).all()  # void stays as is
    assert (picture[20, 20] == class_colour(0)).all() and (picture[20, 60] == class_colour(1)).all()
    assert (picture[20, 39] == 255).all()  # outline between the two segments
    labelled = np.asarray(overlay(image, result, num_classes=2, alpha=1.0, legend=False))
    assert (labelled != picture).any()  # class names drawn
    semantic = from_semantic(np.array([[0, 0, 1], [1, 1, 1]]), {0: "a", 1: "b"})
    described = [(s.id, s.label, s.area, s.bbox) for s in semantic.segments]
    assert described == [(1, "a", 2, [0, 0, 2, 1]), (2, "b", 4, [0, 0, 3, 2])]


def test_batched_prediction_equals_batch_size_one(load_script, tiny_model_with_processor_dir, tmp_path, caplog):
    """Five images of three padded sizes, batch 3 decoded in 2 workers == batch 1 in this process."""
    predict = load_script("predict")
    folder = tmp_path / "in"
    folder.mkdir()
    first, second = sorted((SAMPLE / "images").glob("*.jpg"))
    for name, source, transform in [
        ("a", first, None),
        ("b", second, None),
        ("c", first, Image.FLIP_LEFT_RIGHT),
        ("d", second, Image.FLIP_TOP_BOTTOM),
        ("e", first, Image.ROTATE_90),
    ]:
        image = Image.open(source)
        (image.transpose(transform) if transform is not None else image).save(folder / f"{name}.png")
    outputs = {}
    for batch_size, workers in ((1, 0), (3, 2)):
        out = tmp_path / f"batch{batch_size}"
        with caplog.at_level("INFO", logger="predict"):
            assert (
                predict.main(
                    [
                        str(folder),
                        "--model_name_or_path",
                        str(tiny_model_with_processor_dir),
                        "--output_dir",
                        str(out),
                        "--batch_size",
                        str(batch_size),
                        "--num_workers",
                        str(workers),
                        "--device",
                        "cpu",
                        "--no_overlay",
                    ]
                )
                == 0
            )
        assert "images/s" in caplog.text
        outputs[batch_size] = out
    for name in "abcde":
        one, batched = (np.asarray(Image.open(outputs[b] / f"{name}.png")) for b in (1, 3))
        assert np.array_equal(one, batched), name
        segments = [json.loads((outputs[b] / f"{name}.json").read_text())["segments_info"] for b in (1, 3)]
        assert [s["id"] for s in segments[0]] == [s["id"] for s in segments[1]]
        assert [s["score"] for s in segments[0]] == pytest.approx([s["score"] for s in segments[1]], abs=1e-5)
    assert [a["image_id"] for a in json.loads((outputs[3] / "predictions.json").read_text())["annotations"]] == list(
        "abcde")


def test_predict_with_ground_truth_ids_is_scored_by_evaluate_panoptic(load_script, trained_tiny_model_dir, tmp_path):
    """predict.py --gt_json writes the dataset's image ids (not file stems) and category ids (not the model's
    indices), so scripts/evaluate_panoptic.py scores them, with the PQ that scripts/evaluate.py measures in-process
    on the same images and ground truth."""
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    from training.data.class_names import load_class_names
    from training.data.panoptic_datasets import load_coco_panoptic, restrict_to_present_classes

    # The shipped sample's ground truth in the trained model's label space: the 8 categories present, in id order.
    gt = json.loads((SAMPLE / "panoptic_annotations.json").read_text())
    present = {s["category_id"] for a in gt["annotations"] for s in a["segments_info"]}
    gt["categories"] = [c for c in gt["categories"] if c["id"] in present]
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(json.dumps(gt))
    out = tmp_path / "out"
    assert load_script("predict").main([str(SAMPLE / "images"), "--model_name_or_path", str(trained_tiny_model_dir),
                                        "--output_dir", str(out), "--gt_json", str(gt_json), "--device", "cpu",
                                        "--no_overlay", "--num_workers", "0"]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(a["image_id"] for a in predictions["annotations"]) == sorted(im["id"] for im in gt["images"])
    used = {s["category_id"] for a in predictions["annotations"] for s in a["segments_info"]}
    assert used and used <= present and predictions["categories"] == gt["categories"]
    report_path = tmp_path / "scored.json"
    assert load_script("evaluate_panoptic").main(
        ["--gt_json", str(gt_json), "--gt_folder", str(SAMPLE / "panoptic"),
         "--pred_json", str(out / "predictions.json"),
         "--pred_folder", str(out), "--output", str(report_path), "--no_progress"]) == 0
    scored = json.loads(report_path.read_text())

    model = AutoModelForUniversalSegmentation.from_pretrained(trained_tiny_model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(trained_tiny_model_dir)
    # The model's label space: the shipped COCO class names (with synonyms) of the present categories, in id order.
    coco = load_class_names("coco_panoptic")
    ds, names, _ = restrict_to_present_classes(
        load_coco_panoptic(SAMPLE / "images", SAMPLE / "panoptic", gt_json, class_names=coco), coco)
    expected = load_script("evaluate").evaluate(model, processor, ds, names, progress=False)
    assert expected["All"]["pq"] > 0.05  # a trained model: the comparison is not between two zeros
    for key in ("All", "Things", "Stuff"):
        for metric in ("pq", "sq", "rq", "n"):
            assert scored[key][metric] == pytest.approx(expected[key][metric], abs=1e-6), (key, metric)
