"""The paper's Table 1 ablation in the miniature world, as one resumable command (``scripts/reproduce_miniature.py``).

Rows (paper Table 1, cumulative):

* ``supervised`` - M2F-Lang trained on the labeled images only (``training/supervised.py``), decoder posteriors at test
  (``ensemble_alpha`` 1);
* ``supervised_ensemble`` - the same model with Eq. 6 ensembling at test (``ensemble_alpha`` 0.6);
* ``mean_teacher_m2f`` - Mean Teacher (``training/ssl.py``) whose pseudo-labels use the decoder posteriors only
  (``--ensemble_alpha 1.0`` for the teacher);
* ``dear`` - Mean Teacher with ensembled pseudo-labels (0.6);
* ``dearli`` - DeWa (``training/dewa.py``) on class-agnostic masks without labels (Felzenszwalb,
  ``scripts/generate_sam_masks.py --mask_source felzenszwalb``; SAM weights cannot be had here), then ``dear``
  initialised from it.

Every Mean-Teacher row is evaluated with ensembling at test (0.6), as the cumulative ablation; their decoder-only PQ
is kept in ``DIR/runs/.../result.json`` too. All rows use the same frozen tiny CLIP (``assets/``), decoder sizes,
optimiser and number of steps (presets ``training/configs/miniature_*.yaml``); the Mean-Teacher rows see
``unlabeled_batch_size`` unlabeled crops per step besides the labeled ones.

Work is split into jobs (the world, the masks, one training + its evaluations per row, fraction and seed, the CLIP's
zero-shot report). Each job runs in its own process (``python -m training.miniature.reproduction JOB.json``: the
loop's ``main(argv)``, then the evaluation of the saved model) and writes ``result.json`` last; a rerun with the same
``--output_dir`` skips finished jobs and resumes interrupted trainings from their last checkpoint
(``--resume_from_checkpoint latest``). Up to ``--num_workers`` jobs run at once, one intra-op thread each.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS = ("supervised", "supervised_ensemble", "mean_teacher_m2f", "dear", "dearli", "dearli_oracle_masks")
# Rows run unless asked for by name: the oracle (DeWa on the world's ground-truth segments without classes) is never a
# headline row.
ORACLE_ROWS = ("dearli_oracle_masks",)
DEFAULT_ROWS = tuple(r for r in ROWS if r not in ORACLE_ROWS)
# The paper's expected ordering: (lower, higher, strict) pairs checked in the report.
PAPER_ORDER = (("supervised", "supervised_ensemble", True), ("supervised", "mean_teacher_m2f", True),
               ("mean_teacher_m2f", "dear", True), ("dear", "dearli", False),
               ("supervised_ensemble", "dear", True), ("supervised_ensemble", "dearli", True))
ENSEMBLE_ALPHA = 0.6  # paper Eq. 6
# Where rows are evaluated: the world's validation split (the table), or training images held out of training (where
# settings that must differ from the released configs are chosen, never on the split a table reports).
EVALUATION_SPLITS = ("val", "heldout")
HELDOUT_SHARE = 0.1  # of the world's training images: 200 of 2,000
METRICS = ("PQ", "PQ_th", "PQ_st", "mIoU")


@dataclass(frozen=True)
class Schedule:
    """How much the reproduction trains.

    Args:
        name: ``quick`` or ``full``.
        fractions: Labeled fractions of the world's training images.
        headline_fraction: The fraction run with ``headline_seeds`` seeds (the others with the first seed only).
        headline_seeds: Number of seeds on the headline fraction (``--seed``, ``--seed + 1``, ...).
        supervised_steps / ssl_steps / dewa_steps: Optimisation steps of each stage.
        mask_images: Training images given unsupervised masks for DeWa (``None``: all).
        curve_steps: Every row also validates every that many steps, and the Mean-Teacher rows score their
            pseudo-labels (PQ-vs-step curves, ``curves.png``; 0: only the final models are evaluated).
    """

    name: str
    fractions: tuple[float, ...]
    headline_fraction: float
    headline_seeds: int
    supervised_steps: int
    ssl_steps: int
    dewa_steps: int
    mask_images: int | None = None
    curve_steps: int = 0

    @property
    def ema_decay(self) -> float:
        """The teacher's EMA decay with the paper's horizon relative to the schedule: 1 / (1 - 0.999) = 1000 steps of
        80k, so ``ssl_steps / 80`` steps here (0: the teacher is the student, for schedules under 80 steps)."""
        from ..ema import ema_decay_for_schedule

        return ema_decay_for_schedule(self.ssl_steps)


# Every row trains the same number of steps with the same labeled batch (the Mean-Teacher rows add 8 unlabeled crops
# per step), as the paper's rows do. Sized for 2 CPU cores: an SSL step costs about 2.1 s, a supervised one 0.9 s, a
# DeWa one 0.9 s (one thread each, two jobs at once); "full" fits in about an hour, "quick" in about ten minutes.
SCHEDULES = {
    "quick": Schedule("quick", fractions=(1 / 32,), headline_fraction=1 / 32, headline_seeds=1, supervised_steps=100,
                      ssl_steps=100, dewa_steps=100, mask_images=400),
    "full": Schedule("full", fractions=(1 / 32, 1 / 8), headline_fraction=1 / 32, headline_seeds=2,
                     supervised_steps=250, ssl_steps=250, dewa_steps=250, mask_images=None),
    # Long enough for every row's learning curve to flatten: in 600-step runs on held-out training images the
    # supervised row's PQ stops rising after ~300 steps and the Mean-Teacher rows' after ~400 (curves.png). "probe"
    # is one seed of it, "long" three: an SSL job takes about 25 CPU-minutes (one thread), the long table with every
    # row about 6.5 CPU-hours, i.e. 3.5 hours or more on 2 cores.
    "probe": Schedule("probe", fractions=(1 / 32,), headline_fraction=1 / 32, headline_seeds=1, supervised_steps=600,
                      ssl_steps=600, dewa_steps=600, mask_images=None, curve_steps=200),
    "long": Schedule("long", fractions=(1 / 32,), headline_fraction=1 / 32, headline_seeds=3, supervised_steps=600,
                     ssl_steps=600, dewa_steps=600, mask_images=None, curve_steps=200),
}


# The training recipe of the loops: "released" = the presets' defaults (the reference's released configs, see
# training/configs/RECIPE.md); "earlier_defaults" = the project's earlier defaults, flag by flag (RECIPE.md's last
# table), for the table run with the old and the new recipe. Per loop, since each loop takes only its own flags;
# --decoder_init applies to a model built fresh (not to an --init_from one).
RECIPES = ("released", "earlier_defaults")
_EARLIER_COMMON = ["--scale_augmentation", "lsj", "--min_scale", "0.1", "--max_scale", "2.0", "--color_augmentation",
                   "none", "--weight_decay_norm", "0.05", "--weight_decay_embed", "0.05"]
_EARLIER_BY_LOOP = {"supervised": [], "dewa": ["--drop_empty_masks"],
                    "ssl": ["--ema_schedule", "ramp_up", "--cutmix_source", "same_batch"]}


def recipe_args(recipe: str, loop: str, fresh_model: bool = True) -> list[str]:
    """The flags that select `recipe` for a `loop` (``supervised`` / ``dewa`` / ``ssl``)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    if recipe == "released":
        return []
    return [*_EARLIER_COMMON, *_EARLIER_BY_LOOP[loop], *(["--decoder_init", "normal"] if fresh_model else [])]


