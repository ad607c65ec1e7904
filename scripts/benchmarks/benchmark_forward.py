"""Where the full-size DEARLi forward spends its time, part by part: our decoder forwards
(``decoder_implementation="dearli"``) against transformers' (``"transformers"``), measured in the same run, in float32
and, where the device has native bf16 (a CPU with ``avx512_bf16`` / AMX, a recent GPU), under bf16 autocast.

    python scripts/benchmarks/benchmark_forward.py                         # CPU, 2 threads: 640², batch 1 and 8
    python scripts/benchmarks/benchmark_forward.py --batch_sizes 1 --repeats 5 --implementations dearli
    python scripts/benchmarks/benchmark_forward.py --device cuda           # GPU: images/s and peak memory

The model is the paper's (OpenCLIP ConvNeXt-B ``convnext_base_w_320``, 200 queries, 150 classes) with random weights
(nothing is downloaded); both implementations and both precisions run the same model object, alternately, so that
load from other processes affects them alike. Each measurement is repeated (``--repeats``, after ``--warmup``) and
medians are reported.

Forward hooks time the frozen CLIP backbone, the pixel decoder and the transformer decoder inside one
``model(pixel_values)`` call (eval mode, ``torch.no_grad``); the CLIP mask pooling (``clip_classify_masks``) is timed
by wrapping it; "heads" is the rest of the forward (class head, glue). Every part is also given as a ratio to the
backbone *of the same forward*, whose median is the number to compare with the target (whole forward <= 1.6x the
backbone on 2 CPU threads). Post-processing (``post_process_panoptic_segmentation`` at the input size) is timed after
each forward; it is not part of the forward. The last line gives the float32 / bf16 time of our whole forward.
Training steps are measured by ``scripts/benchmarks/benchmark_training.py``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import os

# On a shared (oversubscribed) CPU, OpenMP's default spin-waiting makes every multi-threaded op wait for descheduled
# threads, which penalises many small ops far more than a few large ones; everything is timed under the same setting
# (as scripts/benchmark_postprocess.py does; export OMP_WAIT_POLICY=ACTIVE to override).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from training.benchmarking import PartClock, load_average, median

logger = logging.getLogger("benchmark_forward")

IMPLEMENTATIONS = ("dearli", "transformers")
FORWARD_PARTS = ("backbone", "pixel_decoder", "transformer_decoder", "mask_pooling", "heads")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                   help="Decoder forwards to compare (config.decoder_implementation); run alternately.")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="Where to run ('auto': CUDA when available).")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on a CPU.")
    p.add_argument("--clip_model_name", type=str, default="convnext_base_w_320", help="OpenCLIP architecture.")
    p.add_argument("--num_classes", type=int, default=150, help="Number of classes (ADE20K: 150).")
    p.add_argument("--num_queries", type=int, default=200, help="Object queries (paper: 200).")
    p.add_argument("--image_size", type=int, default=640, help="Square input size (paper: 640 ADE20K crops).")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="Forward batch sizes.")
    p.add_argument("--repeats", type=int, default=3, help="Measured repetitions of each measurement.")
    p.add_argument("--warmup", type=int, default=1, help="Unmeasured repetitions first.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights and inputs.")
    p.add_argument("--output_json", type=str, default=None, help="Also write the results to this JSON file.")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# Model and inputs
# --------------------------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device) -> Any:
    """The full-size model with random weights; random unit-norm class text embeddings (as if encoded)."""
    from modeling_dearli import DearliConfig, DearliForPanopticSegmentation

    torch.manual_seed(args.seed)
    names = [f"class {i}" for i in range(args.num_classes)]
    config = DearliConfig(class_names=names, thing_ids=list(range(0, args.num_classes, 2)),
                          clip_model_name=args.clip_model_name, num_queries=args.num_queries)
    model = DearliForPanopticSegmentation(config)
    with torch.no_grad():
        model.text_embeddings.copy_(torch.nn.functional.normalize(torch.randn_like(model.text_embeddings), dim=-1))
    return model.to(device)


def instrument(model: Any, timer: PartClock) -> Callable[[], None]:
    """Time the backbone, the two decoders (forward hooks) and the mask pooling (a wrapper); returns the undo."""
    handles = []
    for name, module in (("backbone", model.backbone), ("pixel_decoder", model.pixel_decoder),
                         ("transformer_decoder", model.transformer_module)):
        handles += timer.time_forward(module, name)
    model.clip_classify_masks = timer.wrap(model.clip_classify_masks, "mask_pooling")

    def undo() -> None:
        for h in handles:
            h.remove()
        del model.clip_classify_masks

    return undo




# --------------------------------------------------------------------------------------------------------------------
# Forward by component
# --------------------------------------------------------------------------------------------------------------------
def benchmark_forward(args: argparse.Namespace, model: Any, device: torch.device, batch_size: int,
                      precisions: Sequence[tuple[str, torch.dtype | None]]) -> dict[str, dict[str, Any]]:
    """``{precision label: result}``; every repeat runs each precision and implementation once, alternately, so that
    load from other processes affects them alike."""
    from modeling_dearli import DearliImageProcessor

    processor = DearliImageProcessor.from_model_config(model.config)
    generator = torch.Generator().manual_seed(args.seed + batch_size)
    pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    timer = PartClock(device)
    undo = instrument(model, timer)
    runs = {label: {impl: [] for impl in args.implementations} for label, _ in precisions}
    peak_memory: dict[str, dict[str, int]] = {label: {} for label, _ in precisions}
    model.eval()
    try:
        for repeat in range(args.warmup + args.repeats):
            for label, autocast_dtype in precisions:
                for impl in args.implementations:
                    model.config.decoder_implementation = impl
                    timer.reset()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
                    with torch.no_grad(), autocast:
                        timer.start("forward")
                        outputs = model(pixel_values)
                        timer.stop("forward")
                    timer.start("post_processing")
                    processor.post_process_panoptic_segmentation(outputs)
                    timer.stop("post_processing")
                    if device.type == "cuda":
                        peak_memory[label][impl] = torch.cuda.max_memory_allocated(device)
                    del outputs
                    if repeat >= args.warmup:
                        measured = {}
                        for clock, values in (("wall", timer.wall), ("cpu", timer.cpu)):
                            values = dict(values)
                            parts = ("backbone", "pixel_decoder", "transformer_decoder", "mask_pooling")
                            values["heads"] = values["forward"] - sum(values[p] for p in parts)
                            measured[clock] = values
                        runs[label][impl].append(measured)
    finally:
        undo()
        model.config.decoder_implementation = IMPLEMENTATIONS[0]
    return {label: summarize(runs[label], peak_memory[label], batch_size, args.repeats) for label, _ in precisions}


def summarize(runs: dict[str, list[dict[str, Any]]], peak_memory: dict[str, int], batch_size: int,
              repeats: int) -> dict[str, Any]:
    """Medians per implementation (seconds, ratios to the backbone of the same forward) and, with both
    implementations, transformers' time over ours."""
    result: dict[str, Any] = {"batch_size": batch_size, "repeats": repeats}
    names = (*FORWARD_PARTS, "forward", "post_processing")
    for impl, measured in runs.items():
        wall = [m["wall"] for m in measured]
        cpu = [m["cpu"] for m in measured]
        entry = {
            "seconds": {n: median([m[n] for m in wall]) for n in names},
            "cpu_seconds": {n: median([m[n] for m in cpu]) for n in names},
            # ratio of each part to the backbone of the same forward, median over the repeats
            "ratio_to_backbone": {n: median([m[n] / m["backbone"] for m in wall]) for n in names},
            # the same with process CPU time (less sensitive to other processes taking the cores)
            "cpu_ratio_to_backbone": {n: median([m[n] / m["backbone"] for m in cpu]) for n in names},
            "images_per_second": batch_size / median([m["forward"] for m in wall]),
        }
        if impl in peak_memory:
            entry["peak_memory_mb"] = peak_memory[impl] / 2**20
        result[impl] = entry
    if len(runs) == 2 and all(runs.values()):
        ours, theirs = ([m["wall"] for m in runs[i]] for i in IMPLEMENTATIONS)
        # per repeat: transformers' time over ours (they ran back to back)
        result["speedup_forward"] = median([t["forward"] / o["forward"] for o, t in zip(ours, theirs)])
        result["speedup_decoders"] = median([
            (t["pixel_decoder"] + t["transformer_decoder"]) / (o["pixel_decoder"] + o["transformer_decoder"])
            for o, t in zip(ours, theirs)])
    return result


