"""Evaluate panopticapi-format predictions: PQ / SQ / RQ for All, Things, Stuff and per class.

    python scripts/evaluate_panoptic.py --gt_json panoptic_val2017.json --gt_folder panoptic_val2017 \\
        --pred_json predictions.json --pred_folder predictions [--output report.json] [--per_class] \\
        [--engine {auto,hotcoco,numpy}]

Results equal ``panopticapi.evaluation.pq_compute`` on the same files. ``--engine auto`` (default) runs hotcoco's
compiled evaluator when hotcoco is installed and our numpy code otherwise.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import logging
import time

from training import cli
from training.evaluation.panoptic_quality import ENGINES, evaluate_panoptic_folders, print_report


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--gt_json", required=True, help="ground-truth COCO panoptic JSON")
    parser.add_argument("--gt_folder", default=None, help="ground-truth PNG folder (default: --gt_json without .json)")
    parser.add_argument("--pred_json", required=True, help="predictions JSON (panopticapi format)")
    parser.add_argument("--pred_folder", default=None, help="prediction PNG folder (default: --pred_json without "
                        ".json)")
    cli.add_report_arguments(parser)
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="auto: hotcoco (compiled, multi-threaded) "
                        "when installed, else numpy; hotcoco / numpy: force one")
    parser.add_argument("--num_workers", type=cli.non_negative_int, default=None,
                        help="numpy engine: worker threads (default: CPU count, 0 = serial)")
    parser.add_argument("--processes", action="store_true", help="numpy engine: use worker processes instead of "
                        "threads")
    parser.add_argument("--per_class", action="store_true", help="also print per-class results")
    parser.add_argument("--no_progress", action="store_true", help="disable the progress bar")
    args = parser.parse_args(argv)
    args.output = cli.report_path(args, inputs={
        "--gt_json": args.gt_json, "--pred_json": args.pred_json,
        "--gt_folder": args.gt_folder or args.gt_json.replace(".json", ""),  # the folders' defaults, as read
        "--pred_folder": args.pred_folder or args.pred_json.replace(".json", "")})
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    report = evaluate_panoptic_folders(args.gt_json, args.pred_json, args.gt_folder, args.pred_folder,
                                       num_workers=args.num_workers, use_processes=args.processes,
                                       progress=not args.no_progress, engine=args.engine)
    summary = f"{report['num_images']} images in {time.perf_counter() - start:.2f} s ({report['engine']} engine)"
    print_report(report, summary, per_class=args.per_class, output=args.output)
    return 0


if __name__ == "__main__":
    cli.run(main)
