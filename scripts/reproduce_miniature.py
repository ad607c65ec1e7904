"""The paper's Table 1 ablation in the miniature world, on a CPU, in one command.

    python scripts/reproduce_miniature.py --output_dir runs/miniature            # full table
    python scripts/reproduce_miniature.py --output_dir runs/miniature_quick --quick

Generates the world (or reuses the one in OUTPUT_DIR/world), writes class-agnostic Felzenszwalb masks for DeWa, trains
and evaluates the rows supervised, supervised_ensemble, mean_teacher_m2f, dear and dearli for each labeled fraction
(several seeds on the headline fraction), and writes OUTPUT_DIR/results.json (PQ in percent), results.md (the table)
and pq_vs_fraction.png. Rerun the same command after an interruption: finished jobs are skipped, interrupted
trainings resume from their last checkpoint. See training/miniature/reproduction.py for what each row is.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import json
import logging
import shlex

from training.miniature.reproduction import DEFAULT_ROWS, EVALUATION_SPLITS, RECIPES, ROWS, SCHEDULES, reproduce


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True,
                        help="Folder of the world, the masks, every run and the results (reuse it to resume).")
    parser.add_argument("--schedule", default="full", choices=sorted(SCHEDULES),
                        help="How much to train: " + "; ".join(
                            f"{s.name}: {s.ssl_steps} steps per row, fractions "
                            f"{', '.join(f'1/{round(1 / f)}' for f in s.fractions)}, {s.headline_seeds} seed(s) at "
                            f"1/{round(1 / s.headline_fraction)}" for s in SCHEDULES.values()) + ".")
    parser.add_argument("--quick", action="store_const", const="quick", dest="schedule",
                        help="Same as --schedule quick.")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=ROWS,
                        help="The rows to run (default: all but the oracle dearli_oracle_masks: DeWa on the world's "
                             "ground-truth segments without classes).")
    parser.add_argument("--evaluation_split", default="val", choices=EVALUATION_SPLITS,
                        help="Evaluate on the world's validation split (the table) or on the last 10%% of its training "
                             "images, held out of training ('heldout': where settings are chosen; "
                             "results_heldout.json).")
    parser.add_argument("--curve_steps", type=int, default=None,
                        help="Also validate every N steps (PQ-vs-step curves in each run's eval_history.jsonl, "
                             "pseudo-label quality in the SSL runs' pseudo_label_quality.jsonl, curves.png; 0: off). "
                             "Default: the schedule's (200 for probe and long, off for quick and full).")
    parser.add_argument("--world_seed", type=int, default=0, help="Seed of the generated world.")
    parser.add_argument("--seed", type=int, default=0,
                        help="First seed of the runs (labeled subset, initialisation, data order); the headline "
                             "fraction also runs seed + 1, ...")
    parser.add_argument("--num_workers", type=int, default=2,
                        help="Jobs (trainings, evaluations) run at once, one intra-op thread each: the CPU cores to "
                             "use.")
    parser.add_argument("--recipe", default="released", choices=RECIPES,
                        help="Training recipe of the loops: 'released' (the presets: the reference's released "
                             "configs) or 'earlier_defaults' (the project's earlier defaults; "
                             "training/configs/RECIPE.md). "
                             "Use another --output_dir per recipe.")
    parser.add_argument("--loop_args", type=str, default="",
                        help="Extra flags appended to every training loop, e.g. '--scale_augmentation lsj' (their "
                             "runs go to the same folders: use another --output_dir for another setting).")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.num_workers < 1:
        raise SystemExit("--num_workers must be at least 1")
    results = reproduce(args.output_dir, world_seed=args.world_seed, seed=args.seed, num_workers=args.num_workers,
                        extra_args=shlex.split(args.loop_args), recipe=args.recipe, schedule=SCHEDULES[args.schedule],
                        rows=args.rows, evaluation_split=args.evaluation_split, curve_steps=args.curve_steps)
    print(json.dumps({"rows": results["rows"], "seconds": results["seconds"],
                      "cpu_seconds": results["cpu_seconds"]}, indent=1))
    print(f"results: {args.output_dir}/results.json, results.md, pq_vs_fraction.png")
    return results


if __name__ == "__main__":
    main()