def fraction_key(fraction: float) -> str:
    """``1/32`` for 0.03125 (the key of a fraction in ``results.json``)."""
    return f"1/{round(1 / fraction)}" if abs(1 / fraction - round(1 / fraction)) < 1e-9 else f"{fraction:g}"


# --------------------------------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One unit of work: a training loop's ``main(argv)`` (``loop``: dewa / supervised / ssl), a script's
    ``main(argv)`` (``script``), and/or evaluations of the saved model (``evaluate``: name -> ensemble_alpha), in
    ``folder``. ``after``: names of the jobs it needs."""

    name: str
    folder: str
    loop: str | None = None
    script: str | None = None
    argv: list[str] = field(default_factory=list)
    evaluate: dict[str, float] = field(default_factory=dict)
    world_dir: str | None = None
    evaluation_split: str = "val"
    oracle_masks: bool = False
    clip_report: bool = False
    fraction: str | None = None
    seed: int | None = None
    after: list[str] = field(default_factory=list)

    @property
    def result_path(self) -> Path:
        return Path(self.folder) / "result.json"

    def spec(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("after",)}


def development_split(world_dir: Path, heldout_share: float = HELDOUT_SHARE) -> dict[str, dict[str, Path]]:
    """The world's training images split into a fitting part and held-out images (the last `heldout_share` of them by
    index, at least one), as annotation files in ``world_dir/heldout`` that share the training split's image and
    panoptic folders (written once; the same files on every call). Returns :func:`world_paths`-style
    ``{"train": ..., "val": ...}``."""
    from .world import world_paths

    train = world_paths(world_dir, "train")
    folder = world_dir / "heldout"
    paths = {name: {**train, "annotations": folder / f"panoptic_{name}.json"} for name in ("fit", "heldout")}
    if not all(p["annotations"].is_file() for p in paths.values()):
        data = json.loads(train["annotations"].read_text())
        n = len(data["images"])
        num_heldout = max(1, round(heldout_share * n))
        if num_heldout >= n:
            raise ValueError(f"cannot hold out {num_heldout} of the world's {n} training images")
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in (("fit", slice(0, n - num_heldout)), ("heldout", slice(n - num_heldout, n))):
            subset = {**data, "images": data["images"][part], "annotations": data["annotations"][part]}
            tmp = paths[name]["annotations"].with_suffix(".tmp")
            tmp.write_text(json.dumps(subset))
            os.replace(tmp, paths[name]["annotations"])
    return {"train": paths["fit"], "val": paths["heldout"]}


def world_splits(world_dir: Path, evaluation_split: str = "val") -> dict[str, dict[str, Path]]:
    """The training and evaluation data of a run: the world's train / val splits, or (``"heldout"``) the training
    split less its held-out images / those images (:func:`development_split`)."""
    from .world import world_paths

    if evaluation_split not in EVALUATION_SPLITS:
        raise ValueError(f"unknown evaluation split {evaluation_split!r}; choose one of {EVALUATION_SPLITS}")
    if evaluation_split == "heldout":
        return development_split(world_dir)
    return {"train": world_paths(world_dir, "train"), "val": world_paths(world_dir, "val")}


def _world_data_args(splits: dict[str, dict[str, Path]]) -> list[str]:
    train = splits["train"]
    return ["--dataset_name", "custom", "--class_names_file", str(train["class_names"]),
            "--train_images_dir", str(train["images"]), "--train_panoptic_dir", str(train["panoptic"]),
            "--train_annotations", str(train["annotations"])]


def _curve_args(splits: dict[str, dict[str, Path]], curve_steps: int) -> list[str]:
    """Periodic validation of a loop on the evaluation split (its PQ-vs-step curve in ``eval_history.jsonl``)."""
    if not curve_steps:
        return []
    val = splits["val"]
    return ["--val_images_dir", str(val["images"]), "--val_panoptic_dir", str(val["panoptic"]),
            "--val_annotations", str(val["annotations"]), "--eval_steps", str(curve_steps)]


def _model_args() -> list[str]:
    from .tiny_clip import SHIPPED_CONFIG, SHIPPED_WEIGHTS

    return ["--clip_model_name", str(SHIPPED_CONFIG), "--clip_pretrained", str(SHIPPED_WEIGHTS)]


def runs_dir(output_dir: Path, schedule: Schedule, evaluation_split: str = "val") -> Path:
    """Folder of a schedule's runs: ``runs/<schedule>``, or ``runs/<schedule>_heldout`` for held-out evaluation."""
    return output_dir / "runs" / (schedule.name if evaluation_split == "val" else f"{schedule.name}_{evaluation_split}")


