"""Time DEARLi post-processing against transformers' Mask2FormerImageProcessor on identical random outputs.

Both processors get the same ``class_queries_logits`` / ``masks_queries_logits`` (default: 200 queries, 133 classes,
160x160 masks resized to 640x640, a few batches) and the same thresholds (transformers' defaults); we time panoptic,
semantic and instance post-processing in one run, interleaved, and print the speed-up ratio for each.

Random outputs: ``--masks smooth`` (default) draws outputs like a trained model's (one confident query per region of a
smooth random partition, noisy duplicates that mostly predict "no object"); ``--masks noise`` uses white noise, the
worst case for our boundary-only evaluation.

    python scripts/benchmarks/benchmark_postprocess.py
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import os

# On a shared (oversubscribed) CPU, OpenMP's default spin-waiting makes every multi-threaded op wait for descheduled
# threads; both processors are timed under the same setting (override by exporting OMP_WAIT_POLICY).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import Mask2FormerImageProcessor
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from modeling_dearli.image_processing_dearli import DearliImageProcessor
from training import cli

logger = logging.getLogger("benchmark_postprocess")


def random_outputs(
    batch: int, queries: int, classes: int, mask_size: int, kind: str, generator: torch.Generator
) -> ModelOutput:
    """Random Mask2Former-like outputs (see the module docstring).

    ``smooth``: the image is a smooth random partition into ``queries // 6`` regions; one query per region predicts
    it confidently (class logit +8), the other queries duplicate a random region with noisy masks and mostly predict
    "no object" (90 %), else a class with moderate confidence. Mask logits are +-6 plus noise, smoothed 3x3.
    """
    h = w = mask_size
    logits = torch.randn(batch, queries, classes + 1, generator=generator) * 2
    top = torch.randint(0, classes, (batch, queries), generator=generator)
    if kind == "noise":
        masks = torch.randn(batch, queries, h, w, generator=generator) * 4
        boost = torch.full((batch, queries), 8.0)
        void = torch.rand(batch, queries, generator=generator) < 0.5
    else:
        regions = max(2, queries // 6)
        field = torch.randn(batch, regions, 6, 6, generator=generator)
        region = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False).argmax(1)
        owner = torch.randint(0, regions, (batch, queries), generator=generator)
        primary = torch.stack([torch.randperm(queries, generator=generator)[:regions] for _ in range(batch)])
        is_primary = torch.zeros(batch, queries, dtype=torch.bool).scatter_(1, primary, True)
        owner.scatter_(1, primary, torch.arange(regions).expand(batch, -1).contiguous())
        inside = (region[:, None] == owner[:, :, None, None]).float()
        masks = (inside * 2 - 1) * 6 + torch.randn(batch, queries, h, w, generator=generator) * 2
        masks = F.avg_pool2d(masks, 3, stride=1, padding=1)
        boost = torch.where(is_primary, 8.0, 4.0)
        void = ~is_primary & (torch.rand(batch, queries, generator=generator) < 0.9)
    logits.scatter_add_(-1, top[..., None], boost[..., None])
    logits[..., -1] += void * 12
    return ModelOutput(class_queries_logits=logits, masks_queries_logits=masks)


def timed(fn: Callable[[ModelOutput], object], outputs: ModelOutput) -> float:
    start = time.perf_counter()
    fn(outputs)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--batch_size", type=int, default=2, help="Images per batch.")
    parser.add_argument("--num_batches", type=int, default=3, help="Number of batches (different random outputs).")
    parser.add_argument("--queries", type=int, default=200, help="Number of queries.")
    parser.add_argument("--classes", type=int, default=133, help="Number of classes (COCO panoptic: 133).")
    parser.add_argument("--num_stuff", type=int, default=53, help="The last N classes are stuff (fused).")
    parser.add_argument("--mask_size", type=int, default=160, help="Mask logits resolution (square).")
    parser.add_argument("--target_size", type=int, default=640, help="Output resolution (square).")
    parser.add_argument("--masks", choices=["smooth", "noise"], default="smooth", help="Random mask kind.")
    parser.add_argument("--repeats", type=int, default=3, help="Timing repeats; the fastest is reported.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--device", default="cpu", help="Device of the outputs (transformers runs there too).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.num_batches):
        out = random_outputs(args.batch_size, args.queries, args.classes, args.mask_size, args.masks, generator)
        batches.append(ModelOutput(**{k: v.to(args.device) for k, v in out.items()}))
    stuff = set(range(args.classes - args.num_stuff, args.classes))
    sizes = [(args.target_size, args.target_size)] * args.batch_size
    ours = DearliImageProcessor(num_labels=args.classes, label_ids_to_fuse=stuff)
    theirs = Mask2FormerImageProcessor()

    tasks: dict[str, tuple[Callable, Callable]] = {
        "panoptic": (
            lambda o: ours.post_process_panoptic_segmentation(o, threshold=0.5, target_sizes=sizes),
            lambda o: theirs.post_process_panoptic_segmentation(
                o, threshold=0.5, label_ids_to_fuse=stuff, target_sizes=sizes
            ),
        ),
        "semantic": (
            lambda o: ours.post_process_semantic_segmentation(o, target_sizes=sizes),
            lambda o: theirs.post_process_semantic_segmentation(o, target_sizes=sizes),
        ),
        "instance": (
            lambda o: ours.post_process_instance_segmentation(o, threshold=0.5, target_sizes=sizes),
            lambda o: theirs.post_process_instance_segmentation(o, threshold=0.5, target_sizes=sizes),
        ),
    }
    for ours_fn, theirs_fn in tasks.values():  # warm-up
        ours_fn(batches[0])
        theirs_fn(batches[0])

    best = {task: [float("inf"), float("inf")] for task in tasks}
    steps = args.repeats * len(tasks) * len(batches)
    with tqdm(total=steps, desc="timing", leave=False) as bar:
        for _ in range(args.repeats):
            for task, (ours_fn, theirs_fn) in tasks.items():
                totals = [0.0, 0.0]
                for out in batches:
                    totals[0] += timed(ours_fn, out)
                    totals[1] += timed(theirs_fn, out)
                    bar.update()
                best[task] = [min(best[task][0], totals[0]), min(best[task][1], totals[1])]

    # Sanity: both describe the same scene (different conventions, so not identical).
    sem_ours = tasks["semantic"][0](batches[0])
    sem_theirs = tasks["semantic"][1](batches[0])
    agreement = sum((a.cpu() == b.cpu()).float().mean().item() for a, b in zip(sem_ours, sem_theirs)) / len(sem_ours)
    pan_ours = sum(len(r["segments_info"]) for r in tasks["panoptic"][0](batches[0]))

    images = args.num_batches * args.batch_size
    print(
        f"\n{images} images ({args.num_batches} batches of {args.batch_size}), {args.queries} queries, "
        f"{args.classes} classes, {args.mask_size}x{args.mask_size} masks -> {args.target_size}x{args.target_size}, "
        f"{args.masks} masks, device {args.device}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(f"{'task':<10}{'ours [s]':>12}{'transformers [s]':>20}{'speed-up':>12}")
    for task, (t_ours, t_theirs) in best.items():
        print(f"{task:<10}{t_ours:>12.3f}{t_theirs:>20.3f}{t_theirs / t_ours:>11.1f}x")
    print(f"semantic maps agree on {agreement:.1%} of pixels; {pan_ours} panoptic segments in batch 0 (ours)")


if __name__ == "__main__":
    cli.run(main)
