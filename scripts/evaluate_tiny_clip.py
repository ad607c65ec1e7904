"""Zero-shot report of the miniature world's tiny CLIP, loaded through ``DearliForPanopticSegmentation.from_open_clip``.

    python scripts/evaluate_tiny_clip.py [--world_dir data/miniature] [--output report.json]

Prints the accuracy (%) of (1) whole held-out close-up crops (CLIP's global embedding), (2) mask-pooled dense features
on ground-truth masks of held-out scenes whose classes are drawn uniformly, things and stuff separately and per class,
and, with ``--world_dir``, (3) the same on a generated world's validation split (its long tail). Mask pooling runs
through the model's own ``clip_classify_masks`` (the ensembling path) with the masks at the decoder's 1/4 resolution.
The held-out images come from the ``clip_eval`` seed stream, which neither pretraining nor any world uses.

    python scripts/evaluate_tiny_clip.py --world_dir data/miniature --strong_views

With ``--strong_views`` it measures instead whether the SSL strong view keeps each region's class in the world: the
same mask-pooled accuracy on the 200 training images held out for choosing settings, seen through each perturbation
of the strong view (:mod:`training.miniature.class_identity`).
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import json

from training import cli
from training.miniature import tiny_clip, tiny_clip_zero_shot


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--clip_model_config", type=str, default=str(tiny_clip.SHIPPED_CONFIG),
                        help="OpenCLIP model-config JSON of the tiny CLIP (default: the shipped one).")
    parser.add_argument("--clip_weights", type=str, default=str(tiny_clip.SHIPPED_WEIGHTS),
                        help="OpenCLIP .safetensors weights (default: the shipped ones).")
    parser.add_argument("--crops_per_class", type=int, default=20, help="Held-out close-up crops per class.")
    parser.add_argument("--num_scenes", type=int, default=200,
                        help="Held-out 256x256 scenes (classes drawn uniformly) whose GT masks are mask-pooled.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the held-out evaluation stream.")
    parser.add_argument("--world_dir", type=str, default=None,
                        help="Also evaluate on the validation split of a world written by generate_miniature_world.py.")
    parser.add_argument("--max_world_images", type=int, default=200, help="At most this many validation images.")
    parser.add_argument("--input_scale", type=float, default=1.0,
                        help="Resize the scenes by this factor before mask pooling (2: the model run at 512 on the "
                             "256 world, a 16x16 CLIP grid instead of 8x8).")
    parser.add_argument("--strong_views", action="store_true",
                        help="Measure class identity under each strong view on --world_dir's held-out training images "
                             "instead (training/miniature/class_identity.py).")
    cli.add_report_arguments(parser)
    parser.add_argument("--num_threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.output = cli.report_path(args, inputs={"--clip_model_config": args.clip_model_config,
                                                "--clip_weights": args.clip_weights, "--world_dir": args.world_dir})
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    if args.strong_views:
        return _strong_views(args)
    report = tiny_clip_zero_shot.zero_shot_report(
        args.clip_model_config,
        args.clip_weights,
        crops_per_class=args.crops_per_class,
        num_scenes=args.num_scenes,
        seed=args.seed,
        world_dir=args.world_dir,
        max_world_images=args.max_world_images,
        input_scale=args.input_scale,
    )
    print(tiny_clip_zero_shot.format_report(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return report


def _strong_views(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from training.miniature.class_identity import class_identity_report, format_class_identity, read_scenes
    from training.miniature.reproduction import development_split

    if not args.world_dir:
        raise ValueError("--strong_views needs --world_dir")
    scenes = read_scenes(development_split(Path(args.world_dir))["val"], args.max_world_images)
    model = tiny_clip.dearli_on_tiny_clip(args.clip_model_config, args.clip_weights)
    report = class_identity_report(model, scenes, seed=args.seed)
    print(format_class_identity(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    cli.run(main)