def print_forward(title: str, result: dict[str, Any]) -> None:
    print(f"\n{title}")
    impls = [i for i in IMPLEMENTATIONS if i in result]
    print(f"{'':>20}" + "".join(f"{impl:>36}" for impl in impls))
    print(f"{'':>20}" + "".join(f"{'seconds':>12}{'x backbone':>12}{'(cpu time)':>12}" for _ in impls))
    for name in (*FORWARD_PARTS, "forward", "post_processing"):
        row = f"{name:>20}"
        for impl in impls:
            r = result[impl]
            row += (f"{r['seconds'][name]:>12.3f}{r['ratio_to_backbone'][name]:>12.2f}"
                    f"{r['cpu_ratio_to_backbone'][name]:>12.2f}")
        print(row)
    print(f"{'images/s':>20}" + "".join(f"{result[i]['images_per_second']:>12.2f}{'':>24}" for i in impls))
    if any("peak_memory_mb" in result[i] for i in impls):
        print(f"{'peak memory MiB':>20}" + "".join(f"{result[i].get('peak_memory_mb', 0):>12.0f}{'':>24}"
                                                 for i in impls))
    if "speedup_forward" in result:
        print(f"transformers / dearli, same run: forward {result['speedup_forward']:.2f}x, "
              f"pixel + transformer decoder {result['speedup_decoders']:.2f}x")


