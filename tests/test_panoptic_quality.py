"""PQ / SQ / RQ and mIoU against panopticapi and hotcoco on the shipped COCO panoptic sample with perturbed
predictions."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_dearli.image_processing_dearli import id_to_rgb, rgb_to_id
from training.data.package_data import COCO_PANOPTIC_SAMPLE
from training.evaluation.panoptic_quality import (
    PanopticQuality,
    evaluate_panoptic_folders,
    format_report,
    pq_image_stats,
    read_panoptic_png,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = COCO_PANOPTIC_SAMPLE.root
TOL = 1e-9

pa = pytest.importorskip("panopticapi.evaluation")


def _has_hotcoco() -> bool:
    try:
        import hotcoco.panoptic  # noqa: F401
    except ImportError:
        return False
    return True


# folder evaluation runs on both engines: hotcoco's compiled evaluator (mapped to our report) and our numpy code
ENGINE_PARAMS = ["numpy", pytest.param("hotcoco", marks=pytest.mark.skipif(not _has_hotcoco(), reason="no hotcoco"))]


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
def load_sample() -> tuple[dict, list[np.ndarray]]:
    data = json.loads((SAMPLE / "panoptic_annotations.json").read_text())
    maps = [rgb_to_id(np.asarray(Image.open(SAMPLE / "panoptic" / a["file_name"]))).astype(np.int64)
            for a in data["annotations"]]
    return data, maps


def recompute_areas(id_map: np.ndarray, segments: list[dict]) -> list[dict]:
    ids, counts = np.unique(id_map, return_counts=True)
    area = dict(zip(ids.tolist(), counts.tolist()))
    return [dict(s, area=int(area.get(s["id"], 0))) for s in segments]


def perturb(ids: np.ndarray, segments: list[dict], rng: np.random.Generator, cat_ids: list[int]) -> tuple:
    """A prediction: shifted map with dropped, merged, relabelled segments, a void hole and a fresh segment."""
    ids = np.where(np.isin(ids, [s["id"] for s in segments]), ids, 0)  # unlisted ground-truth ids are not predicted
    pred = np.roll(ids, (int(rng.integers(-12, 13)), int(rng.integers(-12, 13))), axis=(0, 1)).copy()
    segs = []
    for s in segments:
        r = rng.random()
        if r < 0.15:  # dropped
            pred[pred == s["id"]] = 0
        elif r < 0.3 and segs:  # merged into the previous predicted segment
            pred[pred == s["id"]] = segs[-1]["id"]
        elif r < 0.45:  # relabelled (possibly to a class absent from the ground truth)
            segs.append({"id": s["id"], "category_id": int(rng.choice(cat_ids))})
        else:
            segs.append({"id": s["id"], "category_id": s["category_id"]})
    h, w = pred.shape
    y, x = int(rng.integers(0, h - 60)), int(rng.integers(0, w - 60))
    pred[y:y + 50, x:x + 50] = 0  # void hole
    y, x = int(rng.integers(0, h - 60)), int(rng.integers(0, w - 60))
    pred[y:y + 30, x:x + 45] = 777  # a new segment
    segs.append({"id": 777, "category_id": int(rng.choice(cat_ids))})
    present = set(np.unique(pred).tolist())
    return pred, [s for s in segs if s["id"] in present]


def make_gt_variant(ids: np.ndarray, segments: list[dict], rng: np.random.Generator) -> tuple:
    """Ground truth with void holes, crowd segments (two of one class: panopticapi keeps the last) and an id in the
    PNG that the JSON does not list."""
    ids = ids.copy()
    segs = [dict(s) for s in segments]
    h, w = ids.shape
    for _ in range(3):
        y, x = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        ids[y:y + 35, x:x + 35] = 0
    things = [s for s in segs if s["category_id"] <= 90]
    for s in things[:2]:
        s["iscrowd"] = 1
    cat = things[0]["category_id"] if things else 1
    ids[h - 30:h - 5, 5:80] = 4242  # second crowd segment of the same class, listed last
    segs.append({"id": 4242, "category_id": cat, "iscrowd": 1, "bbox": [5, h - 30, 75, 25], "area": 0})
    ids[5:25, w - 60:w - 5] = 999  # listed nowhere
    return ids, recompute_areas(ids, segs)


def write_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(id_to_rgb(ids)).save(path)


def write_case(root: Path, gts: list[tuple[np.ndarray, list[dict]]], preds: list[tuple[np.ndarray, list[dict]]],
               categories: list[dict]) -> tuple[str, str, str, str]:
    images, g_anns, p_anns = [], [], []
    for k, ((g, gs), (p, ps)) in enumerate(zip(gts, preds)):
        name = f"{k:04d}.png"
        write_png(root / "gt" / name, g)
        write_png(root / "pred" / name, p)
        images.append({"id": k, "file_name": name, "height": g.shape[0], "width": g.shape[1]})
        g_anns.append({"image_id": k, "file_name": name, "segments_info": gs})
        p_anns.append({"image_id": k, "file_name": name, "segments_info": ps})
    (root / "gt.json").write_text(json.dumps({"images": images, "annotations": g_anns, "categories": categories}))
    (root / "pred.json").write_text(json.dumps({"annotations": p_anns}))
    return str(root / "gt.json"), str(root / "pred.json"), str(root / "gt"), str(root / "pred")


def panopticapi(gt_json: str, pred_json: str, gt_dir: str, pred_dir: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return pa.pq_compute(gt_json, pred_json, gt_dir, pred_dir)


def assert_same(ref: dict, ours: dict) -> None:
    for key in ("All", "Things", "Stuff"):
        assert ours[key]["n"] == ref[key]["n"], key
        for m in ("pq", "sq", "rq"):
            assert abs(ours[key][m] - float(ref[key][m])) <= TOL, (key, m)
    assert set(int(c) for c in ref["per_class"]) == set(int(c) for c in ours["per_class"])
    for cid, r in ref["per_class"].items():
        for m in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][int(cid)][m] - float(r[m])) <= TOL, (cid, m)


@pytest.fixture(scope="module")
def sample():
    return load_sample()


@pytest.fixture(scope="module")
def perturbed_case(tmp_path_factory, sample):
    """Both sample images x 3 ground-truth variants, each with a perturbed prediction."""
    data, maps = sample
    rng = np.random.default_rng(0)
    cat_ids = [c["id"] for c in data["categories"]]
    gts, preds = [], []
    for rep in range(3):
        for ann, ids in zip(data["annotations"], maps):
            segs = [dict(s) for s in ann["segments_info"]]
            g, gs = (ids, recompute_areas(ids, segs)) if rep == 0 else make_gt_variant(ids, segs, rng)
            gts.append((g, gs))
            preds.append(perturb(g, gs, rng, cat_ids))
    root = tmp_path_factory.mktemp("pq_case")
    files = write_case(root, gts, preds, data["categories"])
    return files, gts, preds, data["categories"]


# --------------------------------------------------------------------------------------------------------------------
# equality with panopticapi
# --------------------------------------------------------------------------------------------------------------------
def test_rgb_to_id_roundtrip():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256**3, size=(7, 9))
    rgb = id_to_rgb(ids)
    assert (rgb_to_id(rgb) == ids).all()
    assert (rgb_to_id(np.ascontiguousarray(rgb[:, ::-1])) == ids[:, ::-1]).all()  # fast path
    assert (rgb_to_id(rgb[:, ::-1]) == ids[:, ::-1]).all()  # non-contiguous path
    assert (rgb_to_id(rgb.astype(np.int32)) == ids).all()


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_exact_ground_truth_is_perfect(tmp_path, sample, engine):
    data, maps = sample
    gts = [(m, a["segments_info"]) for m, a in zip(maps, data["annotations"])]
    preds = [(m, [{"id": s["id"], "category_id": s["category_id"]} for s in a["segments_info"]])
             for m, a in zip(maps, data["annotations"])]
    files = write_case(tmp_path, gts, preds, data["categories"])
    ours = evaluate_panoptic_folders(*files, progress=False, engine=engine)
    assert ours["engine"] == engine
    assert_same(panopticapi(*files), ours)
    assert ours["All"]["pq"] == pytest.approx(1.0)


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_perturbed_predictions_match_panopticapi(perturbed_case, engine):
    files, _, _, _ = perturbed_case
    ref = panopticapi(*files)
    runs = ({"num_workers": 0}, {"num_workers": 2}, {"num_workers": 2, "use_processes": True}) if engine == "numpy" \
        else ({},)
    for kwargs in runs:
        report = evaluate_panoptic_folders(*files, progress=False, engine=engine, **kwargs)
        assert report["engine"] == engine
        assert report["num_images"] == len(perturbed_case[1])
        assert_same(ref, report)
    assert 0.0 < ref["All"]["pq"] < 1.0


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_json_areas_differ_from_pixel_counts(tmp_path, sample, engine):
    """panopticapi takes ground-truth areas from the JSON (e.g. annotations made at another resolution)."""
    data, maps = sample
    rng = np.random.default_rng(4)
    cat_ids = [c["id"] for c in data["categories"]]
    gts, preds = [], []
    for ann, ids in zip(data["annotations"], maps):
        g, gs = make_gt_variant(ids, [dict(s) for s in ann["segments_info"]], rng)
        gs = [dict(s, area=int(s["area"] * 1.2) + 7) for s in gs]
        gts.append((g, gs))
        preds.append(perturb(g, gs, rng, cat_ids))
    files = write_case(tmp_path, gts, preds, data["categories"])
    ref = panopticapi(*files)
    assert_same(ref, evaluate_panoptic_folders(*files, progress=False, engine=engine))
    assert 0.0 < ref["All"]["pq"] < 1.0


def test_engine_choice(perturbed_case):
    files, _, _, _ = perturbed_case
    auto = evaluate_panoptic_folders(*files, progress=False)  # default engine="auto"
    assert auto["engine"] == ("hotcoco" if _has_hotcoco() else "numpy")
    with pytest.raises(ValueError, match="engine"):
        evaluate_panoptic_folders(*files, progress=False, engine="rust")


@pytest.mark.parametrize("gt_area", ["segments", "map"])
def test_in_memory_accumulator_matches_panopticapi(perturbed_case, gt_area):
    files, gts, preds, categories = perturbed_case
    ref = panopticapi(*files)
    acc = PanopticQuality(categories, gt_area=gt_area)  # areas in the JSON equal pixel counts here
    for (g, gs), (p, ps) in zip(gts, preds):
        acc.update(p, ps, g, gs)
    report = acc.compute()
    assert_same(ref, report)
    assert report["num_images"] == len(gts)


def test_raw_stats_match_panopticapi_core(perturbed_case):
    files, gts, preds, categories = perturbed_case
    gt_data = json.loads(Path(files[0]).read_text())
    pred_data = json.loads(Path(files[1]).read_text())
    cats = {c["id"]: c for c in categories}
    index = {c["id"]: i for i, c in enumerate(categories)}
    for g_ann, p_ann, (g, gs), (p, ps) in zip(gt_data["annotations"], pred_data["annotations"], gts, preds):
        with contextlib.redirect_stdout(io.StringIO()):
            stat = pa.pq_compute_single_core(0, [(g_ann, p_ann)], files[2], files[3], cats)
        iou, tp, fp, fn = pq_image_stats(p, ps, g, gs, index, gt_area="segments")
        for cid, i in index.items():
            s = stat.pq_per_cat.get(cid)
            ref = (s.iou, s.tp, s.fp, s.fn) if s is not None else (0.0, 0, 0, 0)
            assert (tp[i], fp[i], fn[i]) == ref[1:], cid
            assert abs(iou[i] - ref[0]) <= TOL


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
def test_edge_cases_against_panopticapi(tmp_path, sample, engine):
    data, maps = sample
    ann, ids = data["annotations"][0], maps[0]
    segs = ann["segments_info"]
    stuff_gt_only = [dict(s) for s in segs]
    empty_pred = (np.zeros_like(ids), [])
    all_void_gt = (np.zeros_like(ids), [])
    only_pred = (ids, [{"id": s["id"], "category_id": s["category_id"]} for s in segs])
    # image 0: empty prediction; image 1: all-void ground truth (every prediction ignored); image 2: exact
    files = write_case(tmp_path, [(ids, stuff_gt_only), all_void_gt, (ids, stuff_gt_only)],
                       [empty_pred, only_pred, only_pred], data["categories"])
    ref = panopticapi(*files)
    ours = evaluate_panoptic_folders(*files, progress=False, num_workers=0, engine=engine)
    assert_same(ref, ours)
    # classes without ground truth or prediction: 0.0 and not counted
    present = {s["category_id"] for s in segs}
    absent = next(c["id"] for c in data["categories"] if c["id"] not in present)
    assert ours["per_class"][absent]["pq"] == 0.0 and ours["per_class"][absent]["tp"] == 0
    assert ours["All"]["n"] == len(present)


def test_nothing_to_score_reports_zeros(sample):
    data, maps = sample
    acc = PanopticQuality(data["categories"])
    ids = maps[0]
    acc.update(ids, [{"id": int(i), "category_id": 1} for i in np.unique(ids) if i != 0], np.zeros_like(ids), [])
    rep = acc.compute()  # panopticapi would divide by zero here
    assert rep["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert all(r["fp"] == 0 for r in rep["per_class"].values())


def test_prediction_errors_like_panopticapi(sample):
    data, maps = sample
    ann, ids = data["annotations"][0], maps[0]
    index = {c["id"]: i for i, c in enumerate(data["categories"])}
    segs = [{"id": s["id"], "category_id": s["category_id"]} for s in ann["segments_info"]]
    with pytest.raises(KeyError, match="presented in PNG and not presented in JSON"):
        pq_image_stats(ids, segs[1:], ids, ann["segments_info"], index, image_ref=5)
    with pytest.raises(KeyError, match="presented in JSON and not presented in PNG"):
        pq_image_stats(ids, segs + [{"id": 12345, "category_id": 1}], ids, ann["segments_info"], index)
    with pytest.raises(KeyError, match="unknown category_id 1000"):
        pq_image_stats(ids, [dict(segs[0], category_id=1000)] + segs[1:], ids, ann["segments_info"], index)


def test_negative_prediction_ids_are_void(sample):
    data, maps = sample
    ann, ids = data["annotations"][0], maps[0]
    index = {c["id"]: i for i, c in enumerate(data["categories"])}
    segs = [{"id": s["id"], "category_id": s["category_id"]} for s in ann["segments_info"]]
    pred = ids.copy()
    pred[pred == segs[0]["id"]] = -1
    with_zero = np.where(pred < 0, 0, pred)
    a = pq_image_stats(pred, segs[1:], ids, ann["segments_info"], index)
    b = pq_image_stats(with_zero, segs[1:], ids, ann["segments_info"], index)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------------------------------
# accumulator: merging, de-duplication, accelerate
# --------------------------------------------------------------------------------------------------------------------
def test_merge_and_deduplicate(perturbed_case):
    _, gts, preds, categories = perturbed_case
    whole = PanopticQuality(categories)
    a, b = PanopticQuality(categories), PanopticQuality(categories)
    for k, ((g, gs), (p, ps)) in enumerate(zip(gts, preds)):
        whole.update(p, ps, g, gs)
        (a if k % 2 else b).update(p, ps, g, gs, image_id=k)
    b.update(*preds[0], *gts[0], image_id=0)  # the padding Accelerate adds: same image twice
    a.update(*preds[0], *gts[0], image_id=0)  # ... even on another process
    merged = PanopticQuality(categories).merge_state(a.state_dict()).merge_state(b.state_dict())
    ref, got = whole.compute(), merged.compute()
    assert got["num_images"] == len(gts)
    for key in ("All", "Things", "Stuff"):
        for m in ("pq", "sq", "rq", "n"):
            assert got[key][m] == pytest.approx(ref[key][m], abs=TOL)
    with pytest.raises(ValueError):
        PanopticQuality(categories[:3]).merge(a)


def test_gather_single_process_is_noop(perturbed_case):
    _, gts, preds, categories = perturbed_case
    acc = PanopticQuality(categories)
    acc.update(*preds[0], *gts[0], image_id="x")
    before = acc.compute()
    assert acc.gather().compute() == before


_GATHER_WORKER = r"""
import json, os, sys
import numpy as np
from accelerate import PartialState
from training.evaluation.panoptic_quality import PanopticQuality
state = PartialState(cpu=True)
cats = [{"id": 0, "isthing": 1}, {"id": 1, "isthing": 0}]
acc = PanopticQuality(cats)
gt = np.array([[1, 1, 2, 2]] * 4)
seg_gt = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}]
pred = gt.copy() if state.process_index == 0 else np.zeros_like(gt)
seg_pred = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}] if state.process_index == 0 else []
acc.update(pred, seg_pred, gt, seg_gt, image_id=state.process_index)
acc.update(pred, seg_pred, gt, seg_gt, image_id=state.process_index)  # duplicate
acc.update_semantic(np.zeros((2, 2), int), np.full((2, 2), state.process_index), image_id=state.process_index)
rep = acc.gather().compute()
if state.is_main_process:
    print("REPORT" + json.dumps({"pq": rep["All"]["pq"], "n": rep["num_images"], "miou": rep["mIoU"]}))
