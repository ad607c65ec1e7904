"""Generate the miniature world: a panoptic dataset in COCO panoptic format, deterministic by seed.

    python scripts/generate_miniature_world.py --output_dir data/miniature --world_seed 0

Writes ``images/{train,val}/*.jpg``, ``panoptic/{train,val}/*.png``, ``annotations/panoptic_{train,val}.json``,
``class_names.txt`` (``id:name,synonym,...``), ``class_frequencies.md`` (per class: instances and images in the
training split, the validation split and the labeled subsets that ``--labeled_fraction F --seed S`` of the training
loops draw) and ``world.json`` (settings, seconds, the same table). The design is described in
``training/miniature/world.py``. Rerunning with the same settings on a finished world does nothing; a folder holding
anything else is refused.

    python scripts/generate_miniature_world.py --output_dir data/miniature_hf --format datasets

writes the same world as a 🤗 dataset instead: ``data/{train,validation}-*.parquet`` (images and panoptic PNGs
embedded), ``categories.json`` (the classes with synonyms and the thing/stuff split), a dataset card ``README.md``,
``world.json`` and ``class_frequencies.md``. The loops train on it with ``--dataset_name data/miniature_hf``; ``hf
upload USER/NAME data/miniature_hf --repo-type dataset`` publishes it as it is.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import json

from training import cli
from training.miniature.world import WorldSettings, generate_world, generate_world_dataset


def build_parser() -> argparse.ArgumentParser:
    d = WorldSettings()
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True, help="Folder to write the world to (new or empty).")
    parser.add_argument("--world_seed", type=int, default=0, help="Seed of the world (same seed, same bytes).")
    parser.add_argument("--num_train", type=int, default=2000, help="Training images.")
    parser.add_argument("--num_val", type=int, default=200, help="Validation images.")
    parser.add_argument("--image_size", type=int, default=d.image_size,
                        help="Side of the square images; every length scales with it (the tiny CLIP was pretrained "
                             "at the scale of 256).")
    parser.add_argument("--zipf_exponent", type=float, default=d.zipf_exponent,
                        help="Long tail of the thing classes: frequency of the k-th class ∝ k^-exponent.")
    parser.add_argument("--min_things", type=int, default=d.num_things[0], help="Fewest things placed per image.")
    parser.add_argument("--max_things", type=int, default=d.num_things[1],
                        help="Most things placed per image (hidden remnants are removed afterwards).")
    parser.add_argument("--labeled_fraction", type=float, nargs="+", default=[1 / 32, 1 / 8],
                        help="Labeled fractions whose subsets (as the loops' --labeled_fraction draws them) get a "
                             "column in the class-frequency table.")
    parser.add_argument("--split_seed", type=int, default=0,
                        help="The training loops' --seed for which the labeled subsets of the table are drawn.")
    parser.add_argument("--format", type=str, default="coco", choices=["coco", "datasets"],
                        help="'coco': COCO panoptic files (images, PNGs, annotation JSONs, class_names.txt); "
                             "'datasets': a 🤗 dataset folder (parquet shards, categories.json, dataset card) that "
                             "--dataset_name of the loops and scripts/evaluate.py --dataset read, ready for the Hub.")
    parser.add_argument("--num_workers", type=int, default=1,
                        help="Processes that render the images (the files do not depend on it).")
    parser.add_argument("--no_progress", action="store_true", help="Disable the progress bars.")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    settings = WorldSettings(image_size=args.image_size, zipf_exponent=args.zipf_exponent,
                             num_things=(args.min_things, args.max_things))
    generate = generate_world_dataset if args.format == "datasets" else generate_world
    record = generate(args.output_dir, world_seed=args.world_seed, num_train=args.num_train, num_val=args.num_val,
                      settings=settings, labeled_fractions=args.labeled_fraction, split_seed=args.split_seed,
                      progress=not args.no_progress, num_workers=args.num_workers)
    print(json.dumps({"output_dir": args.output_dir, "seconds": record["seconds"], **record["config"]}))
    return record


if __name__ == "__main__":
    cli.run(main)