def plan_jobs(output_dir: Path, schedule: Schedule, seed: int, extra_args: Sequence[str] = (),
              rows: Sequence[str] = DEFAULT_ROWS, clip_report: bool = True, recipe: str = "released",
              evaluation_split: str = "val", curve_steps: int = 0) -> list[Job]:
    """The jobs of a reproduction (of `rows` only, with the loops' `recipe`), long ones first so that parallel workers
    finish together; every job comes after the jobs it needs. `evaluation_split`: see :func:`world_splits`;
    `curve_steps`: every row also validates every that many steps (its PQ-vs-step curve; 0: only the final model)."""
    world_dir = output_dir / "world"
    splits = world_splits(world_dir, evaluation_split)
    runs = runs_dir(output_dir, schedule, evaluation_split)
    masks_dir = output_dir / "masks_felzenszwalb"
    train_images = str(splits["train"]["images"])
    data = _world_data_args(splits)
    model = _model_args()
    common = ["--checkpointing_steps", "50", "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest",
              *extra_args]
    curves = _curve_args(splits, curve_steps)  # the loops with a validation set: supervised and ssl
    seeds_of = {f: [seed + k for k in range(schedule.headline_seeds if f == schedule.headline_fraction else 1)]
                for f in schedule.fractions}
    jobs = []
    if "dearli" in rows:
        mask_argv = ["--mask_source", "felzenszwalb", "--image_dir", train_images, "--output_dir", str(masks_dir),
                     "--no_progress"]
        if schedule.mask_images is not None:
            mask_argv += ["--max_images", str(schedule.mask_images)]
        jobs.append(Job("masks", str(runs / "masks"), script="generate_sam_masks", argv=mask_argv))
        for s in sorted({s for seeds in seeds_of.values() for s in seeds}):
            folder = runs / f"dewa_seed{s}"
            jobs.append(Job(f"dewa_seed{s}", str(folder), loop="dewa", after=["masks"], argv=[
                "--config", "miniature_dewa", *model, "--masks_dir", str(masks_dir), "--image_dir", train_images,
                "--seed", str(s), "--max_train_steps", str(schedule.dewa_steps), "--output_dir", str(folder / "model"),
                *recipe_args(recipe, "dewa"), *common]))
    if "dearli_oracle_masks" in rows:
        oracle_dir = output_dir / ("masks_oracle" if evaluation_split == "val" else f"masks_oracle_{evaluation_split}")
        jobs.append(Job("oracle_masks", str(runs / "oracle_masks"), world_dir=str(world_dir),
                        evaluation_split=evaluation_split, oracle_masks=True, argv=[str(oracle_dir)]))
        for s in sorted({s for seeds in seeds_of.values() for s in seeds}):
            folder = runs / f"dewa_oracle_seed{s}"
            jobs.append(Job(f"dewa_oracle_seed{s}", str(folder), loop="dewa", after=["oracle_masks"], argv=[
                "--config", "miniature_dewa", *model, "--masks_dir", str(oracle_dir), "--image_dir", train_images,
                "--seed", str(s), "--max_train_steps", str(schedule.dewa_steps), "--output_dir", str(folder / "model"),
                *recipe_args(recipe, "dewa"), *common]))
    # row -> (ensemble_alpha of the pseudo-labels, the DeWa run it starts from)
    ssl_rows = {"dear": (ENSEMBLE_ALPHA, None), "mean_teacher_m2f": (1.0, None), "dearli": (ENSEMBLE_ALPHA, "dewa"),
                "dearli_oracle_masks": (ENSEMBLE_ALPHA, "dewa_oracle")}
    for fraction in schedule.fractions:
        key = fraction_key(fraction)
        for s in seeds_of[fraction]:
            cell = runs / f"fraction_1_{round(1 / fraction)}" / f"seed{s}"
            base = [*data, "--labeled_fraction", repr(fraction), "--seed", str(s), *curves, *common]
            for row, (alpha, from_dewa) in ssl_rows.items():
                if row not in rows:
                    continue
                argv = ["--config", "miniature_ssl", *model, *base, "--ensemble_alpha", str(alpha), "--ema_decay",
                        str(schedule.ema_decay), "--max_train_steps", str(schedule.ssl_steps), "--output_dir",
                        str(cell / row / "model")]
                if curve_steps:
                    argv += ["--pseudo_label_eval_steps", str(curve_steps)]
                after = [f"{from_dewa}_seed{s}"] if from_dewa else []
                if from_dewa:
                    argv += ["--init_from", str(runs / after[0] / "model")]
                argv += recipe_args(recipe, "ssl", fresh_model=not from_dewa)
                jobs.append(Job(f"{row}_{key}_seed{s}", str(cell / row), loop="ssl", world_dir=str(world_dir),
                                evaluation_split=evaluation_split, fraction=key, seed=s, after=after, argv=argv,
                                evaluate={row: ENSEMBLE_ALPHA, f"{row}_decoder_only": 1.0}))
            evaluate = {r: a for r, a in (("supervised", 1.0), ("supervised_ensemble", ENSEMBLE_ALPHA)) if r in rows}
            if evaluate:
                jobs.append(Job(f"supervised_{key}_seed{s}", str(cell / "supervised"), loop="supervised",
                                world_dir=str(world_dir), evaluation_split=evaluation_split, fraction=key, seed=s,
                                evaluate=evaluate, argv=[
                                    "--config", "miniature_supervised", *model, *base, "--max_train_steps",
                                    str(schedule.supervised_steps), "--output_dir", str(cell / "supervised" / "model"),
                                    *recipe_args(recipe, "supervised")]))
    if clip_report:
        jobs.append(Job("clip_zero_shot", str(runs / "clip_zero_shot"), world_dir=str(world_dir), clip_report=True))
    return jobs


