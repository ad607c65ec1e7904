"""The miniature reproduction's code path (scripts/reproduce_miniature.py) with very short schedules on a small world:
every job runs in its own process, results.json has the five rows, a rerun skips the finished work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.miniature import reproduction as R

SLOW = pytest.mark.slow  # the smoke run: about 80 CPU-seconds, nine jobs, each its own process

SMOKE = R.Schedule("smoke", fractions=(0.25,), headline_fraction=0.25, headline_seeds=1, supervised_steps=2,
                   ssl_steps=2, dewa_steps=2, mask_images=6)
SMALL_WORLD = {"num_train": 12, "num_val": 3}
SMOKE_OPTIONS = {"rows": R.ROWS}  # every row, the oracle's too


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reproduction")
    return out, R.reproduce(out, schedule=SMOKE, world_kwargs=SMALL_WORLD, num_workers=2, **SMOKE_OPTIONS)


@SLOW
def test_results_have_the_five_rows_in_percent_with_the_clip_report(smoke_run):
    out, results = smoke_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == results["rows"]
    assert set(results["rows"]) == set(R.ROWS)
    for row in R.ROWS:
        metrics = results["rows"][row]["1/4"]
        assert set(metrics) == {"PQ", "PQ_th", "PQ_st", "mIoU"}
        assert all(0.0 <= v <= 100.0 for v in metrics.values())
    clip = results["clip_zero_shot"]["masks_world_val"]
    assert clip["n"] > 3 and 0 <= clip["things"] <= 100
    assert results["seconds"] > 0 and results["cpu_seconds"] > 0
    assert "| `dearli` |" in (out / "results.md").read_text()
    assert (out / "pq_vs_fraction.png").stat().st_size > 1000
    # the rows are what they say: the teacher's pseudo-labels of mean_teacher_m2f are decoder-only, dearli starts
    # from DeWa on the unsupervised masks
    runs = out / "runs" / "smoke" / "fraction_1_4" / "seed0"
    mt = json.loads((runs / "mean_teacher_m2f" / "model" / "config.json").read_text())
    dear = json.loads((runs / "dear" / "model" / "config.json").read_text())
    assert mt["ensemble_alpha"] == 1.0 and dear["ensemble_alpha"] == R.ENSEMBLE_ALPHA
    dearli_job = json.loads((runs / "dearli" / "job.json").read_text())
    assert "--init_from" in dearli_job["argv"] and "dewa_seed0" in dearli_job["argv"][dearli_job["argv"].index(
        "--init_from") + 1]
    assert json.loads((out / "masks_felzenszwalb" / "manifest.json").read_text())["num_images"] == 6
    # the oracle row warms up on the ground-truth segments of every training image; curves and pseudo-label quality
    assert json.loads((out / "masks_oracle" / "manifest.json").read_text())["num_images"] == 12
    oracle_job = json.loads((runs / "dearli_oracle_masks" / "job.json").read_text())
    assert "dewa_oracle_seed0" in oracle_job["argv"][oracle_job["argv"].index("--init_from") + 1]


@SLOW
def test_held_out_evaluation_with_learning_and_pseudo_label_curves(tmp_path):
    """--evaluation_split heldout --curve_steps: rows train without the held-out training images, are evaluated on
    them, and leave their curves (validation PQ, pseudo-label quality) in results and curves.png."""
    results = R.reproduce(tmp_path, schedule=SMOKE, world_kwargs={"num_train": 20, "num_val": 2},
                          rows=["supervised", "supervised_ensemble", "dear"], evaluation_split="heldout",
                          curve_steps=1, clip_report=False)
    runs = tmp_path / "runs" / "smoke_heldout" / "fraction_1_4" / "seed0"
    job = json.loads((runs / "dear" / "job.json").read_text())
    assert job["argv"][job["argv"].index("--train_annotations") + 1].endswith("panoptic_fit.json")
    assert job["argv"][job["argv"].index("--val_annotations") + 1].endswith("panoptic_heldout.json")
    curves = results["curves"]
    assert [step for step, _ in curves["supervised_ensemble"]["1/4"]["seed0"]["pq"]] == [1, 2]
    dear = curves["dear"]["1/4"]["seed0"]
    assert [step for step, _ in dear["pseudo_labels"]] == [1, 2] and len(dear["student_decoder_only"]) == 2
    assert all(0 <= pq <= 100 for _, pq in dear["pq"] + dear["pseudo_labels"])
    assert (tmp_path / "results_heldout.json").is_file() and (tmp_path / "curves_heldout.png").stat().st_size > 1000


@SLOW
def test_rerun_skips_finished_jobs_and_refuses_other_settings(smoke_run):
    out, results = smoke_run
    again = R.reproduce(out, schedule=SMOKE, world_kwargs=SMALL_WORLD, **SMOKE_OPTIONS)
    assert again["rows"] == results["rows"]
    timing = json.loads((out / "runs" / "smoke" / "timing.json").read_text())
    assert timing["invocations"][-1]["jobs"] == {}  # nothing was run again
    longer = R.Schedule(**{**SMOKE.__dict__, "ssl_steps": 3})
    with pytest.raises(FileExistsError, match="other settings"):
        R.reproduce(out, schedule=longer, world_kwargs=SMALL_WORLD, **SMOKE_OPTIONS)


def test_schedules_and_script_help(load_script):
    assert SMOKE.ema_decay == 0.0 and R.SCHEDULES["full"].ema_decay == pytest.approx(1 - 80 / 250, abs=1e-4)
    assert R.SCHEDULES["quick"].fractions == (R.SCHEDULES["quick"].headline_fraction,)
    for schedule in R.SCHEDULES.values():  # the rows are compared at equal steps
        assert schedule.supervised_steps == schedule.ssl_steps
    assert len(R.SCHEDULES["full"].fractions) >= 2 and R.SCHEDULES["full"].headline_seeds >= 2
    parser = load_script("reproduce_miniature").build_parser()
    args = parser.parse_args(["--output_dir", "x", "--quick", "--world_seed", "3", "--seed", "2"])
    assert (args.schedule, args.world_seed, args.seed) == ("quick", 3, 2)
    assert "dearli_oracle_masks" not in parser.parse_args(["--output_dir", "x"]).rows


def test_development_split_holds_out_the_last_training_images(tmp_path):
    """Settings are chosen on training images held out of training: disjoint from the images the rows train on,
    together all of them, the same files on every call."""
    train = tmp_path / "annotations" / "panoptic_train.json"
    train.parent.mkdir()
    data = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(20)],
            "annotations": [{"image_id": i, "file_name": f"{i}.png", "segments_info": []} for i in range(20)],
            "categories": [{"id": 1, "name": "x", "isthing": 1}]}
    train.write_text(json.dumps(data))
    splits = R.world_splits(tmp_path, "heldout")
    fit, heldout = (json.loads(splits[k]["annotations"].read_text()) for k in ("train", "val"))
    assert [im["id"] for im in heldout["images"]] == [18, 19]
    assert [a["image_id"] for a in fit["annotations"]] == list(range(18))
    assert splits["val"]["images"] == tmp_path / "images" / "train" and fit["categories"] == data["categories"]
    before = splits["val"]["annotations"].stat().st_mtime_ns
    assert R.world_splits(tmp_path, "heldout") == splits and splits["val"]["annotations"].stat().st_mtime_ns == before
    assert R.world_splits(tmp_path, "val")["val"]["annotations"] == tmp_path / "annotations" / "panoptic_val.json"


@SLOW
def test_demo_keeps_working_models_and_draws_pictures(smoke_run, load_script):
    """The demo (README command 1) on the smoke run's folder: its jobs are the same, so only the demo's own work runs;
    the kept DEARLi model loads as in the README's "Using a model" and segments at the world's size."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    from training.miniature.demo import run_demo

    out, _ = smoke_run
    results = run_demo(out, schedule=SMOKE, world_kwargs=SMALL_WORLD, num_pictures=2)
    assert set(results["rows"]) == {"supervised", "supervised_ensemble", "dearli"}
    pictures = [Image.open(p) for p in results["pictures"]]
    assert len(pictures) == 2 and all(p.width >= 4 * 512 and p.height > 512 for p in pictures)
    assert len(list((out / "examples").glob("*.jpg"))) == 3
    model = AutoModelForUniversalSegmentation.from_pretrained(results["models"]["dearli"]).eval()
    processor = AutoImageProcessor.from_pretrained(results["models"]["dearli"])
    image = Image.open(sorted((out / "examples").glob("*.jpg"))[0])
    inputs = processor(images=image, return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (256, 256)
    with torch.no_grad():
        outputs = model(**inputs)
    result = processor.post_process_panoptic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    assert result["segmentation"].shape == (256, 256)
    script = load_script("demo")
    assert script.parse_args([]).output_dir == "outputs/demo"


def test_the_earlier_recipe_is_flags_every_loop_accepts(tmp_path):
    """``--recipe earlier_defaults``: each job gets the earlier defaults its loop takes (no flag left unparsed), and
    ``--decoder_init normal`` only where the model is built fresh (dearli starts from DeWa)."""
    from training.arguments import build_parser

    jobs = {j.name: j for j in R.plan_jobs(tmp_path, SMOKE, 0, recipe="earlier_defaults")}
    for job in jobs.values():
        if job.loop is None:
            continue
        args, unknown = build_parser(job.loop).parse_known_args(job.argv[2:])  # without the --config preset
        assert unknown == [], (job.name, unknown)
        assert args.scale_augmentation == "lsj" and args.color_augmentation == "none", job.name
        assert ("--decoder_init" in job.argv) == ("--init_from" not in job.argv), job.name
    assert "--drop_empty_masks" in jobs["dewa_seed0"].argv
    assert "same_batch" in jobs["dear_1/4_seed0"].argv
    released = {j.name: j.argv for j in R.plan_jobs(tmp_path, SMOKE, 0)}
    assert all("--scale_augmentation" not in argv for argv in released.values())
    with pytest.raises(ValueError, match="unknown recipe"):
        R.recipe_args("paper", "ssl")


def _results_with_seeds(pq: dict[str, list[float]]) -> dict:
    """results.json's `rows` and `per_seed` for one fraction, PQ per seed given per row."""
    per_seed = {row: {"1/32": {f"seed{k}": {"PQ": v} for k, v in enumerate(values)}} for row, values in pq.items()}
    rows = {row: {"1/32": {"PQ": sum(values) / len(values)}} for row, values in pq.items()}
    return {"rows": rows, "per_seed": per_seed}


def test_ordering_checks_compare_the_rows_seed_by_seed():
    results = _results_with_seeds({
        "supervised": [30.0, 31.0, 29.0],
        "supervised_ensemble": [40.0, 41.0, 39.0],   # above supervised on every seed
        "mean_teacher_m2f": [29.0, 33.0, 28.0],      # above on one seed only: mean 30.0 = supervised's
        "dear": [38.0, 42.0, 40.0],                  # vs supervised_ensemble: -2, +1, +1
        "dearli": [38.0, 40.0, 39.0],                # vs dear: 0, -2, -1; vs supervised_ensemble: -2, -1, 0
    })
    checks = {c["expected"]: c for c in R.ordering_checks(results)}
    assert checks["supervised < supervised_ensemble"]["verdict"] == "holds"
    assert checks["supervised < supervised_ensemble"]["differences"] == [10.0, 10.0, 10.0]
    assert checks["supervised < mean_teacher_m2f"]["verdict"] == "within the seed spread"
    assert checks["mean_teacher_m2f < dear"]["verdict"] == "holds"
    assert checks["dear <= dearli"]["verdict"] == "within the seed spread"  # the tie on seed 0 counts for <=
    assert checks["supervised_ensemble < dear"]["verdict"] == "within the seed spread"
    assert checks["supervised_ensemble < dearli"]["verdict"] == "fails"  # the tie on seed 2 does not count for <
    check = checks["supervised_ensemble < dear"]
    assert check["difference_mean"] == pytest.approx(0.0) and check["difference_std"] == pytest.approx(3 ** 0.5)


def test_ordering_checks_with_one_seed_go_by_the_sign():
    checks = {c["expected"]: c for c in R.ordering_checks(_results_with_seeds({"dear": [33.0], "dearli": [32.0]}))}
    assert list(checks) == ["dear <= dearli"]
    assert checks["dear <= dearli"]["verdict"] == "fails" and checks["dear <= dearli"]["differences"] == [-1.0]