state.wait_for_everyone()
state.destroy_process_group()  # exiting with the gloo group alive can abort a rank ("terminate called ...")
"""


@pytest.mark.slow
def test_gather_across_two_processes(tmp_path):
    """Two CPU processes (torchrun, gloo) merge their statistics with accelerate's gather_object."""
    script = tmp_path / "worker.py"
    script.write_text(_GATHER_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("REPORT"))
    rep = json.loads(line[len("REPORT"):])
    # image 0: both segments matched; image 1: both missed -> per class tp=1 (IoU 1), fn=1 -> PQ 1 / 1.5
    assert rep["n"] == 2
    assert rep["pq"] == pytest.approx(2 / 3)
    # semantic: class 0: 4 px right, 4 px of class 1 predicted as 0 -> IoU 4/8; class 1 -> IoU 0
    assert rep["miou"] == pytest.approx((4 / 8 + 0.0) / 2)


# --------------------------------------------------------------------------------------------------------------------
# mIoU
# --------------------------------------------------------------------------------------------------------------------
def test_semantic_miou_matches_hotcoco():
    hs = pytest.importorskip("hotcoco.semantic")
    rng = np.random.default_rng(3)
    c = 6
    acc = PanopticQuality.from_class_names([f"c{i}" for i in range(c)], thing_ids=[0, 1])
    ref = hs.SemanticEval(c, ignore_index=255)
    for _ in range(5):
        gt = rng.integers(0, c - 1, size=(40, 50))  # class c-1 never in ground truth
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, c - 1, size=gt.shape))
        pred = np.where(pred == 255, 0, pred)
        acc.update_semantic(pred, gt)
        ref.update(gt.astype(np.uint8), pred.astype(np.uint8))
    acc.update_semantic(np.zeros((3, 3), int), np.full((3, 3), 255))  # all ignored
    ours, theirs = acc.compute(), ref.results()
    assert ours["mIoU"] == pytest.approx(theirs["mIoU"], abs=TOL)
    assert ours["pixel_accuracy"] == pytest.approx(theirs["aAcc"], abs=TOL)
    for i, r in enumerate(theirs["per_class"]):
        if r["gt_area"] + r["pred_area"] == 0:
            assert ours["per_class_iou"][i] is None
        else:
            assert ours["per_class_iou"][i] == pytest.approx(r["IoU"], abs=TOL)
    assert ours["per_class_iou"][c - 1] is None


