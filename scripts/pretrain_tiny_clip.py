"""Pretrain the miniature world's tiny CLIP contrastively (OpenCLIP's ClipLoss) on the generated caption stream.

    nohup nice -n 10 python scripts/pretrain_tiny_clip.py --output_dir runs/tiny_clip --seed 0 > pretrain.log 2>&1 &

A one-off: its result ships as ``training/miniature/assets/tiny_clip.safetensors`` (see ``tiny_clip_record.json``
there for the exact command). Resumable: rerun the same command after an interruption and it continues from the last
checkpoint in ``--output_dir`` (the caption stream is a function of the seed and the step, so nothing changes).
Writes ``log.jsonl`` (loss, and the zero-shot report every ``--eval_steps``), ``tiny_clip.safetensors`` (fp32),
``tiny_clip_config.json`` and ``pretrain_summary.json``; ``--export_fp16`` also writes the shipped fp16 file.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from training import cli
from training.miniature import tiny_clip, tiny_clip_zero_shot

logger = logging.getLogger("pretrain_tiny_clip")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True, help="Run folder (checkpoints, log, final weights).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial weights and of the caption stream.")
    parser.add_argument("--max_train_steps", type=int, default=4000, help="Optimizer steps.")
    parser.add_argument("--train_batch_size", type=int, default=64, help="Image-caption pairs per step.")
    parser.add_argument("--image_size", type=int, default=128, help="Side of the training crops (world pixel scale).")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Peak AdamW learning rate (cosine decay).")
    parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay of matrices.")
    parser.add_argument("--warmup_steps", type=int, default=200, help="Linear warm-up steps.")
    parser.add_argument("--checkpointing_steps", type=int, default=250,
                        help="Save a resumable checkpoint every N steps.")
    parser.add_argument("--logging_steps", type=int, default=10, help="Log the loss every N steps.")
    parser.add_argument("--eval_steps", type=int, default=0, help="Zero-shot report every N steps (0: never).")
    parser.add_argument("--kinds", type=str, default=None,
                        help='Mix of the caption stream as JSON, default {"object": 0.5, "stuff": 0.2, "scene": 0.3}.')
    parser.add_argument("--num_threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--init_weights", type=str, default=None,
                        help="Continue from these OpenCLIP .safetensors weights (fresh optimizer) instead of random "
                             "ones.")
    parser.add_argument("--stream_offset", type=int, default=0,
                        help="First step of the caption stream (a continuation reads pairs its first stage never saw).")
    parser.add_argument("--region_scenes", type=int, default=0,
                        help="Region-aware training: scenes per step whose mask-pooled regions (through the dense path "
                             "DEARLi uses) are paired with captions naming their class, in the same ClipLoss.")
    parser.add_argument("--region_size", type=int, default=256, help="Side of the region scenes (the world's size).")
    parser.add_argument("--export_fp16", type=str, default=None,
                        help="Also write the final weights in fp16 to this .safetensors path (the shipped form).")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kinds = json.loads(args.kinds) if args.kinds else None

    def eval_fn(model: torch.nn.Module) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "weights.safetensors"
            tiny_clip.save_open_clip_weights(model, weights)
            report = tiny_clip_zero_shot.zero_shot_report(Path(args.output_dir) / "tiny_clip_config.json", weights,
                                                crops_per_class=4, num_scenes=24)
        logger.info("\n%s", tiny_clip_zero_shot.format_report(report, per_class=False))
        return {k: {m: v[m] for m in ("all", "things", "stuff", "things_called_stuff")} if isinstance(v, dict) else v
                for k, v in report.items()}

    final = tiny_clip.pretrain(
        args.output_dir, seed=args.seed, max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
        image_size=args.image_size, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, checkpointing_steps=args.checkpointing_steps, logging_steps=args.logging_steps,
        num_threads=args.num_threads, kinds=kinds, eval_fn=eval_fn if args.eval_steps else None,
        eval_steps=args.eval_steps, init_weights=args.init_weights, stream_offset=args.stream_offset,
        region_scenes=args.region_scenes, region_size=args.region_size,
    )
    if args.export_fp16:
        model = tiny_clip.build_tiny_clip()
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(final)))
        tiny_clip.save_open_clip_weights(model, args.export_fp16, dtype=torch.float16)
    print(final)
    return final


if __name__ == "__main__":
    cli.run(main)
