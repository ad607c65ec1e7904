"""Time our PQ against panopticapi and hotcoco on the same few hundred synthetic image pairs.

    python scripts/benchmarks/benchmark_pq.py [--num_images 300] [--workers N] [--repeats 3]

Pairs are perturbations of the shipped COCO panoptic sample (``training/data/assets/coco_panoptic_sample``): flipped
ground truth, predictions shifted, with dropped, merged and relabelled segments and void holes. Two comparisons:

* files: JSON + PNG folders in, report out (PNG decoding included): ``panopticapi.evaluation.pq_compute`` (its
  multiprocessing pool), ``hotcoco.panoptic.pq_compute`` (Rust) and ``evaluate_panoptic_folders`` (ours) with
  ``engine="auto"`` (hotcoco's evaluator mapped to our report when installed) and ``engine="numpy"`` (threads);
* in memory: already-decoded RGB arrays in, one core: panopticapi's per-image core fed from memory vs our
  ``PanopticQuality`` accumulator (what training loops use); wall and CPU time (CPU time is steadier on a busy
  machine);
* whole process: ``python scripts/evaluate_panoptic.py`` on the pairs (start-up and imports included) vs hotcoco's
  own evaluation in a fresh ``python -c`` process, and the ratio of the two.

Each timing is the best of ``--repeats`` runs, interleaved so background load hits every method alike.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from modeling_dearli.image_processing_dearli import id_to_rgb, rgb_to_id
from training import cli
from training.data.package_data import COCO_PANOPTIC_SAMPLE
from training.evaluation.panoptic_quality import PanopticQuality, evaluate_panoptic_folders


def make_pairs(sample_dir: Path, out_dir: Path, n: int, seed: int = 0) -> None:
    """Write gt.json, gt/, pred.json, pred/ with ``n`` perturbed pairs under ``out_dir``."""
    data = json.loads((sample_dir / "panoptic_annotations.json").read_text())
    cats = data["categories"]
    cat_ids = [c["id"] for c in cats]
    sources = [(rgb_to_id(np.asarray(Image.open(sample_dir / "panoptic" / a["file_name"]))).astype(np.int64), a)
               for a in data["annotations"]]
    rng = np.random.default_rng(seed)
    (out_dir / "gt").mkdir(parents=True, exist_ok=True)
    (out_dir / "pred").mkdir(parents=True, exist_ok=True)
    images, gt_anns, pred_anns = [], [], []
    for k in tqdm(range(n), desc="making pairs", leave=False, disable=None):
        ids, ann = sources[k % len(sources)]
        if rng.random() < 0.5:
            ids = ids[:, ::-1]
        segs = [dict(s) for s in ann["segments_info"]]
        for s in segs:  # areas as the JSON states them, after the flip they are unchanged
            s["bbox"] = list(s["bbox"])
        name = f"{k:06d}.png"
        Image.fromarray(id_to_rgb(ids)).save(out_dir / "gt" / name)
        images.append({"id": k, "file_name": name.replace(".png", ".jpg"), "height": ids.shape[0],
                       "width": ids.shape[1]})
        gt_anns.append({"image_id": k, "file_name": name, "segments_info": segs})

        pred = np.roll(ids, (int(rng.integers(-8, 9)), int(rng.integers(-8, 9))), axis=(0, 1)).copy()
        psegs = []
        for s in segs:
            r = rng.random()
            if r < 0.08:  # dropped -> void
                pred[pred == s["id"]] = 0
                continue
            if r < 0.16 and psegs:  # merged into the previous prediction
                pred[pred == s["id"]] = psegs[-1]["id"]
                continue
            cat = int(rng.choice(cat_ids)) if r > 0.92 else s["category_id"]  # relabelled
            psegs.append({"id": s["id"], "category_id": cat})
        h, w = pred.shape
        y, x = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        pred[y:y + 40, x:x + 40] = 0  # a void hole
        present = set(np.unique(pred).tolist())
        psegs = [s for s in psegs if s["id"] in present]
        Image.fromarray(id_to_rgb(pred)).save(out_dir / "pred" / name)
        pred_anns.append({"image_id": k, "file_name": name, "segments_info": psegs})
    (out_dir / "gt.json").write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": cats}))
    (out_dir / "pred.json").write_text(json.dumps({"annotations": pred_anns}))


def max_diff(a: dict, b: dict) -> float:
    """Largest difference of All/Things/Stuff and per-class pq/sq/rq (hotcoco's -1.0 for absent classes read as 0)."""
    d = 0.0
    for key in ("All", "Things", "Stuff"):
        for m in ("pq", "sq", "rq"):
            d = max(d, abs(float(a[key][m]) - float(b[key][m])))
    for cid, r in a["per_class"].items():
        for m in ("pq", "sq", "rq"):
            other = b["per_class"].get(int(cid), b["per_class"].get(str(cid)))
            d = max(d, abs(float(r[m]) - max(float(other[m]), 0.0)))
    return d


def whole_process_times(root: Path, repeats: int) -> dict[str, float]:
    """Best wall time of ``scripts/evaluate_panoptic.py`` and of hotcoco's ``pq_compute``, each in a fresh process
    (interleaved, ``repeats`` runs each) on the pairs under ``root``."""
    script = Path(__file__).resolve().parents[1] / "evaluate_panoptic.py"
    files = [str(root / "gt.json"), str(root / "pred.json"), str(root / "gt"), str(root / "pred")]
    commands = {
        "evaluate_panoptic.py": [sys.executable, str(script), "--gt_json", files[0], "--pred_json", files[1],
                                 "--gt_folder", files[2], "--pred_folder", files[3], "--no_progress"],
        "hotcoco":
            [sys.executable, "-c", "import sys; from hotcoco import panoptic; panoptic.pq_compute(*sys.argv[1:])",
                    *files],
    }
    best = {name: float("inf") for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--num_images", type=int, default=300, help="number of image pairs")
    parser.add_argument("--workers", type=int, default=None, help="our worker threads (default: CPU count)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the best is reported")
    parser.add_argument("--data_dir", default=str(COCO_PANOPTIC_SAMPLE.root),
                        help="COCO panoptic folder whose annotations are perturbed (default: the shipped sample)")
    parser.add_argument("--keep", default=None, help="write the pairs here and keep them (default: a temp dir)")
    parser.add_argument("--processes", action="store_true", help="also time the numpy engine with worker processes")
    args = parser.parse_args(argv)

    from panopticapi import evaluation as pa

    try:
        from hotcoco import panoptic as hp
    except ImportError:
        hp = None
        print("hotcoco not installed: skipping it")

    sample = Path(args.data_dir)
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or tmp.name)
    make_pairs(sample, root, args.num_images)
    gt_json, pred_json = str(root / "gt.json"), str(root / "pred.json")
    gt_dir, pred_dir = str(root / "gt"), str(root / "pred")
    quiet = contextlib.redirect_stdout(io.StringIO())

    # --- files in --------------------------------------------------------------------------------------------------
    file_methods = {
        "panopticapi": lambda: pa.pq_compute(gt_json, pred_json, gt_dir, pred_dir),
        "ours (auto)": lambda: evaluate_panoptic_folders(gt_json, pred_json, gt_dir, pred_dir, engine="auto",
                                                         progress=False),
        "ours (numpy)": lambda: evaluate_panoptic_folders(gt_json, pred_json, gt_dir, pred_dir, engine="numpy",
                                                          num_workers=args.workers, progress=False),
    }
    if args.processes:
        file_methods["ours (numpy, processes)"] = lambda: evaluate_panoptic_folders(
            gt_json, pred_json, gt_dir, pred_dir, engine="numpy", num_workers=args.workers, use_processes=True,
            progress=False)
    if hp is not None:
        file_methods["hotcoco"] = lambda: hp.pq_compute(gt_json, pred_json, gt_dir, pred_dir)

    # --- in memory -------------------------------------------------------------------------------------------------
    gt_data, pred_data = json.loads(Path(gt_json).read_text()), json.loads(Path(pred_json).read_text())
    cache = {}
    for folder in (gt_dir, pred_dir):
        for p in Path(folder).glob("*.png"):
            cache[str(p)] = np.asarray(Image.open(p))
    categories = {c["id"]: c for c in gt_data["categories"]}
    pairs = list(zip(gt_data["annotations"], pred_data["annotations"]))

    class _CachedImage:  # stands in for PIL.Image inside panopticapi: returns the decoded array
        @staticmethod
        def open(path):
            return cache[path]

    def panopticapi_memory():
        real = pa.Image
        pa.Image = _CachedImage
        try:
            stat = pa.pq_compute_single_core(0, pairs, gt_dir, pred_dir, categories)
        finally:
            pa.Image = real
        out = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            out[name], per_class = stat.pq_average(categories, isthing=isthing)
            if name == "All":
                out["per_class"] = per_class
        return out

    def ours_memory():
        acc = PanopticQuality(gt_data["categories"], gt_area="segments")
        for g, p in pairs:
            acc.update(rgb_to_id(cache[os.path.join(pred_dir, p["file_name"])]), p["segments_info"],
                       rgb_to_id(cache[os.path.join(gt_dir, g["file_name"])]), g["segments_info"])
        return acc.compute()

    memory_methods = {"panopticapi (1 core)": panopticapi_memory, "ours (1 core)": ours_memory}

    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    for _ in tqdm(range(args.repeats), desc="timing", leave=False, disable=None):
        for name, fn in list(file_methods.items()) + list(memory_methods.items()):
            start, start_cpu = time.perf_counter(), time.process_time()
            with quiet:
                results[name] = fn()
            times.setdefault(name, []).append(time.perf_counter() - start)
            cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}

    n = args.num_images
    print(f"\n{n} image pairs ({sample.name}, {os.cpu_count()} CPUs), best of {args.repeats}")
    print(f"{'files in':24s} {'seconds':>8s} {'ms/img':>8s} {'vs panopticapi':>15s}")
    for name in file_methods:
        print(f"{name:24s} {best[name]:8.3f} {1000 * best[name] / n:8.2f} {best['panopticapi'] / best[name]:14.1f}x")
    peers = [k for k in file_methods if not k.startswith("ours")]
    fastest = min(peers, key=lambda k: best[k])
    for ours in (k for k in file_methods if k.startswith("ours")):
        print(f"{ours} vs fastest peer ({fastest}): {best[ours] / best[fastest]:.2f}x its time")
    engine = results["ours (auto)"].get("engine")
    print(f"(ours (auto) ran the {engine} engine)")
    print(f"\n{'in memory':24s} {'seconds':>8s} {'ms/img':>8s} {'vs panopticapi':>15s} {'CPU ms/img':>11s} "
          f"{'CPU ratio':>10s}")
    for name in memory_methods:
        ratio = best["panopticapi (1 core)"] / best[name]
        cpu_ratio = best_cpu["panopticapi (1 core)"] / best_cpu[name]
        print(f"{name:24s} {best[name]:8.3f} {1000 * best[name] / n:8.2f} {ratio:14.1f}x "
              f"{1000 * best_cpu[name] / n:11.2f} {cpu_ratio:9.1f}x")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(1-minute load average at the end: {load:.1f}; timings on a busy machine are inflated)")
    if hp is not None:
        whole = whole_process_times(root, args.repeats)
        print(f"\nwhole process (fresh python, best of {args.repeats}): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in whole.items()))
        ratio = whole["evaluate_panoptic.py"] / whole["hotcoco"]
        print(f"evaluate_panoptic.py vs hotcoco (whole process): {ratio:.2f}x its time (target: at most 1.25x)")
    ref = results["panopticapi"]
    diffs = {k: max_diff(ref, v) for k, v in results.items() if k != "panopticapi" and "per_class" in v}
    print("\nmax |difference| to panopticapi: " + ", ".join(f"{k}: {v:.1e}" for k, v in diffs.items()))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    cli.run(main)