def test_semantic_independent_reference():
    """Per-class IoU from explicit masks, classes absent everywhere excluded from the mean."""
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 7]])  # 7: invalid prediction counts against its gt class
    acc = PanopticQuality.from_class_names(["a", "b", "c", "d"], thing_ids=[])
    acc.update_semantic(pred, gt)
    rep = acc.compute()
    iou_a = 1 / (2 + 2 - 1)  # gt a = 2 px, pred a (on valid gt) = 2 px, inter 1
    iou_b = 2 / (3 + 3 - 2)
    iou_c = 1 / (2 + 1 - 1)
    assert rep["per_class_iou"] == {0: pytest.approx(iou_a), 1: pytest.approx(iou_b), 2: pytest.approx(iou_c),
                                    3: None}
    assert rep["mIoU"] == pytest.approx((iou_a + iou_b + iou_c) / 3)


# --------------------------------------------------------------------------------------------------------------------
# CLI, evaluate metric, formatting
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["auto", *ENGINE_PARAMS])
def test_evaluate_panoptic_cli(perturbed_case, tmp_path, engine):
    files, _, _, _ = perturbed_case
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate_panoptic.py"), "--gt_json", files[0], "--gt_folder",
           files[2], "--pred_json", files[1], "--pred_folder", files[3], "--output", str(out), "--per_class",
           "--no_progress", "--engine", engine]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "All" in proc.stdout and "Things" in proc.stdout and "Stuff" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report) >= {"All", "Things", "Stuff", "per_class"}
    assert set(report["All"]) == {"pq", "sq", "rq", "n"}
    report["per_class"] = {int(k): v for k, v in report["per_class"].items()}
    assert_same(panopticapi(*files), report)