def _evaluate_model(model_dir: Path, world_dir: Path, alphas: dict[str, float], evaluation_split: str = "val"
                    ) -> dict[str, Any]:
    """PQ / mIoU of a saved model on the world's evaluation split (:func:`world_splits`), once per ensemble_alpha."""
    from torch.utils.data import DataLoader

    from modeling_dearli import DearliForPanopticSegmentation

    from ..data.collator import DearliDataCollator
    from ..data.panoptic_datasets import load_panoptic_dataset
    from ..evaluation.validation import PanopticEvalDataset, evaluate_panoptic, flatten_metrics

    val = world_splits(world_dir, evaluation_split)["val"]
    dataset, class_names = load_panoptic_dataset(
        "custom", images_dir=val["images"], panoptic_dir=val["panoptic"], annotations_json=val["annotations"],
        class_names_file=val["class_names"])
    model = DearliForPanopticSegmentation.from_pretrained(str(model_dir)).eval()
    size = json.loads((world_dir / "world.json").read_text())["config"]["settings"]["image_size"]
    loader = DataLoader(PanopticEvalDataset(dataset, size, size, class_names=class_names), batch_size=1,
                        collate_fn=DearliDataCollator())
    out = {}
    for name, alpha in alphas.items():
        report = evaluate_panoptic(model, loader, ensemble_alpha=alpha, progress=False)
        metrics = flatten_metrics(report, prefix="")
        out[name] = {"ensemble_alpha": alpha, **{k: round(metrics[k], 3) for k in METRICS},
                     "per_class_pq": {str(k): round(100 * v["pq"], 2) for k, v in report["per_class"].items()}}
    return out


def _clip_report(world_dir: Path) -> dict[str, Any]:
    from .tiny_clip import SHIPPED_CONFIG, SHIPPED_WEIGHTS, dearli_on_tiny_clip
    from .tiny_clip_zero_shot import evaluate_crops, evaluate_masks, world_split_scenes

    model = dearli_on_tiny_clip(SHIPPED_CONFIG, SHIPPED_WEIGHTS)
    keep = ("n", "all", "things", "stuff", "things_called_stuff", "per_class")
    crops = evaluate_crops(model, per_class=8)
    masks = evaluate_masks(model, world_split_scenes(world_dir, "val"))
    return {"weights": SHIPPED_WEIGHTS.name, "chance": round(100 / len(masks["per_class"]), 2),
            "crops": {k: crops[k] for k in keep if k != "per_class"},
            "masks_world_val": {k: masks[k] for k in keep}}


def _write_oracle_masks(world_dir: Path, evaluation_split: str, masks_dir: Path) -> dict[str, Any]:
    """The ground-truth segments (without classes) of the training images the rows train on, in the SAM masks'
    format (:mod:`training.miniature.oracle_masks`)."""
    from ..data.mask_generation import generate_masks
    from .oracle_masks import GroundTruthMaskGenerator

    train = world_splits(world_dir, evaluation_split)["train"]
    files = [im["file_name"] for im in json.loads(train["annotations"].read_text())["images"]]
    generator = GroundTruthMaskGenerator(train["images"], train["panoptic"], train["annotations"])
    stats = generate_masks([str(train["images"] / f) for f in files], masks_dir, mask_generator=generator,
                           progress=False)
    if stats.num_failed:
        raise RuntimeError(f"{stats.num_failed} images without oracle masks in {masks_dir}")
    return {"images": stats.num_images + stats.num_skipped, "masks": stats.num_masks}


