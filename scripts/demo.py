#!/usr/bin/env python
"""DEARLi in miniature, in about ten minutes on a CPU: the supervised baseline and DEARLi trained on the same few
labeled images, side by side.

    python scripts/demo.py --output_dir outputs/demo

1. Generates the miniature world (training/miniature/world.py: 2,000 training and 200 validation images of 24
   colour/pattern thing classes with a long tail and 6 stuff classes), of which 1/32 are labeled.
2. Writes class-agnostic masks without labels (Felzenszwalb, scripts/generate_sam_masks.py --mask_source
   felzenszwalb) and trains, with the project's own loops on the shipped pretrained tiny CLIP:
   the supervised baseline (training/supervised.py) and DEARLi (training/dewa.py on the masks, then training/ssl.py
   with ensembled pseudo-labels), a short schedule each.
3. Prints PQ / PQ_th / PQ_st / mIoU on the validation split: supervised (decoder only), supervised + CLIP
   ensembling at test, DEARLi.
4. Writes OUTPUT_DIR/pictures/*.png (image, ground truth, supervised, DEARLi, with labels and a legend), keeps the
   models in OUTPUT_DIR/dearli and OUTPUT_DIR/supervised (load them as in the README's "Using a model"; app.py serves
   outputs/demo/dearli by default) and example images in OUTPUT_DIR/examples.

Rerun the same command after an interruption: finished work is skipped. The full table of the paper's ablation is
scripts/reproduce_miniature.py.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import logging
import os
import sys
import time

from training import cli
from training.miniature.demo import DEMO, run_demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/demo",
                        help="Folder of the world, the runs, the models, the pictures (reuse it to resume).")
    parser.add_argument("--world_seed", type=int, default=0, help="Seed of the generated world.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the labeled subset, initialisation and data order.")
    parser.add_argument("--num_workers", type=cli.positive_int, default=2,
                        help="Trainings run at once, one CPU thread each (the CPU cores to use).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Quiet loading: no "Loading weights" bars between the log lines (here and in the jobs, which inherit it).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    start = time.perf_counter()
    results = run_demo(args.output_dir, world_seed=args.world_seed, seed=args.seed, num_workers=args.num_workers)
    fraction = results["fraction"]
    rows = results["rows"]
    print(f"\nMiniature world, {fraction} of the training images labeled ({DEMO.supervised_steps} supervised steps; "
          f"DeWa {DEMO.dewa_steps} + Mean Teacher {DEMO.ssl_steps} steps), validation split; in %: panoptic "
          "quality PQ, over thing classes PQ_th, over stuff classes PQ_st, and mean IoU:")
    print(f"{'':<36}{'PQ':>7}{'PQ_th':>8}{'PQ_st':>8}{'mIoU':>8}")
    for row, title in (("supervised", "supervised (decoder posteriors)"),
                       ("supervised_ensemble", "supervised + CLIP ensemble (Eq. 6)"), ("dearli", "DEARLi")):
        m = rows[row][fraction]
        print(f"{title:<36}{m['PQ']:>7.1f}{m['PQ_th']:>8.1f}{m['PQ_st']:>8.1f}{m['mIoU']:>8.1f}")
    print(f"\npictures: {', '.join(results['pictures'])}")
    print(f"models: {results['models']['dearli']} (DEARLi), {results['models']['supervised']} (supervised)")
    print(f"{time.perf_counter() - start:.0f} s in this run ({results['cpu_seconds']:.0f} CPU-seconds in all runs)")
    return results


if __name__ == "__main__":
    cli.run(main)