@pytest.mark.skipif(not _has_hotcoco(), reason="hotcoco not installed")
def test_folder_evaluation_does_not_import_torch(perturbed_case, tmp_path):
    """The folder evaluation (the command's whole path, hotcoco engine) runs without importing torch or transformers:
    they would multiply the command's start-up time."""
    files, _, _, _ = perturbed_case
    code = ("import runpy, sys\n"
            f"script = runpy.run_path({str(REPO / 'scripts' / 'evaluate_panoptic.py')!r})\n"
            f"code = script['main'](['--gt_json', {files[0]!r}, '--gt_folder', {files[2]!r}, '--pred_json', "
            f"{files[1]!r}, '--pred_folder', {files[3]!r}, '--no_progress', '--engine', 'hotcoco'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules)\n"
            "print('exit', code, 'heavy', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "All" in proc.stdout  # the report was printed
    assert proc.stdout.strip().splitlines()[-1] == "exit 0 heavy []"


def test_evaluate_panoptic_cli_output_dir(perturbed_case, tmp_path):
    """--output_dir DIR writes DIR/report.json (the same report as --output), refuses to overwrite it, and refuses
    --output together with it, each as one line."""
    files, _, _, _ = perturbed_case
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate_panoptic.py"), "--gt_json", files[0], "--gt_folder",
           files[2], "--pred_json", files[1], "--pred_folder", files[3], "--no_progress", "--engine", "numpy"]
    done = subprocess.run([*cmd, "--output_dir", str(tmp_path / "eval")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    report["per_class"] = {int(k): v for k, v in report["per_class"].items()}
    assert_same(panopticapi(*files), report)
    again = subprocess.run([*cmd, "--output_dir", str(tmp_path / "eval")], capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    both = subprocess.run([*cmd, "--output_dir", str(tmp_path / "x"), "--output", str(tmp_path / "y.json")],
                          capture_output=True, text=True, timeout=120)
    assert both.returncode != 0 and "not both" in both.stderr


def test_evaluate_metric_module(sample):
    evaluate = pytest.importorskip("evaluate")
    data, maps = sample
    rng = np.random.default_rng(5)
    cat_ids = [c["id"] for c in data["categories"]]
    preds, refs, pseg, rseg = [], [], [], []
    acc = PanopticQuality(data["categories"])
    for ann, ids in zip(data["annotations"], maps):
        crop = ids[100:170, 200:290]  # keep the Arrow round trip small (perturb needs > 60 px)
        segs = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": s["iscrowd"]}
                for s in ann["segments_info"] if (crop == s["id"]).any()]
        p, ps = perturb(crop, segs, rng, cat_ids)
        preds.append(p)
        refs.append(crop)
        pseg.append(ps)
        rseg.append(segs)
        acc.update(p, ps, crop, segs)
    metric = evaluate.load(str(REPO / "training" / "evaluation" / "evaluate_metric" / "panoptic_quality"))
    got = metric.compute(predictions=preds, references=refs, prediction_segments=pseg, reference_segments=rseg,
                         categories=data["categories"])
    ref = acc.compute()
    for key in ("All", "Things", "Stuff"):
        for m in ("pq", "sq", "rq", "n"):
            assert got[key][m] == pytest.approx(ref[key][m], abs=TOL)
    small = metric.compute(predictions=[[[1, 1], [2, 2]]], references=[[[1, 1], [2, 2]]],
                           prediction_segments=[[{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}]],
                           reference_segments=[[{"id": 1, "category_id": 0, "iscrowd": 0},
                                                {"id": 2, "category_id": 1, "iscrowd": 0}]],
                           num_labels=2, thing_ids=[0])
    assert small["All"]["pq"] == 1.0 and small["Things"]["n"] == 1 and small["Stuff"]["n"] == 1


def test_read_panoptic_png_and_format(tmp_path, sample):
    _, maps = sample
    write_png(tmp_path / "x.png", maps[0])
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "x.png"), maps[0])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_panoptic_png(tmp_path / "missing.png")
    rep = PanopticQuality.from_class_names(["a", "b"], [0]).compute()
    text = format_report(rep, per_class=True)
    assert "All" in text and "Stuff" in text