def run_job(job: Job) -> dict[str, Any]:
    """Run one job in this process (its folder gets ``result.json`` last)."""
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    result: dict[str, Any] = {"spec": job.spec()}
    if job.loop is not None:
        import importlib

        importlib.import_module(f"training.{job.loop}").main(job.argv)
    if job.script is not None:
        import importlib.util

        path = REPO_ROOT / "scripts" / f"{job.script}.py"
        module_spec = importlib.util.spec_from_file_location(f"dearli_script_{job.script}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        code = module.main(job.argv)
        if code:
            raise RuntimeError(f"{job.script} exited with {code}")
    if job.evaluate:
        result["evaluation"] = _evaluate_model(folder / "model", Path(job.world_dir), job.evaluate,
                                               job.evaluation_split)
    if job.loop is not None:  # finished: the final model is saved, the resumable checkpoints are not needed
        shutil.rmtree(folder / "model" / "checkpoints", ignore_errors=True)
    if job.oracle_masks:
        result["masks"] = _write_oracle_masks(Path(job.world_dir), job.evaluation_split, Path(job.argv[0]))
    if job.clip_report:
        result["clip_zero_shot"] = _clip_report(Path(job.world_dir))
    result["seconds_in_process"] = round(time.perf_counter() - start, 1)
    result["cpu_seconds_in_process"] = round(time.process_time() - cpu, 1)
    tmp = job.result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, job.result_path)
    return result


# --------------------------------------------------------------------------------------------------------------------
# scheduling
# --------------------------------------------------------------------------------------------------------------------
def _finished(job: Job) -> bool:
    if not job.result_path.is_file():
        return False
    done = json.loads(job.result_path.read_text())
    if done.get("spec") != json.loads(json.dumps(job.spec())):
        raise FileExistsError(f"{job.result_path} was written with other settings than this run's; use another "
                              f"--output_dir (or remove {job.folder} to redo it)")
    return True


