#!/usr/bin/env python
"""End-to-end DEARLi demo on the shipped COCO sample with a tiny model, in a few minutes on a CPU.

    python scripts/demo.py --output_dir outputs/demo

Runs the paper's three stages with the project's own command-line tools, each as a subprocess, exactly as a user
would chain them:

1. SAM class-agnostic masks (``scripts/generate_sam_masks.py``). Nothing can be downloaded, so without
   ``--sam_checkpoint`` the demo writes a randomly initialised test-size SAM (``vit_tiny``) and lowers the quality
   thresholds: the masks are meaningless, but every step of the pipeline runs. Give a real ``sam_vit_h_4b8939.pth``
   (with ``--sam_model_type vit_h``) for real masks.
2. Decoder warm-up on those masks (``training/dewa.py``, localization loss only), keeping the CLIP text tower so
   that the next stage can encode the COCO class names.
3. Mean Teacher semi-supervised training (``training/ssl.py --config ssl_demo --init_from <DeWa output>``): one
   labeled and one unlabeled image.
4. Evaluation (``scripts/evaluate.py``): PQ / SQ / RQ and mIoU with ensembled inference.
5. Prediction (``scripts/predict.py``): COCO panoptic PNG + JSON and an overlay picture per image.

The tiny model's CLIP towers are random, so the numbers only show that the pipeline works, not DEARLi's accuracy.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from training.data.package_data import COCO_PANOPTIC_SAMPLE, CocoPanopticFolder

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="Folder for every stage's outputs.")
    parser.add_argument(
        "--data_dir",
        default=str(COCO_PANOPTIC_SAMPLE.root),
        help="A COCO panoptic folder (images/, panoptic/, panoptic_annotations.json); default: the two-image COCO "
        "sample that ships in the package (training/data/assets/coco_panoptic_sample).",
    )
    parser.add_argument("--sam_checkpoint", default=None, help="A real SAM checkpoint (default: a random tiny SAM).")
    parser.add_argument("--sam_model_type", default="vit_tiny", help="SAM model type of --sam_checkpoint.")
    parser.add_argument("--dewa_steps", type=int, default=20, help="Decoder warm-up steps.")
    parser.add_argument("--ssl_steps", type=int, default=20, help="Semi-supervised steps.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every stage.")
    return parser.parse_args(argv)


def run_stage(name: str, command: list[str]) -> float:
    """Run one stage as a subprocess from the repository root; stop the demo if it fails."""
    print(f"\n=== {name} ===\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    # One intra-op thread: on small CPU machines oversubscribed OpenMP threads made the tiny model ~10x slower.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo stage '{name}' failed with exit code {result.returncode}")
    seconds = time.perf_counter() - start
    print(f"--- {name}: {seconds:.1f} s", flush=True)
    return seconds


def write_random_tiny_sam(path: Path, seed: int) -> None:
    import torch

    from training.data.sam_masks import build_sam_vit_tiny

    torch.manual_seed(seed)
    torch.save(build_sam_vit_tiny().state_dict(), path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sample = CocoPanopticFolder(Path(args.data_dir).resolve())
    missing = [str(p) for p in (sample.images, sample.panoptic, sample.annotations) if not p.exists()]
    if missing:
        raise SystemExit(f"--data_dir {args.data_dir} is not a COCO panoptic folder: {', '.join(missing)} not found")
    images, panoptic, annotations = sample.images, sample.panoptic, sample.annotations
    python = sys.executable
    timings: dict[str, float] = {}

    sam_args: list[str] = []
    checkpoint = args.sam_checkpoint
    if checkpoint is None:
        checkpoint = str(out / "random_tiny_sam.pt")
        write_random_tiny_sam(Path(checkpoint), args.seed)
        # Random weights: keep every candidate mask (no quality thresholds), a coarse point grid.
        sam_args = ["--points_per_side", "4", "--pred_iou_thresh", "0", "--stability_score_thresh", "0",
                    "--box_nms_thresh", "1.0"]
    timings["sam_masks"] = run_stage("1. SAM class-agnostic masks", [
        python, "scripts/generate_sam_masks.py", "--image_dir", str(images), "--sam_checkpoint", checkpoint,
        "--model_type", args.sam_model_type, "--output_dir", str(out / "sam_masks"), "--device", "cpu", *sam_args,
    ])
    timings["dewa"] = run_stage("2. Decoder warm-up (DeWa)", [
        python, "training/dewa.py", "--model_preset", "tiny", "--keep_text_tower",
        "--sam_masks_dir", str(out / "sam_masks"), "--image_dir", str(images),
        "--crop_size", "128", "--train_batch_size", "2", "--max_train_steps", str(args.dewa_steps),
        "--checkpointing_steps", "0", "--seed", str(args.seed), "--output_dir", str(out / "dewa"),
    ])
    # The ssl_demo preset, but with all 133 COCO classes so that the model's label space matches the evaluation's.
    import yaml

    preset = yaml.safe_load((REPO_ROOT / "training" / "configs" / "ssl_demo.yaml").read_text())
    preset["restrict_to_present_classes"] = False
    ssl_config = out / "ssl_demo.yaml"
    ssl_config.write_text(yaml.safe_dump(preset))
    timings["ssl"] = run_stage("3. Mean Teacher SSL", [
        python, "training/ssl.py", "--config", str(ssl_config), "--init_from", str(out / "dewa"),
        "--train_images_dir", str(images), "--train_panoptic_dir", str(panoptic), "--train_annotations", str(annotations),
        "--val_images_dir", str(images), "--val_panoptic_dir", str(panoptic), "--val_annotations", str(annotations),
        "--max_train_steps", str(args.ssl_steps), "--seed", str(args.seed), "--output_dir", str(out / "ssl"),
    ])
    report = out / "eval_report.json"
    timings["evaluate"] = run_stage("4. Evaluation (PQ, mIoU)", [
        python, "scripts/evaluate.py", "--model_name_or_path", str(out / "ssl"), "--dataset", "custom",
        "--images_dir", str(images), "--gt_json", str(annotations), "--gt_folder", str(panoptic),
        "--size", "128", "256", "--device", "cpu", "--output", str(report), "--overwrite", "--no_progress",
    ])
    if (REPO_ROOT / "scripts" / "predict.py").exists():
        timings["predict"] = run_stage("5. Prediction pictures", [
            python, "scripts/predict.py", "--model_name_or_path", str(out / "ssl"), "--output_dir",
            str(out / "predictions"), "--overwrite", "--device", "cpu", str(images),
        ])
    summary = {"timings_s": timings, "total_s": sum(timings.values())}
    if report.exists():
        summary["report"] = {k: v for k, v in json.loads(report.read_text()).items() if k != "per_class"}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nDemo finished in {summary['total_s']:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