@pytest.mark.parametrize("engine", ["auto", *ENGINE_PARAMS])
def test_folder_errors(tmp_path, perturbed_case, engine):
    files, _, _, _ = perturbed_case
    pred = json.loads(Path(files[1]).read_text())
    pred["annotations"] = pred["annotations"][1:]
    bad = tmp_path / "pred.json"
    bad.write_text(json.dumps(pred))
    with pytest.raises(KeyError, match="no prediction for the image with id: 0"):
        evaluate_panoptic_folders(files[0], str(bad), files[2], files[3], progress=False, engine=engine)
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate_panoptic_folders(files[0], files[1], files[2], str(tmp_path / "nope"), progress=False, engine=engine)
    # a predicted segment listed in the JSON but absent from the PNG: panopticapi's KeyError (auto falls back to
    # numpy for it), hotcoco's own ValueError when asked for explicitly
    pred = json.loads(Path(files[1]).read_text())
    pred["annotations"][0]["segments_info"].append({"id": 123456, "category_id": 1})
    bad.write_text(json.dumps(pred))
    expected = ValueError if engine == "hotcoco" else KeyError
    with pytest.raises(expected):
        evaluate_panoptic_folders(files[0], str(bad), files[2], files[3], progress=False, engine=engine)
    gt = copy.deepcopy(json.loads(Path(files[0]).read_text()))
    assert gt["annotations"]