def run_jobs(jobs: Sequence[Job], num_workers: int = 2, threads: int = 1, timings: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Run the unfinished `jobs` in subprocesses, at most `num_workers` at once, each after the jobs it needs; returns
    (and fills `timings` with) ``{name: {"wall", "cpu"}}`` seconds of the jobs run now (CPU = user + system of the
    job's process and its children). A failed job stops the start of new ones; the running ones finish."""
    pending = [j for j in jobs if not _finished(j)]
    done = {j.name for j in jobs} - {j.name for j in pending}
    running: dict[int, tuple[Job, subprocess.Popen, float, Any]] = {}
    timings = {} if timings is None else timings
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    failed: list[str] = []
    while pending or running:
        ready = [j for j in pending if all(a in done for a in j.after)]
        while ready and len(running) < num_workers and not failed:
            job = ready.pop(0)
            pending.remove(job)
            Path(job.folder).mkdir(parents=True, exist_ok=True)
            spec_path = Path(job.folder) / "job.json"
            spec_path.write_text(json.dumps(asdict(job), indent=1))
            log = open(Path(job.folder) / "log.txt", "a")  # noqa: SIM115 (closed when the job ends)
            logger.info("start %s", job.name)
            process = subprocess.Popen([sys.executable, "-m", "training.miniature.reproduction", str(spec_path)],
                                       cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[process.pid] = (job, process, time.perf_counter(), log)
        if not running:
            if failed:
                break
            if pending:
                raise RuntimeError(f"jobs wait for jobs that never finish: {[j.name for j in pending]}")
            break
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        job, process, started, log = running.pop(pid)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        wall = time.perf_counter() - started
        timings[job.name] = {"wall": round(wall, 1), "cpu": round(usage.ru_utime + usage.ru_stime, 1)}
        if process.returncode != 0:
            failed.append(job.name)
            logger.error("%s failed (exit %s); its log: %s", job.name, process.returncode,
                         Path(job.folder) / "log.txt")
        else:
            done.add(job.name)
            logger.info("done %s: %.0f s wall, %.0f s CPU", job.name, wall, timings[job.name]["cpu"])
    if failed:
        raise RuntimeError(f"jobs failed: {failed} (see log.txt in their folders); rerun to resume")
    return timings


# --------------------------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The lines of a history file, the last line of each step kept (a resumed run repeats steps)."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            by_step[entry["step"]] = entry
    return [by_step[k] for k in sorted(by_step)]


def collect_curves(jobs: Sequence[Job]) -> dict[str, Any]:
    """Per training row (the supervised job under ``supervised_ensemble``), fraction and seed: ``pq`` = [step, PQ]
    of the periodic validation (ensembled, the models' alpha) and, for the Mean-Teacher rows, ``pseudo_labels`` /
    ``student_decoder_only`` = [step, PQ] of the pseudo-label monitor (``--curve_steps``)."""
    curves: dict[str, Any] = {}
    for job in jobs:
        if job.loop not in ("supervised", "ssl") or not job.evaluate:
            continue
        row = next(r for r in job.evaluate if not r.endswith("_decoder_only"))
        row = "supervised_ensemble" if row == "supervised" else row
        model_dir = Path(job.folder) / "model"
        key = "eval/PQ" if job.loop == "supervised" else "eval/student/PQ"
        entry = {"pq": [[e["step"], round(e[key], 2)] for e in _read_jsonl(model_dir / "eval_history.jsonl")
                        if key in e]}
        for name in ("pseudo_labels", "student_decoder_only"):
            values = [[e["step"], round(e[f"{name}/PQ"], 2)]
                      for e in _read_jsonl(model_dir / "pseudo_label_quality.jsonl") if f"{name}/PQ" in e]
            if values:
                entry[name] = values
        if any(entry.values()):
            curves.setdefault(row, {}).setdefault(job.fraction, {})[f"seed{job.seed}"] = entry
    return curves


def plot_curves(curves: dict[str, Any], path: Path) -> None:
    """Left: PQ on the evaluation split against the training step (ensembled), one line per row and seed. Right: PQ
    of the teacher's pseudo-labels (solid) and of the student's decoder (dotted) on the unlabeled images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"supervised_ensemble": "tab:blue", "mean_teacher_m2f": "tab:orange", "dear": "tab:green",
              "dearli": "tab:red", "dearli_oracle_masks": "tab:purple"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for row, fractions in curves.items():
        for fraction, seeds in fractions.items():
            for k, (seed, entry) in enumerate(sorted(seeds.items())):
                label = f"{row} ({fraction})" if k == 0 else None
                color = colors.get(row, "black")
                if entry.get("pq"):
                    left.plot(*zip(*entry["pq"]), color=color, marker=".", label=label, alpha=0.8)
                if entry.get("pseudo_labels"):
                    right.plot(*zip(*entry["pseudo_labels"]), color=color, marker=".", label=label, alpha=0.8)
                if entry.get("student_decoder_only"):
                    right.plot(*zip(*entry["student_decoder_only"]), color=color, linestyle=":", alpha=0.8)
    left.set_title("PQ on the evaluation split (ensembled)")
    right.set_title("pseudo-labels (solid) / student decoder (dotted),\nunlabeled images")
    for ax in (left, right):
        ax.set_xlabel("training step")
        ax.set_ylabel("PQ (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def collect_results(jobs: Sequence[Job], schedule: Schedule) -> dict[str, Any]:
    """``results.json``'s content from the finished jobs: ``rows`` (mean over seeds), ``per_seed``, ``spread`` (sample
    standard deviation over seeds), ``clip_zero_shot``, the decoder-only PQ of the Mean-Teacher rows."""
    per_seed: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    per_class_seeds: dict[str, dict[str, dict[str, list[float]]]] = {}
    decoder_only: dict[str, dict[str, dict[str, float]]] = {}
    clip = None
    for job in jobs:
        if not job.result_path.is_file():
            continue
        result = json.loads(job.result_path.read_text())
        if "clip_zero_shot" in result:
            clip = result["clip_zero_shot"]
        for name, values in result.get("evaluation", {}).items():
            fraction, seed = job.fraction, f"seed{job.seed}"
            metrics = {k: values[k] for k in METRICS}
            if name.endswith("_decoder_only"):
                decoder_only.setdefault(name[: -len("_decoder_only")], {}).setdefault(fraction, {})[seed] = values["PQ"]
            else:
                per_seed.setdefault(name, {}).setdefault(fraction, {})[seed] = metrics
                classes = per_class_seeds.setdefault(name, {}).setdefault(fraction, {})
                for label, pq in values.get("per_class_pq", {}).items():
                    classes.setdefault(label, []).append(pq)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    spread: dict[str, dict[str, dict[str, float]]] = {}
    for row in ROWS:
        for fraction, seeds in per_seed.get(row, {}).items():
            for metric in METRICS:
                mean, std = _mean_std([m[metric] for m in seeds.values()])
                rows.setdefault(row, {}).setdefault(fraction, {})[metric] = round(mean, 2)
                spread.setdefault(row, {}).setdefault(fraction, {})[metric] = round(std, 2)
    per_class_pq = {row: {f: {label: round(float(np.mean(v)), 2) for label, v in classes.items()}
                          for f, classes in fractions.items()} for row, fractions in per_class_seeds.items()}
    return {"rows": rows, "clip_zero_shot": clip, "per_seed": per_seed, "spread": spread,
            "per_class_pq": per_class_pq,
            "mean_teacher_rows_decoder_only_PQ": decoder_only, "schedule": asdict(schedule),
            "headline_fraction": fraction_key(schedule.headline_fraction)}


def per_class_table(results: dict[str, Any], world_dir: Path, seeds: Sequence[int],
                    rows: Sequence[str] = ("supervised", "supervised_ensemble", "dearli")) -> list[dict[str, Any]]:
    """Per class at the headline fraction: labeled instances (mean over the runs' `seeds`, as each seed draws its
    labeled subset), the tiny CLIP's mask-pooled zero-shot accuracy on the validation split, and PQ per row (mean
    over seeds); things first, rarest labeled first."""
    from .world import CLASSES, class_frequencies, labeled_indices, world_paths

    fraction = results["headline_fraction"]
    train = json.loads(world_paths(world_dir, "train")["annotations"].read_text())
    counts = [class_frequencies(train, labeled_indices(len(train["annotations"]), _fraction_value(fraction), s))
              for s in seeds]
    clip = ((results.get("clip_zero_shot") or {}).get("masks_world_val") or {}).get("per_class", {})
    table = []
    for label, spec in enumerate(sorted(CLASSES, key=lambda c: c.category_id)):
        entry = {"class": spec.name, "thing": spec.isthing,
                 "labeled_instances": round(float(np.mean([c[spec.category_id]["instances"] for c in counts])), 1),
                 "clip_accuracy": clip.get(spec.name)}
        for row in rows:
            entry[row] = results.get("per_class_pq", {}).get(row, {}).get(fraction, {}).get(str(label))
        table.append(entry)
    return sorted(table, key=lambda e: (not e["thing"], e["labeled_instances"]))


def ordering_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's ordering (:data:`PAPER_ORDER`) checked at every fraction, seed by seed: the rows of one seed share
    its labeled subset and initialisation, so each seed gives one paired difference of PQ (higher row minus lower).

    ``verdict``: ``"holds"`` when every seed's difference has the expected sign (``>= 0`` for a non-strict pair),
    ``"fails"`` when every one has the other sign, else ``"within the seed spread"``; with one seed the sign decides.
    Each check keeps the means, the per-seed differences and their mean and sample standard deviation.
    """
    checks = []
    rows, per_seed = results["rows"], results.get("per_seed", {})
    for fraction in sorted({f for r in rows.values() for f in r}, key=_fraction_value):
        for low, high, strict in PAPER_ORDER:
            if fraction not in rows.get(low, {}) or fraction not in rows.get(high, {}):
                continue
            a, b = rows[low][fraction]["PQ"], rows[high][fraction]["PQ"]
            seeds_low = per_seed.get(low, {}).get(fraction, {})
            seeds_high = per_seed.get(high, {}).get(fraction, {})
            common = sorted(set(seeds_low) & set(seeds_high))
            differences = [seeds_high[k]["PQ"] - seeds_low[k]["PQ"] for k in common] or [b - a]
            expected = [d > 0 if strict else d >= 0 for d in differences]
            verdict = ("holds" if all(expected) else "fails" if not any(expected) else "within the seed spread")
            mean, std = _mean_std(differences)
            checks.append({"fraction": fraction, "expected": f"{low} {'<' if strict else '<='} {high}",
                           "PQ": [a, b], "holds": verdict == "holds", "verdict": verdict, "seeds": common,
                           "differences": differences, "difference_mean": mean, "difference_std": std})
    return checks


def results_markdown(results: dict[str, Any]) -> str:
    """The table: PQ (PQ_th / PQ_st, mIoU) per row and fraction; mean +- standard deviation over seeds."""
    fractions = sorted({f for r in results["rows"].values() for f in r}, key=lambda f: -_fraction_value(f))
    lines = ["| row | " + " | ".join(f"{f} labeled: PQ (PQ_th / PQ_st), mIoU" for f in fractions) + " |",
             "|---|" + "---:|" * len(fractions)]
    for row in ROWS:
        cells = []
        for f in fractions:
            m = results["rows"].get(row, {}).get(f)
            if m is None:
                cells.append("-")
                continue
            n = len(results["per_seed"][row][f])
            sd = results["spread"][row][f]["PQ"]
            pm = f" ± {sd:.1f} ({n} seeds)" if n > 1 else ""
            cells.append(f"{m['PQ']:.1f}{pm} ({m['PQ_th']:.1f} / {m['PQ_st']:.1f}), {m['mIoU']:.1f}")
        lines.append(f"| `{row}` | " + " | ".join(cells) + " |")
    clip = results.get("clip_zero_shot")
    if clip:
        masks = clip["masks_world_val"]
        lines += ["", (f"Tiny CLIP zero-shot accuracy (chance {clip['chance']}%): mask-pooled ground-truth masks of "
                      f"the validation split {masks['all']}% (things {masks['things']}%, stuff {masks['stuff']}%); "
                      f"close-up crops {clip['crops']['all']}%.")]
    per_class = results.get("per_class")
    if per_class:
        rows = [r for r in ("supervised", "supervised_ensemble", "dearli") if r in per_class[0]]
        lines += ["", f"Per class at {results['headline_fraction']} labeled (mean over seeds): labeled instances, the "
                      "tiny CLIP's mask-pooled zero-shot accuracy (%), PQ per row; rarest labeled first.", "",
                  "| class | labeled inst. | CLIP acc. | " + " | ".join(f"`{r}` PQ" for r in rows) + " |",
                  "|---|---:|---:|" + "---:|" * len(rows)]
        for e in per_class:
            values = [f"{e[r]:.1f}" if e[r] is not None else "-" for r in rows]
            acc = f"{e['clip_accuracy']:.1f}" if e["clip_accuracy"] is not None else "-"
            lines.append(f"| {e['class']}{'' if e['thing'] else ' (stuff)'} | {e['labeled_instances']:g} | {acc} | "
                         + " | ".join(values) + " |")
    checks = ordering_checks(results)
    if checks:
        lines += ["", "The paper's ordering, seed by seed (PQ of the higher row minus the lower, on each seed):", "",
                  "| fraction | expected | mean PQ | per-seed difference | verdict |", "|---|---|---:|---:|---|"]
        for c in checks:
            several = len(c["differences"]) > 1
            spread = f" (mean {c['difference_mean']:+.1f} ± {c['difference_std']:.1f})" if several else ""
            lines.append(f"| {c['fraction']} | {c['expected']} | {c['PQ'][0]:.1f} vs {c['PQ'][1]:.1f} | "
                         + ", ".join(f"{d:+.1f}" for d in c["differences"]) + f"{spread} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def _fraction_value(key: str) -> float:
    if key.startswith("1/"):
        return 1 / float(key[2:])
    return float(key)


def plot_results(results: dict[str, Any], path: Path) -> None:
    """PQ against the labeled fraction (log scale), one line per row, error bars = spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    styles = {"supervised": ("tab:gray", "o", "--"), "supervised_ensemble": ("tab:blue", "s", "--"),
              "mean_teacher_m2f": ("tab:orange", "^", "-"), "dear": ("tab:green", "D", "-"),
              "dearli": ("tab:red", "*", "-"), "dearli_oracle_masks": ("tab:purple", "x", ":")}
    for row in ROWS:
        points = sorted(results["rows"].get(row, {}).items(), key=lambda kv: _fraction_value(kv[0]))
        if not points:
            continue
        xs = [_fraction_value(f) for f, _ in points]
        ys = [m["PQ"] for _, m in points]
        err = [results["spread"][row][f]["PQ"] for f, _ in points]
        color, marker, line = styles[row]
        ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, linestyle=line, capsize=3, label=row)
    ax.set_xscale("log", base=2)
    xs = sorted({_fraction_value(f) for r in results["rows"].values() for f in r})
    ax.set_xticks(xs, [f"1/{round(1 / x)}" for x in xs])
    ax.set_xlabel("labeled fraction of the training images")
    ax.set_ylabel("PQ (%)")
    ax.set_title("DEARLi in miniature: PQ on the world's validation split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------------------
def ensure_world(world_dir: Path, world_seed: int, num_workers: int = 1, **world_kwargs: Any) -> dict[str, Any]:
    """Generate the world (or reuse a finished one) with `num_workers` processes; a world interrupted while being
    written is started again."""
    from .world import generate_world

    if world_dir.exists() and not (world_dir / "world.json").is_file():
        logger.info("%s holds an unfinished world: writing it again", world_dir)
        shutil.rmtree(world_dir)
    return generate_world(world_dir, world_seed=world_seed, progress=False, num_workers=num_workers, **world_kwargs)


def reproduce(
    output_dir: str | os.PathLike[str],
    quick: bool = False,
    world_seed: int = 0,
    seed: int = 0,
    num_workers: int = 2,
    extra_args: Sequence[str] = (),
    schedule: Schedule | None = None,
    world_kwargs: dict[str, Any] | None = None,
    rows: Sequence[str] = DEFAULT_ROWS,
    clip_report: bool = True,
    recipe: str = "released",
    evaluation_split: str = "val",
    curve_steps: int | None = None,
) -> dict[str, Any]:
    """Generate (or reuse) the world, run every unfinished job, write ``results.json``, ``results.md`` and
    ``pq_vs_fraction.png`` in ``output_dir``; returns the results.

    Args:
        quick: the ``quick`` schedule instead of ``full`` (:data:`SCHEDULES`); ``schedule`` gives another one.
        world_seed / seed: seed of the world, and first seed of the runs (labeled subset, initialisation, order).
        num_workers: jobs run at once (one intra-op thread each).
        extra_args: appended to every training loop's arguments (e.g. a recipe's flags).
        world_kwargs: passed to :func:`training.miniature.world.generate_world` (e.g. ``num_train`` in tests).
        rows / clip_report: a subset of :data:`ROWS` (the demo's), and whether to measure the CLIP's zero-shot accuracy.
        recipe: the loops' training recipe (:data:`RECIPES`): the released configs' (default) or the project's
            earlier defaults.
        evaluation_split: ``"val"`` (the table) or ``"heldout"`` (training images held out of training, to choose
            settings on; :func:`world_splits`); its runs go to ``runs/<schedule>_heldout``.
        curve_steps: every row also validates every that many steps (PQ-vs-step curves; 0: off; ``None``: the
            schedule's :attr:`Schedule.curve_steps`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    schedule = schedule or SCHEDULES["quick" if quick else "full"]
    curve_steps = schedule.curve_steps if curve_steps is None else curve_steps
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    ensure_world(output_dir / "world", world_seed, num_workers, **(world_kwargs or {}))
    world_seconds = time.perf_counter() - start
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; rows are {ROWS}")
    jobs = plan_jobs(output_dir, schedule, seed, extra_args, rows, clip_report, recipe, evaluation_split, curve_steps)
    timings: dict[str, Any] = {}
    try:
        run_jobs(jobs, num_workers=num_workers, timings=timings)
    finally:  # the time spent counts, also when a job failed (a rerun resumes)
        own = resource.getrusage(resource.RUSAGE_SELF)
        timing_path = runs_dir(output_dir, schedule, evaluation_split) / "timing.json"
        timing_path.parent.mkdir(parents=True, exist_ok=True)
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"invocations": []}
        timing["invocations"].append({
            "wall_seconds": round(time.perf_counter() - start, 1), "world_seconds": round(world_seconds, 1),
            "parent_cpu_seconds": round(own.ru_utime + own.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime, 1),
            "jobs": timings})
        timing_path.write_text(json.dumps(timing, indent=1))
    results = collect_results(jobs, schedule)
    invocations = timing["invocations"]
    results["seconds"] = round(sum(i["wall_seconds"] for i in invocations), 1)
    results["cpu_seconds"] = round(sum(i["parent_cpu_seconds"] + sum(j["cpu"] for j in i["jobs"].values())
                                       for i in invocations), 1)
    results["world_seed"], results["seed"], results["recipe"] = world_seed, seed, recipe
    seeds = [seed + k for k in range(schedule.headline_seeds)]
    results["per_class"] = per_class_table(results, output_dir / "world", seeds, [r for r in (
        "supervised", "supervised_ensemble", "dearli") if r in rows])
    results["ordering"] = ordering_checks(results)
    results["evaluation_split"] = evaluation_split
    results["curves"] = collect_curves(jobs)
    tag = "" if evaluation_split == "val" else f"_{evaluation_split}"
    (output_dir / f"results{tag}.json").write_text(json.dumps(results, indent=1))
    (output_dir / f"results{tag}.md").write_text(results_markdown(results))
    plot_results(results, output_dir / f"pq_vs_fraction{tag}.png")
    if results["curves"]:
        plot_curves(results["curves"], output_dir / f"curves{tag}.png")
    return results


def _job_main(argv: Sequence[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = Job(**json.loads(Path(argv[0]).read_text()))
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run_job(job)


if __name__ == "__main__":
    _job_main(sys.argv[1:])
