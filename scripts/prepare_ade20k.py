"""Convert ADEChallengeData2016 semantic + instance annotations to COCO panoptic format (150 classes, 100 things).

    python scripts/prepare_ade20k.py --root /data/ADEChallengeData2016 [--splits training validation] [--num_workers 8]

Writes ``ade20k_panoptic_{train,val}/`` (PNGs) and ``ade20k_panoptic_{train,val}.json`` into ``--output_dir``
(default: ``--root``); load them with ``training.data.panoptic_datasets.load_ade20k_panoptic``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import logging
import os

from training import cli
from training.data.ade20k_conversion import prepare_ade20k_panoptic


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="ADEChallengeData2016 folder (images/, annotations/, "
                        "annotations_instance/)")
    parser.add_argument("--splits", nargs="+", default=["training", "validation"],
                        choices=["training", "validation", "train", "val"], help="splits to convert")
    parser.add_argument("--output_dir", default=None, help="where to write the panoptic PNG folders and JSONs "
                        "(default: --root)")
    parser.add_argument("--num_workers", type=cli.non_negative_int, default=os.cpu_count() or 1,
                        help="worker processes (0 = convert in this process)")
    parser.add_argument("--exact_areas", action="store_true", help="measure stuff areas/bboxes after instances are "
                        "pasted (the standard conversion measures them before; keep the default to reproduce "
                        "published numbers)")
    parser.add_argument("--no_progress", action="store_true", help="disable the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.prepare_output_dir(args.output_dir or args.root, create=False)
    for split in args.splits:
        out = prepare_ade20k_panoptic(args.root, split, output_dir=args.output_dir, num_workers=args.num_workers,
                                      exact_areas=args.exact_areas, progress=not args.no_progress)
        print(f"{split}: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