def test_noisy_maps_with_many_segments(tmp_path, sample):
    """Per-pixel noise (no runs to exploit) and hundreds of segments, against panopticapi."""
    data, _ = sample
    cat_ids = [c["id"] for c in data["categories"]]
    rng = np.random.default_rng(11)
    gts, preds = [], []
    for _ in range(2):
        blocks = rng.integers(1, 400, size=(15, 20))
        gt = np.kron(blocks, np.ones((4, 4), dtype=np.int64))  # 400 possible 4x4-block segments
        gt[rng.random(gt.shape) < 0.05] = 0
        pred = gt.copy()
        noise = rng.random(gt.shape) < 0.3
        pred[noise] = rng.integers(1, 400, size=int(noise.sum()))
        gsegs = [{"id": int(i), "category_id": cat_ids[int(i) % len(cat_ids)], "iscrowd": int(i % 37 == 0)}
                 for i in np.unique(gt) if i]
        psegs = [{"id": int(i), "category_id": cat_ids[int(i) % len(cat_ids)] if i % 5 else cat_ids[0]}
                 for i in np.unique(pred) if i]
        gts.append((gt, recompute_areas(gt, gsegs)))
        preds.append((pred, psegs))
    files = write_case(tmp_path, gts, preds, data["categories"])
    ref = panopticapi(*files)
    assert_same(ref, evaluate_panoptic_folders(*files, progress=False, num_workers=0, engine="numpy"))
    if _has_hotcoco():
        assert_same(ref, evaluate_panoptic_folders(*files, progress=False, engine="hotcoco"))
    acc = PanopticQuality(data["categories"])
    for (g, gs), (p, ps) in zip(gts, preds):
        acc.update(p, ps, g, gs)
    assert_same(ref, acc.compute())
