"""Where the full-size DEARLi forward spends its time, part by part, and what a training step costs: our decoder
forwards (``decoder_implementation="dearli"``) against transformers' (``"transformers"``), measured in the same run.

    python scripts/benchmarks/benchmark_forward.py                         # CPU, 2 threads: forward at 640², batch 1
                                                                           # and 8, then an SSL and a supervised step
    python scripts/benchmarks/benchmark_forward.py --sections forward --batch_sizes 1 --repeats 5
    python scripts/benchmarks/benchmark_forward.py --device cuda           # GPU: fp32 and bf16 autocast, 8 + 8 steps

The model is the paper's (OpenCLIP ConvNeXt-B ``convnext_base_w_320``, 200 queries, 150 classes) with random weights
(nothing is downloaded); both implementations run the same model object, alternately, so that load from other
processes affects them alike. Each measurement is repeated (``--repeats``, after ``--warmup``) and medians are
reported.

**Forward** (eval mode, ``torch.no_grad``): forward hooks time the frozen CLIP backbone, the pixel decoder and the
transformer decoder inside one ``model(pixel_values)`` call; the CLIP mask pooling (``clip_classify_masks``) is timed
by wrapping it; "heads" is the rest of the forward (class head, glue). Every part is also given as a ratio to the
backbone *of the same forward*, whose median is the number to compare with the issue's target (whole forward <= 1.6x
the backbone on 2 CPU threads). Post-processing (``post_process_panoptic_segmentation`` at the input size) is timed
after each forward; it is not part of the forward. On CUDA: fp32 and bf16 autocast, images/s and peak memory.

**Training step** (``--sections training``): one supervised step (labeled batch: forward with the Mask2Former loss,
backward, clipped AdamW step) and one SSL step (`training.ssl_step.ssl_train_step`: teacher forward on the unlabeled
weak view, pseudo-labels, strong view, both losses, EMA update) on synthetic images (``--train_batch_size`` labeled +
as many unlabeled at ``--image_size``; default 1 + 1 on a CPU, 8 + 8 on a GPU).
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
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("benchmark_forward")

IMPLEMENTATIONS = ("dearli", "transformers")
FORWARD_PARTS = ("backbone", "pixel_decoder", "transformer_decoder", "mask_pooling", "heads")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                   help="Decoder forwards to compare (config.decoder_implementation); run alternately.")
    p.add_argument("--sections", nargs="+", default=["forward", "training"], choices=["forward", "training"],
                   help="What to measure.")
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
    p.add_argument("--train_batch_size", type=int, default=None,
                   help="Labeled (and unlabeled) images per training step (default: 1 on a CPU, 8 on a GPU).")
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


class Timer:
    """Wall-clock and process CPU seconds of labelled intervals (CUDA-synchronised on a GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._start: dict[str, tuple[float, float]] = {}

    def now(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter(), time.process_time()

    def start(self, name: str) -> None:
        self._start[name] = self.now()

    def stop(self, name: str) -> None:
        (wall0, cpu0), (wall1, cpu1) = self._start.pop(name), self.now()
        self.seconds[name] = self.seconds.get(name, 0.0) + wall1 - wall0
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + cpu1 - cpu0

    def reset(self) -> None:
        self.seconds, self.cpu_seconds = {}, {}


def instrument(model: Any, timer: Timer) -> Callable[[], None]:
    """Time the backbone, the two decoders (forward hooks) and the mask pooling (a wrapper); returns the undo."""
    handles = []
    for name, module in (("backbone", model.backbone), ("pixel_decoder", model.pixel_decoder),
                         ("transformer_decoder", model.transformer_module)):
        handles.append(module.register_forward_pre_hook(lambda *_, n=name: timer.start(n)))
        handles.append(module.register_forward_hook(lambda *_, n=name: timer.stop(n)))
    pool = model.clip_classify_masks

    def timed_pool(*a: Any, **k: Any) -> Any:
        timer.start("mask_pooling")
        out = pool(*a, **k)
        timer.stop("mask_pooling")
        return out

    model.clip_classify_masks = timed_pool

    def undo() -> None:
        for h in handles:
            h.remove()
        del model.clip_classify_masks

    return undo


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_average() -> str:
    try:
        return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "load average n/a"


# --------------------------------------------------------------------------------------------------------------------
# Forward by component
# --------------------------------------------------------------------------------------------------------------------
def benchmark_forward(args: argparse.Namespace, model: Any, device: torch.device, batch_size: int,
                      autocast_dtype: torch.dtype | None) -> dict[str, Any]:
    from modeling_dearli import DearliImageProcessor

    processor = DearliImageProcessor.from_model_config(model.config)
    generator = torch.Generator().manual_seed(args.seed + batch_size)
    pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    timer = Timer(device)
    undo = instrument(model, timer)
    runs: dict[str, list[dict[str, float]]] = {impl: [] for impl in args.implementations}
    peak_memory: dict[str, int] = {}
    model.eval()
    try:
        for repeat in range(args.warmup + args.repeats):
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
                    peak_memory[impl] = torch.cuda.max_memory_allocated(device)
                del outputs
                if repeat >= args.warmup:
                    measured = {}
                    for clock, values in (("wall", timer.seconds), ("cpu", timer.cpu_seconds)):
                        values = dict(values)
                        parts = ("backbone", "pixel_decoder", "transformer_decoder", "mask_pooling")
                        values["heads"] = values["forward"] - sum(values[p] for p in parts)
                        measured[clock] = values
                    runs[impl].append(measured)
    finally:
        undo()
        model.config.decoder_implementation = IMPLEMENTATIONS[0]

    result: dict[str, Any] = {"batch_size": batch_size, "repeats": args.repeats}
    names = (*FORWARD_PARTS, "forward", "post_processing")
    for impl, measured in runs.items():
        wall = [m["wall"] for m in measured]
        cpu = [m["cpu"] for m in measured]
        entry = {
            "seconds": {n: median([m[n] for m in wall]) for n in names},
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
# Training step
# --------------------------------------------------------------------------------------------------------------------
def synthetic_batches(args: argparse.Namespace, batch_size: int, num_classes: int, device: torch.device):
    """A labeled batch (normalised images, 4 rectangular segments each) and an unlabeled batch (RGB in [0, 1])."""
    size = args.image_size
    generator = torch.Generator().manual_seed(args.seed)
    half = size // 2
    mask_labels, class_labels = [], []
    for _ in range(batch_size):
        masks = torch.zeros(4, size, size)
        masks[0, :half, :half] = masks[1, :half, half:] = masks[2, half:, :half] = masks[3, half:, half:] = 1
        mask_labels.append(masks.to(device))
        class_labels.append(torch.randint(0, num_classes, (4,), generator=generator).to(device))
    labeled = {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).to(device),
        "pixel_mask": torch.ones(batch_size, size, size, dtype=torch.long, device=device),
        "mask_labels": mask_labels,
        "class_labels": class_labels,
    }
    unlabeled = {
        "pixel_values": torch.rand(batch_size, 3, size, size, generator=generator).to(device),
        "pixel_mask": torch.ones(batch_size, size, size, dtype=torch.long, device=device),
    }
    return labeled, unlabeled


def benchmark_training(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from accelerate import Accelerator
    from training.ssl_step import StudentViewBuilder, ssl_train_step

    from training.data.strong_augmentations import StrongAugmentation
    from training.ema import MeanTeacher
    from training.loop import optimization_step
    from training.schedules import build_optimizer, build_poly_scheduler

    accelerator = Accelerator(cpu=device.type != "cuda")
    model = build_model(args, accelerator.device)
    batch_size = args.train_batch_size or (8 if device.type == "cuda" else 1)
    labeled, unlabeled = synthetic_batches(args, batch_size, model.config.num_classes, accelerator.device)
    optimizer = build_optimizer(model)
    scheduler = build_poly_scheduler(optimizer, 10 * (args.warmup + args.repeats) * len(args.implementations))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    student = accelerator.unwrap_model(model)
    teacher = MeanTeacher(student)
    config = student.config
    builder = StudentViewBuilder(teacher, StrongAugmentation(), stuff_classes=config.stuff_ids,
                                 num_classes=config.num_classes, ensemble_alpha=config.ensemble_alpha)
    inputs = {k: labeled[k] for k in ("pixel_values", "pixel_mask", "mask_labels", "class_labels")}
    step = {"count": 0}

    def supervised_step() -> None:
        model.train()
        outputs = model(**inputs)
        optimization_step(accelerator, outputs.loss, optimizer, scheduler, parameters, step["count"], 0.01,
                          outputs.loss_dict)
        step["count"] += 1

    def ssl_step() -> None:
        generator = torch.Generator().manual_seed(args.seed + step["count"])
        ssl_train_step(accelerator, model, teacher, builder, optimizer, scheduler, labeled, unlabeled, generator,
                       step["count"], parameters=parameters, gradient_clip=0.01)
        step["count"] += 1

    timer = Timer(accelerator.device)
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {
        impl: {"supervised": [], "ssl": []} for impl in args.implementations}
    for repeat in range(args.warmup + args.repeats):
        for kind, fn in (("supervised", supervised_step), ("ssl", ssl_step)):
            for impl in args.implementations:
                config.decoder_implementation = teacher.teacher.config.decoder_implementation = impl
                timer.reset()
                timer.start(kind)
                fn()
                timer.stop(kind)
                if repeat >= args.warmup:
                    runs[impl][kind].append((timer.seconds[kind], timer.cpu_seconds[kind]))
    config.decoder_implementation = teacher.teacher.config.decoder_implementation = IMPLEMENTATIONS[0]
    result: dict[str, Any] = {"batch_size": batch_size, "repeats": args.repeats}
    for impl, kinds in runs.items():
        result[impl] = {}
        for kind, times in kinds.items():
            result[impl][f"{kind}_seconds"] = median([wall for wall, _ in times])
            result[impl][f"{kind}_cpu_seconds"] = median([cpu for _, cpu in times])
    if len(runs) == 2:
        for kind in ("supervised", "ssl"):
            ours, theirs = runs["dearli"][kind], runs["transformers"][kind]
            # per repeat: transformers' step over ours (they ran back to back)
            result[f"speedup_{kind}"] = median([t[0] / o[0] for o, t in zip(ours, theirs)])
            result[f"cpu_speedup_{kind}"] = median([t[1] / o[1] for o, t in zip(ours, theirs)])
    return result


def print_training(result: dict[str, Any]) -> None:
    n = result["batch_size"]
    print(f"\ntraining step, {n} labeled + {n} unlabeled images: seconds (process CPU seconds), median of "
          f"{result['repeats']} ({load_average()} after)")
    for impl in IMPLEMENTATIONS:
        if impl in result:
            r = result[impl]
            print(f"{impl:>20}: supervised {r['supervised_seconds']:.2f} s ({r['supervised_cpu_seconds']:.2f}), "
                  f"SSL {r['ssl_seconds']:.2f} s ({r['ssl_cpu_seconds']:.2f})")
    if "speedup_ssl" in result:
        print(f"transformers / dearli, same run: supervised step {result['speedup_supervised']:.2f}x "
              f"(CPU time {result['cpu_speedup_supervised']:.2f}x), SSL step {result['speedup_ssl']:.2f}x "
              f"(CPU time {result['cpu_speedup_ssl']:.2f}x)")


# --------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
    args = parse_args(argv)
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

    if "forward" in args.sections:
        model = build_model(args, device)
        precisions = [("fp32", None)] + ([("bf16 autocast", torch.bfloat16)] if use_cuda else [])
        for batch_size in args.batch_sizes:
            for label, dtype in precisions:
                result = benchmark_forward(args, model, device, batch_size, dtype)
                results[f"forward_batch{batch_size}_{label.split()[0]}"] = result
                print_forward(f"forward, batch {batch_size}, {label}: seconds, median of {args.repeats}; ratio to the "
                              f"backbone of the same forward, median ({load_average()} after)", result)
        del model

    if "training" in args.sections:
        result = benchmark_training(args, device)
        results["training"] = result
        print_training(result)

    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
