"""A short check of DEARLi on a GPU (about 8 minutes on one H100 at the defaults): speed, memory and CPU equality.

    python scripts/benchmarks/gpu_check.py --output_json gpu_check.json       # CUDA, the paper's model at 640²
    python scripts/benchmarks/gpu_check.py --device cpu --model tiny --image_size 64 --batch_size 2 \\
        --dewa_batch_size 2 --repeats 1                                      # the same code path, tiny, on a CPU

1. **forward**: images/s of the eval-mode forward (``torch.no_grad``) at ``--image_size``² and ``--batch_size``, in
   float32 and under bf16 autocast (where the device has bf16), peak memory;
2. **SSL step**: ``--batch_size`` labeled + as many unlabeled images (`training.ssl.MeanTeacherStep`, float32 as
   the released SSL stage): seconds per step and peak memory;
3. **DeWa step**: the class-agnostic warm-up's step (`training.loop.supervised_step` on the localization-only loss)
   at ``--dewa_batch_size``: seconds and peak memory;
4. **CPU equality**: one forward of the same weights on a fixed input on the CPU and on the device; the largest
   difference of each output relative to its largest magnitude.

The full-size model is the paper's (OpenCLIP ConvNeXt-B ``convnext_base_w_320``, 200 queries, 150 classes) with random
weights (nothing is downloaded); ``--model tiny`` is the test preset. Peak memory: ``torch.cuda.max_memory_allocated``
on CUDA, not measured on a CPU. The set-up (model, batches, the steps) is `benchmark_training.py`'s.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import importlib.util
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from training import cli

logger = logging.getLogger("gpu_check")


def _benchmark_training():
    """`benchmark_training.py` beside this file, as a module (scripts are not a package)."""
    path = Path(__file__).with_name("benchmark_training.py")
    spec = importlib.util.spec_from_file_location("dearli_benchmark_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--device", type=str, default="cuda", choices=["cuda", "cpu"], help="Device to check.")
    p.add_argument("--model", type=str, default="full_size", choices=["full_size", "tiny"],
                   help="The paper's model with random weights, or the tiny test preset.")
    p.add_argument("--clip_model_name", type=str, default="convnext_base_w_320",
                   help="OpenCLIP architecture of the full-size model.")
    p.add_argument("--image_size", type=int, default=640, help="Square image size.")
    p.add_argument("--batch_size", type=int, default=8,
                   help="Forward batch, and labeled (and unlabeled) images of the SSL step.")
    p.add_argument("--dewa_batch_size", type=int, default=16, help="Images per DeWa step.")
    p.add_argument("--repeats", type=int, default=3, help="Measured repetitions (after one warm-up).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the weights and inputs.")
    p.add_argument("--output_json", type=str, default=None, help="Also write the results to this JSON file.")
    return p.parse_args(argv)


def build(args: argparse.Namespace, localization_only: bool = False) -> Any:
    from modeling_dearli import tiny_model

    if args.model == "tiny":
        names = [f"class {i}" for i in range(5)]
        model = tiny_model(class_names=names, thing_ids=[0, 1], seed=args.seed)
    else:
        model = _benchmark_training().full_size_model(args.clip_model_name, args.seed)
    if localization_only:
        model.set_localization_only(True)
    return model


class Clock:
    """Seconds and peak memory (MiB; CUDA only) of a callable."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any], repeats: int) -> tuple[float, float | None]:
        fn()  # warm-up
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None
        return statistics.median(times), peak


def check_forward(args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, Any]:
    from modeling_dearli.precision import bf16_supported

    model = build(args).to(device).eval()
    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    result: dict[str, Any] = {}
    for label, bf16 in (("fp32", False), ("bf16", True)):
        if bf16 and not bf16_supported(device):
            continue
        context = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

        def forward() -> None:
            with torch.no_grad(), context:
                model(pixel_values)

        seconds, peak = clock(forward, args.repeats)
        result[label] = {"images_per_second": args.batch_size / seconds, "peak_memory_mb": peak}
    return result


def check_steps(args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, Any]:
    bench = _benchmark_training()
    result: dict[str, Any] = {}
    for name, batch_size, localization_only in (("ssl_step", args.batch_size, False),
                                                ("dewa_step", args.dewa_batch_size, True)):
        model = build(args, localization_only)
        num_classes = 1 if localization_only else model.config.num_classes
        labeled, unlabeled = bench.synthetic_batches(batch_size, args.image_size, num_classes, device, args.seed)
        steps = bench.Steps(model, labeled, unlabeled, device, seed=args.seed)
        seconds, peak = clock(steps.supervised if localization_only else steps.ssl, args.repeats)
        result[name] = {"batch_size": batch_size, "seconds_per_step": seconds, "peak_memory_mb": peak}
        del steps, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def check_cpu_equality(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """max |device - CPU| / max |CPU| of each output of one forward on a fixed input."""
    model = build(args).eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    pixel_values = torch.randn(1, 3, args.image_size, args.image_size, generator=generator)
    names = ("class_queries_logits", "masks_queries_logits", "clip_class_logits")
    with torch.no_grad():
        expected = model(pixel_values)
        actual = model.to(device)(pixel_values.to(device))
    return {name: ((actual[name].cpu().double() - expected[name].double()).abs().max()
                   / expected[name].double().abs().max().clamp(min=1e-12)).item() for name in names}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu for the CPU run)")
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; {args.model} model, {args.image_size}², batch {args.batch_size}, DeWa batch "
          f"{args.dewa_batch_size}")
    clock = Clock(device)
    results: dict[str, Any] = {"device": where, "model": args.model, "image_size": args.image_size}
    results["forward"] = check_forward(args, device, clock)
    for label, r in results["forward"].items():
        memory = "" if r["peak_memory_mb"] is None else f", peak {r['peak_memory_mb']:.0f} MiB"
        print(f"forward {label}: {r['images_per_second']:.2f} images/s{memory}")
    results.update(check_steps(args, device, clock))
    for name in ("ssl_step", "dewa_step"):
        r = results[name]
        memory = "" if r["peak_memory_mb"] is None else f", peak {r['peak_memory_mb']:.0f} MiB"
        print(f"{name} (batch {r['batch_size']}{' + ' + str(r['batch_size']) if name == 'ssl_step' else ''}): "
              f"{r['seconds_per_step']:.3f} s{memory}")
    results["cpu_equality"] = check_cpu_equality(args, device)
    print("device vs CPU, max difference / max magnitude: "
          + ", ".join(f"{k} {v:.2e}" for k, v in results["cpu_equality"].items()))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    cli.run(main)