# --------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
    args = parse_args(argv)
    from modeling_dearli.precision import bf16_supported

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        torch.set_num_threads(args.threads)
    where = (torch.cuda.get_device_name(device) if use_cuda else
             f"CPU, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"{where}; {args.clip_model_name}, {args.num_queries} queries, {args.num_classes} classes, "
          f"{args.image_size}x{args.image_size}, random weights; {load_average()}")
    results: dict[str, Any] = {"device": where, "image_size": args.image_size, "threads": torch.get_num_threads()}

    model = build_model(args, device)
    precisions = [("fp32", None)] + ([("bf16 autocast", torch.bfloat16)] if bf16_supported(device) else [])
    for batch_size in args.batch_sizes:
        by_precision = benchmark_forward(args, model, device, batch_size, precisions)
        for label, _ in precisions:
            result = results[f"forward_batch{batch_size}_{label.split()[0]}"] = by_precision[label]
            print_forward(f"forward, batch {batch_size}, {label}: seconds, median of {args.repeats}; ratio to the "
                          f"backbone of the same forward, median ({load_average()} after)", result)
        fp32, bf16 = (results.get(f"forward_batch{batch_size}_{k}", {}).get("dearli") for k in ("fp32", "bf16"))
        if fp32 and bf16:
            speedup = fp32["seconds"]["forward"] / bf16["seconds"]["forward"]
            cpu_speedup = fp32["cpu_seconds"]["forward"] / bf16["cpu_seconds"]["forward"]
            results[f"bf16_speedup_batch{batch_size}"] = speedup
            results[f"bf16_cpu_speedup_batch{batch_size}"] = cpu_speedup
            print(f"batch {batch_size}, our forward: float32 / bf16 autocast {speedup:.2f}x wall, {cpu_speedup:.2f}x "
                  f"CPU time (backbone {fp32['seconds']['backbone'] / bf16['seconds']['backbone']:.2f}x wall); "
                  "the precisions alternate run by run")

    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
