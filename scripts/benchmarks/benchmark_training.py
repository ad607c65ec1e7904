"""Peak memory and seconds per step of a supervised step vs a semi-supervised (Mean Teacher) step, in one run.

    python scripts/benchmarks/benchmark_training.py                       # tiny model, CPU, shipped COCO sample, 8 + 8 at 128x128
    python scripts/benchmarks/benchmark_training.py --full_size --crop_size 640 --device cuda   # paper setting (random weights)

Both steps use the same labeled batch (``--labeled_batch_size`` crops of the shipped COCO images) and the same model
and optimizer; the SSL step adds ``--unlabeled_batch_size`` unlabeled crops: teacher forward on the weak view, pseudo-
labels, strong view + CutMix, the unlabeled loss and the EMA update (`training.ssl_step.ssl_train_step`). The
supervised step is `training.loop.optimization_step` on the labeled batch (what `training/supervised.py` runs).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each measured step); on CPU the process's peak
resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step, with glibc's mmap threshold
pinned so that freed tensors leave the RSS; falls back to 1 ms ``psutil`` sampling elsewhere). Reported: the absolute
peak (weights, optimizer state and activations) and the increase over the memory in use before the step; ratios are
SSL / supervised. The issue's target is an absolute-peak ratio <= 1.6. For comparison the script also measures the
SSL step with one backward of the summed loss (``separate_backward=False``) instead of the default two passes.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import ctypes
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from training import cli
from training.data.package_data import COCO_PANOPTIC_SAMPLE

logger = logging.getLogger("benchmark_training")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--full_size", action="store_true",
                   help="Benchmark the paper's model (ConvNeXt-B CLIP, 200 queries; random weights) instead of the "
                        "tiny preset.")
    p.add_argument("--clip_model_name", type=str, default="convnext_base_w_320",
                   help="OpenCLIP architecture of the --full_size model.")
    p.add_argument("--num_queries", type=int, default=None, help="Override the number of queries.")
    p.add_argument("--crop_size", type=int, default=128, help="Square training crop size (paper: 640 ADE, 512 COCO).")
    p.add_argument("--labeled_batch_size", type=int, default=8, help="Labeled images per step (paper: 8).")
    p.add_argument("--unlabeled_batch_size", type=int, default=8, help="Unlabeled images per SSL step (paper: 8).")
    p.add_argument("--steps", type=int, default=3, help="Measured steps of each kind (after --warmup_steps).")
    p.add_argument("--warmup_steps", type=int, default=1, help="Unmeasured steps of each kind first.")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="Where to run ('auto': CUDA when available).")
    p.add_argument("--mixed_precision", type=str, default="no", choices=["no", "bf16", "fp16"],
                   help="Autocast precision of both steps (accelerate's mixed_precision).")
    p.add_argument("--data_dir", type=str, default=str(COCO_PANOPTIC_SAMPLE.root),
                   help="COCO-panoptic-format folder with images/, panoptic/ and panoptic_annotations.json "
                        "(default: the shipped sample).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the model, crops and augmentation.")
    p.add_argument("--output_json", type=str, default=None, help="Also write the results to this JSON file.")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# Memory measurement
# --------------------------------------------------------------------------------------------------------------------
class CpuPeakMemory:
    """Peak RSS of this process during a block (bytes): ``VmHWM`` after resetting it, or 1 ms psutil sampling."""

    def __init__(self) -> None:
        self._libc = None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so large freed blocks return to the OS
        except OSError:
            self._libc = None
        self.exact = self._can_reset()

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "VmHWM" in Path("/proc/self/status").read_text()
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def current(self) -> int:
        if self._libc is not None:
            self._libc.malloc_trim(0)
        import psutil

        return psutil.Process().memory_info().rss

    def measure(self, fn: Callable[[], Any]) -> tuple[int, int]:
        """Run `fn`; return (memory before, peak during) in bytes."""
        before = self.current()
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            fn()
            return before, max(self._status("VmHWM"), before)
        import psutil

        process, peak, done = psutil.Process(), [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return before, max(peak[0], process.memory_info().rss)


class CudaPeakMemory:
    """``torch.cuda.max_memory_allocated`` during a block."""

    exact = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def current(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def measure(self, fn: Callable[[], Any]) -> tuple[int, int]:
        before = self.current()
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return before, torch.cuda.max_memory_allocated(self.device)


# --------------------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------------------
def build_batches(args: argparse.Namespace, accelerator: Any) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """A labeled and an unlabeled batch of random crops of the sample images, and the dataset's class names."""
    from training.data.collator import DearliDataCollator
    from training.data.panoptic_datasets import dataset_class_names, load_coco_panoptic
    from training.data.train_datasets import PanopticTrainDataset, UnlabeledTrainDataset
    from training.data.transforms import ResizeShortestEdgeJitter

    data_dir = Path(args.data_dir)
    ds = load_coco_panoptic(data_dir / "images", data_dir / "panoptic", data_dir / "panoptic_annotations.json")
    class_names = dataset_class_names(ds)
    transform = ResizeShortestEdgeJitter(args.crop_size)  # the training default
    labeled = PanopticTrainDataset(ds, transform)
    unlabeled = UnlabeledTrainDataset(ds, transform, cutmix_source=True)  # the reference's CutMix (the default)
    collate = DearliDataCollator()
    seeds = torch.randint(0, 2**62, (args.labeled_batch_size + args.unlabeled_batch_size,),
                          generator=torch.Generator().manual_seed(args.seed)).tolist()
    lab = collate([labeled[(i % len(ds), seeds[i])] for i in range(args.labeled_batch_size)])
    offset = args.labeled_batch_size
    unl = collate([unlabeled[(i % len(ds), seeds[offset + i])] for i in range(args.unlabeled_batch_size)])

    def to_device(batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.to(accelerator.device)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                out[k] = [t.to(accelerator.device) for t in v]
            else:
                out[k] = v
        return out

    return to_device(lab), to_device(unl), class_names


def build_model(args: argparse.Namespace, class_names: Any) -> torch.nn.Module:
    from modeling_dearli import DearliForPanopticSegmentation, tiny_model

    overrides = {} if args.num_queries is None else {"num_queries": args.num_queries}
    torch.manual_seed(args.seed)
    if args.full_size:
        return DearliForPanopticSegmentation.from_open_clip(
            args.clip_model_name, None, class_names=list(class_names.names), thing_ids=class_names.thing_ids,
            **overrides)
    return tiny_model(class_names=list(class_names.names), thing_ids=class_names.thing_ids, seed=args.seed, **overrides)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator
    from training.ssl_step import StudentViewBuilder, ssl_train_step

    from training.data.collator import model_inputs
    from training.data.strong_augmentations import StrongAugmentation
    from training.ema import MeanTeacher
    from training.loop import optimization_step
    from training.schedules import build_optimizer, build_poly_scheduler

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=args.mixed_precision)
    meter = CudaPeakMemory(accelerator.device) if use_cuda else CpuPeakMemory()
    labeled, unlabeled, class_names = build_batches(args, accelerator)
    model = build_model(args, class_names)
    optimizer = build_optimizer(model)
    total = (args.warmup_steps + args.steps) * 3
    scheduler = build_poly_scheduler(optimizer, total + 1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    teacher = MeanTeacher(accelerator.unwrap_model(model))
    config = accelerator.unwrap_model(model).config
    builder = StudentViewBuilder(teacher, StrongAugmentation(), stuff_classes=config.stuff_ids,
                                 num_classes=config.num_classes)
    inputs = model_inputs(labeled)
    counter = {"step": 0}

    def supervised_step() -> None:
        model.train()
        outputs = model(**inputs)
        optimization_step(accelerator, outputs.loss, optimizer, scheduler, parameters, counter["step"], 0.01,
                          outputs.loss_dict)
        counter["step"] += 1

    def ssl_step(separate_backward: bool = True) -> None:
        generator = torch.Generator().manual_seed(args.seed + counter["step"])
        ssl_train_step(accelerator, model, teacher, builder, optimizer, scheduler, labeled, unlabeled, generator,
                       counter["step"], parameters=parameters, gradient_clip=0.01, separate_backward=separate_backward)
        counter["step"] += 1

    results: dict[str, Any] = {
        "device": str(accelerator.device)
        + (f" ({torch.cuda.get_device_name(accelerator.device)})" if use_cuda else ""),
        "model": "full-size " + args.clip_model_name if args.full_size else "tiny",
        "crop_size": args.crop_size, "labeled_batch_size": args.labeled_batch_size,
        "unlabeled_batch_size": args.unlabeled_batch_size, "mixed_precision": args.mixed_precision,
        "memory_method": "cuda max_memory_allocated" if use_cuda else (
            "VmHWM peak RSS" if meter.exact else "psutil RSS sampling"),
        "trainable_parameters": sum(p.numel() for p in parameters),
        "frozen_parameters": sum(
            p.numel() for p in accelerator.unwrap_model(model).parameters() if not p.requires_grad),
    }
    bar = tqdm(total=total, desc="benchmark")
    kinds = (("supervised", supervised_step), ("ssl", ssl_step),
             ("ssl_joint_backward", lambda: ssl_step(separate_backward=False)))
    for name, fn in kinds:
        times, peaks, increases = [], [], []
        for i in range(args.warmup_steps + args.steps):
            start = time.perf_counter()
            before, peak = meter.measure(fn)
            elapsed = time.perf_counter() - start
            bar.update(1)
            if i >= args.warmup_steps:
                times.append(elapsed)
                peaks.append(peak)
                increases.append(peak - before)
        results[name] = {"seconds_per_step": statistics.mean(times), "peak_memory_mb": max(peaks) / 2**20,
                         "step_memory_increase_mb": max(increases) / 2**20}
    bar.close()
    sup, ssl = results["supervised"], results["ssl"]
    results["ratio_peak_memory"] = ssl["peak_memory_mb"] / sup["peak_memory_mb"]
    results["ratio_step_memory_increase"] = ssl["step_memory_increase_mb"] / max(sup["step_memory_increase_mb"], 1e-9)
    results["ratio_seconds_per_step"] = ssl["seconds_per_step"] / sup["seconds_per_step"]
    joint = results["ssl_joint_backward"]
    results["ratio_peak_memory_joint_backward"] = joint["peak_memory_mb"] / sup["peak_memory_mb"]
    results["ratio_step_memory_increase_joint_backward"] = (
        joint["step_memory_increase_mb"] / max(sup["step_memory_increase_mb"], 1e-9))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
    args = parse_args(argv)
    results = run(args)
    print(f"device: {results['device']}; model: {results['model']}; crop {results['crop_size']}; "
          f"{results['labeled_batch_size']} labeled + {results['unlabeled_batch_size']} unlabeled; "
          f"memory: {results['memory_method']}")
    for name in ("supervised", "ssl", "ssl_joint_backward"):
        r = results[name]
        print(f"{name:>18}: {r['seconds_per_step']:.3f} s/step, peak {r['peak_memory_mb']:.1f} MiB, "
              f"step increase {r['step_memory_increase_mb']:.1f} MiB")
    print(f"ratios SSL/supervised: peak memory {results['ratio_peak_memory']:.2f}x (target <= 1.6), "
          f"step memory increase {results['ratio_step_memory_increase']:.2f}x, "
          f"time {results['ratio_seconds_per_step']:.2f}x")
    print(f"(one backward of the summed loss instead: peak memory {results['ratio_peak_memory_joint_backward']:.2f}x, "
          f"step memory increase {results['ratio_step_memory_increase_joint_backward']:.2f}x)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    cli.run(main)
