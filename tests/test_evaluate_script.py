"""scripts/evaluate.py: a tiny DEARLi saved to disk, evaluated on a tiny COCO-panoptic-format folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_dearli.image_processing_dearli import id_to_rgb

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "evaluate.py"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """Two 48x64 images with person (thing), sky and grass (stuff) — the tiny model's label space."""
    root = tmp_path_factory.mktemp("tiny_coco")
    (root / "images").mkdir()
    (root / "panoptic").mkdir()
    rng = np.random.default_rng(0)
    cats = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0},
            {"id": 3, "name": "grass", "isthing": 0}]
    images, anns = [], []
    for k in range(2):
        ids = np.zeros((48, 64), np.int64)
        ids[:20] = 200
        ids[20:] = 300
        ids[25:45, 10 + 20 * k:25 + 20 * k] = 101
        ids[30:40, 50:60] = 102
        segs = [{"id": 200, "category_id": 2, "iscrowd": 0}, {"id": 300, "category_id": 3, "iscrowd": 0},
                {"id": 101, "category_id": 1, "iscrowd": 0}, {"id": 102, "category_id": 1, "iscrowd": 1}]
        for s in segs:
            s["area"] = int((ids == s["id"]).sum())
            s["bbox"] = [0, 0, 1, 1]
        img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        img[:20] = (120, 160, 230)
        Image.fromarray(img).save(root / "images" / f"{k:012d}.jpg")
        Image.fromarray(id_to_rgb(ids)).save(root / "panoptic" / f"{k:012d}.png")
        images.append({"id": k, "file_name": f"{k:012d}.jpg", "height": 48, "width": 64})
        anns.append({"image_id": k, "file_name": f"{k:012d}.png", "segments_info": segs})
    (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def args_for(folder: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset", "custom", "--images_dir", str(folder / "images"),
            "--gt_json", str(folder / "panoptic.json"), "--gt_folder", str(folder / "panoptic"), "--device", "cpu",
            "--output", str(out), "--no_progress", "--size", "64", "128", *extra]


@pytest.fixture(scope="module")
def in_process_report(tiny_folder, tiny_model, load_script):
    """scripts/evaluate.py's evaluate() on the session's tiny model (no reload)."""
    from modeling_dearli.image_processing_dearli import DearliImageProcessor
    from training.data.panoptic_datasets import dataset_class_names, load_coco_panoptic

    ds = load_coco_panoptic(tiny_folder / "images", tiny_folder / "panoptic", tiny_folder / "panoptic.json")
    processor = DearliImageProcessor.from_model_config(tiny_model.config, size={"shortest_edge": 64,
                                                                                "longest_edge": 128})
    report = load_script("evaluate").evaluate(tiny_model, processor, ds, dataset_class_names(ds), ensemble_alpha=0.6,
                                              batch_size=2, progress=False)
    return report, ds, processor


def test_evaluate_matches_manual_loop(in_process_report, tiny_model):
    import torch

    from training.data.panoptic_targets import panoptic_target_from_row, semantic_target_from_row
    from training.evaluation.panoptic_quality import PanopticQuality

    report, ds, processor = in_process_report
    assert set(report) >= {"All", "Things", "Stuff", "per_class", "mIoU", "per_class_iou", "num_images"}
    assert report["num_images"] == 2
    acc = PanopticQuality.from_class_names(tiny_model.config.class_names, tiny_model.config.thing_ids)
    for row in ds:  # the same evaluation written out by hand with the library pieces, one image at a time
        inputs = processor([row["image"].convert("RGB")])
        with torch.no_grad():
            outputs = tiny_model(**inputs)
        pan = processor.post_process_panoptic_segmentation(outputs, target_sizes=[(48, 64)], ensemble_alpha=0.6)[0]
        sem = processor.post_process_semantic_segmentation(outputs, target_sizes=[(48, 64)], ensemble_alpha=0.6)[0]
        target = panoptic_target_from_row(row)
        acc.update(pan["segmentation"], pan["segments_info"], target.id_map, target.eval_segments())
        acc.update_semantic(sem, semantic_target_from_row(row))
    manual = acc.compute()
    for key in ("All", "Things", "Stuff"):
        for m in ("pq", "sq", "rq", "n"):
            assert report[key][m] == pytest.approx(manual[key][m], abs=1e-9)
    assert report["mIoU"] == pytest.approx(manual["mIoU"], abs=1e-9)


def test_evaluate_cli_subprocess(tiny_folder, tiny_model_dir, in_process_report, tmp_path):
    """The command line on the saved model gives the in-process numbers (same weights, same ensemble_alpha)."""
    out = tmp_path / "cli.json"
    args = args_for(tiny_folder, tiny_model_dir, out, "--ensemble_alpha", "0.6", "--batch_size", "2")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PQ" in proc.stdout and "mIoU" in proc.stdout
    report = json.loads(out.read_text())
    assert report["num_images"] == 2 and report["ensemble_alpha"] == 0.6
    expected = in_process_report[0]
    for key in ("All", "Things", "Stuff"):
        for m in ("pq", "sq", "rq", "n"):
            assert report[key][m] == pytest.approx(expected[key][m], abs=1e-6)
    assert report["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)


def test_alpha_sweep_equals_one_evaluation_per_alpha(tiny_folder, tiny_model, in_process_report, load_script):
    """Several Eq. 6 weights from one forward pass each give the reports of separate evaluations."""
    from training.data.panoptic_datasets import dataset_class_names

    script = load_script("evaluate")
    _, ds, processor = in_process_report
    alphas = [1.0, 0.6, 0.0]
    reports = script.evaluate_alphas(tiny_model, processor, ds, dataset_class_names(ds), alphas, batch_size=2,
                                     progress=False)
    for alpha, report in zip(alphas, reports, strict=True):
        single = script.evaluate(tiny_model, processor, ds, dataset_class_names(ds), ensemble_alpha=alpha,
                                 batch_size=1, progress=False)
        for key in ("All", "Things", "Stuff"):
            assert report[key]["pq"] == pytest.approx(single[key]["pq"], abs=1e-9), (alpha, key)
        assert report["mIoU"] == pytest.approx(single["mIoU"], abs=1e-9)
    assert len({round(r["mIoU"], 9) for r in reports}) > 1  # the weights change the result on this model
    for report, alpha in zip(reports, alphas):
        report["ensemble_alpha"] = alpha
    table = script.format_alpha_table(reports).splitlines()
    assert len(table) == 4 and sum("best" in line for line in table) == 1


def test_alpha_sweep_cli(tiny_folder, tiny_model_dir, in_process_report, tmp_path):
    out = tmp_path / "sweep.json"
    args = args_for(tiny_folder, tiny_model_dir, out, "--ensemble_alpha", "1.0", "0.6", "--batch_size", "2")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best PQ" in proc.stdout
    sweep = json.loads(out.read_text())
    assert sweep["ensemble_alphas"] == [1.0, 0.6] and len(sweep["reports"]) == 2
    assert sweep["best_ensemble_alpha"] in (1.0, 0.6)
    assert sweep["reports"][1]["All"]["pq"] == pytest.approx(in_process_report[0]["All"]["pq"], abs=1e-6)


def test_label_space_mismatch_is_reported(tiny_model, tmp_path, load_script):
    script = load_script("evaluate")
    from training.data.class_names import ClassNames

    names = ClassNames((1, 2), ("a", "b"), (True, False))
    with pytest.raises(ValueError, match="3 classes, the dataset 2"):
        script.evaluate(tiny_model, None, [], names)


@pytest.mark.parametrize(("dataset", "expected"), [("coco_panoptic", (512, 2048)), ("coco_objects", (512, 2048)),
                                                   ("ade20k", (640, 2560)), ("custom", (96, 160))])
def test_default_resolution_is_the_datasets_test_size(dataset, expected, tiny_model_with_processor_dir, load_script,
                                                      monkeypatch):
    """Without --size a standard dataset is evaluated at the reference's test size (COCO 512 / 2048, not the
    processor default 640 / 2560); a custom dataset at the size of the processor saved with the model."""
    script = load_script("evaluate")
    seen = {}

    def fake_evaluate(model, processor, *args, **kwargs):
        seen["size"] = processor.size
        raise KeyboardInterrupt  # stop before the report

    monkeypatch.setattr(script, "load_dataset", lambda args: ([], None))
    monkeypatch.setattr(script, "evaluate", fake_evaluate)
    with pytest.raises(KeyboardInterrupt):
        script.main(["--model", str(tiny_model_with_processor_dir), "--dataset", dataset, "--device", "cpu"])
    assert (seen["size"]["shortest_edge"], seen["size"]["longest_edge"]) == expected
