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
from training.evaluation.visualization import Segment, SegmentationResult, class_palette, from_semantic, overlay

REPO = Path(__file__).resolve().parents[1]
SAMPLE = COCO_PANOPTIC_SAMPLE.root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predict_inputs")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a complete JPEG")
    return folder


def test_predict_panoptic_writes_png_json_overlay(load_script, tiny_model_with_processor_dir, inputs, tmp_path, tiny_model):
    predict = load_script("predict")
    out = tmp_path / "out"
    code = predict.main([str(SAMPLE / "images"), str(inputs / "*.jpg"), "--model", str(tiny_model_with_processor_dir),
                         "--output-dir", str(out), "--batch-size", "2", "--device", "cpu", "--ensemble_alpha", "0.6"])
    assert code == 0
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
        assert Image.open(out / f"{name}_overlay.png").size == image.size


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_predict_other_tasks(load_script, tiny_model_with_processor_dir, tmp_path, task):
    predict = load_script("predict")
    image = SAMPLE / "images" / "000000439180.jpg"
    out = tmp_path / task
    assert predict.main([str(image), "--model", str(tiny_model_with_processor_dir), "--output-dir", str(out), "--task", task,
                         "--threshold", "0.0", "--no-labels", "--device", "cpu"]) == 0
    entry = json.loads((out / "000000439180.json").read_text())
    assert entry["task"] == task and entry["segments_info"]
    if task == "semantic":  # one segment per class, covering the image
        ids = rgb_to_id(np.asarray(Image.open(out / "000000439180.png")))
        assert (ids > 0).all()
        assert len({s["category_id"] for s in entry["segments_info"]}) == len(entry["segments_info"])


def test_predict_reports_missing_inputs(load_script, tiny_model_with_processor_dir, tmp_path):
    predict = load_script("predict")
    assert predict.main([str(tmp_path / "nothing-here"), "--model", str(tiny_model_with_processor_dir), "--output-dir",
                         str(tmp_path / "o")]) == 2


def test_predict_cli_help():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--ensemble_alpha" in done.stdout and "--task" in done.stdout


def test_overlay_colours_outlines_and_labels():
    id_map = np.zeros((60, 80), dtype=np.int64)
    id_map[10:50, 5:40] = 1
    id_map[10:50, 40:75] = 2
    segments = [Segment(1, 0, "person", 0.9, True, 1400), Segment(2, 1, "sky", None, False, 1400)]
    result = SegmentationResult(id_map, segments)
    image = Image.new("RGB", (80, 60), (0, 0, 0))
    picture = np.asarray(overlay(image, result, num_classes=2, alpha=1.0, draw_labels=False))
    palette = class_palette(2)
    assert (picture[0, 0] == 0).all()  # void stays as is
    assert (picture[20, 20] == palette[0]).all() and (picture[20, 60] == palette[1]).all()
    assert (picture[20, 39] == 255).all()  # outline between the two segments
    labelled = np.asarray(overlay(image, result, num_classes=2, alpha=1.0))
    assert (labelled != picture).any()  # class names drawn
    semantic = from_semantic(np.array([[0, 0, 1], [1, 1, 1]]), {0: "a", 1: "b"})
    described = [(s.id, s.label, s.area, s.bbox) for s in semantic.segments]
    assert described == [(1, "a", 2, [0, 0, 2, 1]), (2, "b", 4, [0, 0, 3, 2])]
