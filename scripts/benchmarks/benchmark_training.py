"""What a training step costs, part by part, as multiples of its own frozen backbone's forward, in one run.

    python scripts/benchmarks/benchmark_training.py                         # CPU, 2 threads: all sections
    python scripts/benchmarks/benchmark_training.py --sections full_size --repeats 2
    python scripts/benchmarks/benchmark_training.py --sections miniature --threads 1
    python scripts/benchmarks/benchmark_training.py --sections memory --device cuda

**full_size**: the paper's model (OpenCLIP ConvNeXt-B ``convnext_base_w_320``, 200 queries, 150 classes, random
weights; nothing is downloaded) on synthetic ``--image_size``² images, ``--full_size_batch_size`` labeled (+ as many
unlabeled) images, float32. The supervised step is the loops' own (`training.loop.supervised_step`), the SSL step
`training.ssl.MeanTeacherStep` (teacher passes, pseudo-labels, strong view and CutMix, both losses, EMA). Each step
is split into parts by hooks: the frozen backbone (every call, teacher's included), the pixel decoder and the
transformer decoder (student and teacher), the loss (criterion: matcher and point-sampled terms), the backward
(``accelerator.backward``), and the rest (optimizer, clipping, EMA, pseudo-labels, augmentation, glue). Every part is
printed in seconds and as a ratio to **one** backbone forward of the same step (the mean over its calls), in process
CPU seconds (robust to other jobs on a shared CPU) and wall seconds; medians over ``--repeats``.

**miniature**: the miniature world's supervised and SSL steps (presets ``miniature_supervised`` / ``miniature_ssl``:
the shipped tiny CLIP, the tiny decoder, 8 + 8 crops of 256²), synthetic images, float32 and bf16 autocast
(``--mixed_precision bf16``, where the CPU has native bf16), seconds per step and the bf16 / fp32 ratio.

**memory**: peak memory and seconds of the supervised vs the SSL step on crops of the shipped COCO sample
(``--memory_batch_size`` + as many unlabeled at ``--memory_crop_size``, tiny model unless ``--memory_full_size``);
the SSL/supervised peak-memory ratio (target <= 1.6), also for one backward of the summed loss.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import os

# On a shared (oversubscribed) CPU, OpenMP's default spin-waiting makes every multi-threaded op wait for descheduled
# threads; everything is timed under the same setting (export OMP_WAIT_POLICY=ACTIVE to override).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import ctypes
import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from training import cli
from training.benchmarking import PartClock, load_average, median
from training.data.package_data import COCO_PANOPTIC_SAMPLE

logger = logging.getLogger("benchmark_training")

SECTIONS = ("full_size", "miniature", "memory")
PARTS = ("backbone", "pixel_decoder", "transformer_decoder", "loss", "backward", "rest")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="What to measure.")
    p.add_argument("--count_flops", action="store_true",
                   help="full_size: also count the floating-point operations (matrix products and convolutions, "
                        "torch.utils.flop_counter) of one supervised step, forward and backward, and of one backbone "
                        "forward; their ratio is the step's lower bound in multiples of the backbone at equal FLOP "
                        "rates.")
    p.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="Where to run ('auto': CUDA when available).")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on a CPU.")
    p.add_argument("--repeats", type=int, default=2, help="Measured steps of each kind (medians are printed).")
    p.add_argument("--warmup", type=int, default=1, help="Unmeasured steps of each kind first.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the weights, images and augmentations.")
    p.add_argument("--clip_model_name", type=str, default="convnext_base_w_320",
                   help="OpenCLIP architecture of the full-size model.")
    p.add_argument("--image_size", type=int, default=640, help="Full-size square images (paper: 640 ADE20K crops).")
    p.add_argument("--full_size_batch_size", type=int, default=1,
                   help="Full-size labeled (and unlabeled) images per step.")
    p.add_argument("--miniature_precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"],
                   help="Mixed precision of the miniature steps ('bf16' is skipped on a CPU without native bf16).")
    p.add_argument("--memory_crop_size", type=int, default=128, help="Square crops of the memory section.")
    p.add_argument("--memory_batch_size", type=int, default=8,
                   help="Labeled (and unlabeled) images per step of the memory section.")
    p.add_argument("--memory_full_size", action="store_true",
                   help="Memory section on the full-size model (random weights) instead of the tiny preset.")
    p.add_argument("--data_dir", type=str, default=str(COCO_PANOPTIC_SAMPLE.root),
                   help="COCO-panoptic-format folder of the memory section's crops (default: the shipped sample).")
    p.add_argument("--output_json", type=str, default=None, help="Also write the results to this JSON file.")
    p.add_argument("--miniature_process", nargs=2, metavar=("PRECISION", "JSON"), default=None,
                   help="Only time the miniature steps at PRECISION ('no' or 'bf16') in this process and write the "
                        "seconds to JSON (what the miniature section runs in its subprocesses).")
    return p.parse_args(argv)




# --------------------------------------------------------------------------------------------------------------------
# Set-up shared by the sections: model, optimizer, teacher, batches, the two steps
# --------------------------------------------------------------------------------------------------------------------
def full_size_model(clip_model_name: str, seed: int, num_classes: int = 150) -> Any:
    """The paper's model with random weights and random unit-norm class text embeddings (as if encoded)."""
    from modeling_dearli import DearliConfig, DearliForPanopticSegmentation

    torch.manual_seed(seed)
    names = [f"class {i}" for i in range(num_classes)]
    config = DearliConfig(class_names=names, thing_ids=list(range(0, num_classes, 2)), clip_model_name=clip_model_name)
    model = DearliForPanopticSegmentation(config)
    with torch.no_grad():
        model.text_embeddings.copy_(torch.nn.functional.normalize(torch.randn_like(model.text_embeddings), dim=-1))
    return model


def miniature_model(seed: int, num_classes: int = 30) -> tuple[Any, argparse.Namespace]:
    """The miniature presets' model (shipped tiny CLIP, tiny decoder) and the supervised preset's arguments."""
    from training.arguments import parse_args as parse_loop_args
    from training.miniature.reproduction import _model_args
    from training.model_init import build_model

    unused = ["--output_dir", "unused", "--train_images_dir", "unused", "--train_panoptic_dir", "unused",
              "--train_annotations", "unused"]  # parsed, never read
    args = parse_loop_args("supervised", ["--config", "miniature_supervised", *_model_args(), *unused,
                                          "--seed", str(seed)])
    names = [f"class {i}" for i in range(num_classes)]
    return build_model(args, names, list(range(0, num_classes, 2))), args


def synthetic_batches(batch_size: int, size: int, num_classes: int, device: torch.device, seed: int):
    """A labeled batch (normalised images, 4 rectangular segments each) and an unlabeled batch (RGB in [0, 1], with
    separate CutMix source crops, as `UnlabeledTrainDataset(..., cutmix_source=True)` gives)."""
    generator = torch.Generator().manual_seed(seed)
    half = size // 2
    mask_labels, class_labels = [], []
    for _ in range(batch_size):
        masks = torch.zeros(4, size, size)
        masks[0, :half, :half] = masks[1, :half, half:] = masks[2, half:, :half] = masks[3, half:, half:] = 1
        mask_labels.append(masks.to(device))
        class_labels.append(torch.randint(0, num_classes, (4,), generator=generator).to(device))
    ones = torch.ones(batch_size, size, size, dtype=torch.long, device=device)
    labeled = {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).to(device),
               "pixel_mask": ones, "mask_labels": mask_labels, "class_labels": class_labels}
    unlabeled = {"pixel_values": torch.rand(batch_size, 3, size, size, generator=generator).to(device),
                 "pixel_mask": ones,
                 "cutmix_pixel_values": list(torch.rand(batch_size, 3, size, size, generator=generator).to(device)),
                 "cutmix_pixel_mask": list(ones)}
    return labeled, unlabeled


class Steps:
    """The model, optimizer, scheduler and teacher prepared by one `Accelerator`, and the project's two steps:
    ``supervised()`` (`training.loop.supervised_step`) and ``ssl()`` (`training.ssl.MeanTeacherStep`)."""

    def __init__(self, model: Any, labeled: dict, unlabeled: dict, device: torch.device, mixed_precision: str = "no",
                 learning_rate: float = 1e-4, gradient_clip: float = 0.01, seed: int = 0, max_steps: int = 1000,
                 ssl_settings: dict[str, Any] | None = None) -> None:
        from accelerate import Accelerator

        from training.data.strong_augmentations import StrongAugmentation
        from training.ema import MeanTeacher
        from training.loop import PreparedTraining, resolve_mixed_precision
        from training.schedules import build_optimizer, build_poly_scheduler
        from training.ssl import MeanTeacherStep
        from training.student_views import StudentViewBuilder

        resolve_mixed_precision(mixed_precision)  # refuses bf16 on a CPU without it
        self.accelerator = Accelerator(cpu=device.type != "cuda", mixed_precision=mixed_precision)
        optimizer = build_optimizer(model.to(self.accelerator.device), learning_rate)
        scheduler = build_poly_scheduler(optimizer, max_steps)
        model, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.run = PreparedTraining(self.accelerator, model, optimizer, scheduler, {}, {},
                                    [p for group in optimizer.param_groups for p in group["params"]], gradient_clip)
        self.student = self.accelerator.unwrap_model(model)
        self.teacher = MeanTeacher(self.student)
        config = self.student.config
        settings = ssl_settings or {}
        views = StudentViewBuilder(self.teacher, StrongAugmentation(**settings.get("strong", {})),
                                   stuff_ids=config.stuff_ids, num_classes=config.num_classes,
                                   teacher_autocast=self.accelerator.autocast, **settings.get("builder", {}))
        self.ssl_step = MeanTeacherStep(self.teacher, views, seed=seed)
        self.labeled, self.unlabeled, self.seed, self.count = labeled, unlabeled, seed, 0

    def supervised(self) -> None:
        from training.loop import supervised_step

        self.run.model.train()
        supervised_step(self.run, {"labeled": self.labeled}, self.count)
        self.count += 1

    def ssl(self) -> None:
        self.run.model.train()
        self.ssl_step(self.run, {"labeled": self.labeled, "unlabeled": self.unlabeled}, self.count)
        self.count += 1


# --------------------------------------------------------------------------------------------------------------------
# Timing by part
# --------------------------------------------------------------------------------------------------------------------
class PartTimer(PartClock):
    """Process-CPU and wall seconds of the parts of one step, through forward hooks on the student's and the
    teacher's modules (the backbone is one object, shared) and a wrapper of ``accelerator.backward``."""

    def __init__(self, steps: Steps) -> None:
        super().__init__(steps.accelerator.device)
        models = [steps.student, steps.teacher.teacher]
        modules = [("backbone", steps.student.backbone)]
        for model in models:
            modules += [("pixel_decoder", model.pixel_decoder), ("transformer_decoder", model.transformer_module),
                        ("loss", model.criterion)]
        self.handles, seen = [], set()
        for name, module in modules:
            if id(module) in seen:  # shared by student and teacher (the backbone, the loss)
                continue
            seen.add(id(module))
            self.handles += self.time_forward(module, name)
        steps.accelerator.backward = self.wrap(steps.accelerator.backward, "backward")

    def measure(self, fn: Callable[[], None]) -> dict[str, dict[str, float]]:
        """Run one step; returns ``{"cpu"|"wall": {part: seconds, "step": seconds}, "backbone_calls": n}``."""
        self.reset()
        self.start("step")
        fn()
        self.stop("step")
        out: dict[str, Any] = {"backbone_calls": self.calls.get("backbone", 0)}
        for clock, values in (("cpu", self.cpu), ("wall", self.wall)):
            parts = {p: values.get(p, 0.0) for p in PARTS if p != "rest"}
            parts["rest"] = values["step"] - sum(parts.values())
            parts["step"] = values["step"]
            out[clock] = parts
        return out


def benchmark_full_size(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = full_size_model(args.clip_model_name, args.seed)
    labeled, unlabeled = synthetic_batches(args.full_size_batch_size, args.image_size, model.config.num_classes,
                                           device, args.seed)
    steps = Steps(model, labeled, unlabeled, device, seed=args.seed)
    timer = PartTimer(steps)
    runs: dict[str, list[dict[str, Any]]] = {"supervised": [], "ssl": []}
    for repeat in range(args.warmup + args.repeats):
        for kind, fn in (("supervised", steps.supervised), ("ssl", steps.ssl)):
            measured = timer.measure(fn)
            if repeat >= args.warmup:
                runs[kind].append(measured)
    result: dict[str, Any] = {"batch_size": args.full_size_batch_size, "image_size": args.image_size}
    for kind, measured in runs.items():
        entry: dict[str, Any] = {"backbone_calls": measured[0]["backbone_calls"]}
        for clock in ("cpu", "wall"):
            entry[f"{clock}_seconds"] = {p: median([m[clock][p] for m in measured]) for p in (*PARTS, "step")}
            # ratio to one backbone forward of the same step (the mean of its calls), median over the repeats
            entry[f"{clock}_ratio_to_backbone"] = {
                p: median([m[clock][p] / (m[clock]["backbone"] / m["backbone_calls"]) for m in measured])
                for p in (*PARTS, "step")}
        result[kind] = entry
    if args.count_flops:
        result["flops"] = count_step_flops(steps, labeled)
    return result


def _onednn_flop_formulas() -> dict[Any, Any]:
    """FLOP formula for oneDNN's fused linear (`modeling_dearli.fused_linear`), which torch's counter does not know:
    ``2 x rows x in x out``, as for ``addmm``."""
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return {}

    def linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        # (x, weight, bias, attr, ...), or (x, other, weight, bias, attr) for the binary overload
        weight_shape = args[0] if isinstance(args[2], str) else args[1]
        return 2 * math.prod(x_shape[:-1]) * int(weight_shape[0]) * int(weight_shape[1])

    return {torch.ops.mkldnn._linear_pointwise: linear_flops}


def count_step_flops(steps: Steps, labeled: dict) -> dict[str, Any]:
    """GFLOP of one backbone forward and of one supervised step (forward, loss and backward), by operator."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_onednn_flop_formulas()) as backbone:
        steps.student.backbone(labeled["pixel_values"])
    with FlopCounterMode(display=False, custom_mapping=_onednn_flop_formulas()) as step:
        steps.supervised()
    by_operator = {str(op): round(n / 1e9, 1) for op, n in sorted(step.get_flop_counts()["Global"].items(),
                                                                  key=lambda item: -item[1])}
    result = {"backbone_gflop": backbone.get_total_flops() / 1e9, "supervised_step_gflop": step.get_total_flops() / 1e9,
              "supervised_step_by_operator_gflop": by_operator}
    result["supervised_step_over_backbone"] = result["supervised_step_gflop"] / result["backbone_gflop"]
    return result


def print_full_size(result: dict[str, Any]) -> None:
    n = result["batch_size"]
    print(f"\nfull-size steps, {n} labeled + {n} unlabeled images of {result['image_size']}², float32: seconds and "
          f"multiples of ONE backbone forward of the same step, medians ({load_average()} after)")
    header = f"{'':>20}" + "".join(f"{kind + ' (' + str(result[kind]['backbone_calls']) + ' backbone calls)':>44}"
                                   for kind in ("supervised", "ssl"))
    print(header)
    print(f"{'':>20}" + f"{'cpu s':>11}{'x bb':>11}{'wall s':>11}{'x bb':>11}" * 2)
    for part in (*PARTS, "step"):
        row = f"{part:>20}"
        for kind in ("supervised", "ssl"):
            r = result[kind]
            row += (f"{r['cpu_seconds'][part]:>11.2f}{r['cpu_ratio_to_backbone'][part]:>11.2f}"
                    f"{r['wall_seconds'][part]:>11.2f}{r['wall_ratio_to_backbone'][part]:>11.2f}")
        print(row)
    print(f"supervised step: {result['supervised']['cpu_ratio_to_backbone']['step']:.2f}x its backbone forward "
          f"(CPU time; wall {result['supervised']['wall_ratio_to_backbone']['step']:.2f}x); target <= 3.5x")
    if "flops" in result:
        f = result["flops"]
        print(f"FLOPs: supervised step {f['supervised_step_gflop']:.0f} GFLOP, backbone forward "
              f"{f['backbone_gflop']:.0f} GFLOP: {f['supervised_step_over_backbone']:.2f}x (by operator: "
              + ", ".join(f"{op} {n}" for op, n in f["supervised_step_by_operator_gflop"].items()) + ")")


def miniature_steps(args: argparse.Namespace, device: torch.device, precision: str) -> dict[str, list[float]]:
    """Seconds of ``--repeats`` miniature supervised and SSL steps (after ``--warmup``) in this process."""
    model, loop_args = miniature_model(args.seed)
    size = loop_args.crop_size[0]
    labeled, unlabeled = synthetic_batches(loop_args.train_batch_size, size, model.config.num_classes, device,
                                           args.seed)
    steps = Steps(model, labeled, unlabeled, device, precision, loop_args.learning_rate, loop_args.gradient_clip,
                  args.seed)
    times: dict[str, list[float]] = {"supervised": [], "ssl": [], "batch_size": loop_args.train_batch_size,
                                     "image_size": size}
    for repeat in range(args.warmup + args.repeats):
        for kind in ("supervised", "ssl"):
            start = time.perf_counter()
            getattr(steps, kind)()
            if repeat >= args.warmup:
                times[kind].append(time.perf_counter() - start)
    return times


def benchmark_miniature(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Each precision in its own process (accelerate allows one mixed precision per process), the precisions
    alternating run by run so that other jobs' load affects them alike."""
    import subprocess
    import sys
    import tempfile

    from modeling_dearli.precision import bf16_supported

    precisions = [p for p in args.miniature_precisions if p == "no" or bf16_supported(device)]
    skipped = sorted(set(args.miniature_precisions) - set(precisions))
    runs: dict[str, dict[str, list[float]]] = {p: {"supervised": [], "ssl": []} for p in precisions}
    shape: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for precision in precisions:
                out = Path(folder) / f"{precision}_{repeat}.json"
                subprocess.run([sys.executable, __file__, "--miniature_process", precision, str(out),
                                "--device", device.type, "--threads", str(args.threads), "--repeats", "1",
                                "--warmup", str(args.warmup), "--seed", str(args.seed)], check=True)
                times = json.loads(out.read_text())
                for kind in ("supervised", "ssl"):
                    runs[precision][kind] += times[kind]
                shape = {"batch_size": times["batch_size"], "image_size": times["image_size"]}
    result: dict[str, Any] = {"skipped": skipped, **shape}
    for precision, kinds in runs.items():
        result[precision] = {f"{kind}_seconds": median(times) for kind, times in kinds.items()}
    if "no" in runs and "bf16" in runs:
        for kind in ("supervised", "ssl"):
            result[f"speedup_bf16_{kind}"] = median([f / b for f, b in zip(runs["no"][kind], runs["bf16"][kind])])
    return result


def print_miniature(result: dict[str, Any]) -> None:
    n, size = result["batch_size"], result["image_size"]
    print(f"\nminiature steps, {n} labeled + {n} unlabeled crops of {size}², seconds per step, medians "
          f"({load_average()} after)")
    for precision in ("no", "bf16"):
        if precision in result:
            r = result[precision]
            label = "float32" if precision == "no" else "bf16 autocast"
            print(f"{label:>20}: supervised {r['supervised_seconds']:.2f} s, SSL {r['ssl_seconds']:.2f} s")
    if "speedup_bf16_ssl" in result:
        print(f"float32 / bf16, same run: supervised {result['speedup_bf16_supervised']:.2f}x, "
              f"SSL {result['speedup_bf16_ssl']:.2f}x")
    if result["skipped"]:
        print(f"skipped {result['skipped']}: this CPU lacks native bf16")


# --------------------------------------------------------------------------------------------------------------------
# Memory: SSL step vs supervised step
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


def sample_batches(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """A labeled and an unlabeled batch of random crops of the sample images, and the dataset's class names."""
    from training.data.collator import DearliDataCollator
    from training.data.panoptic_datasets import dataset_class_names, load_coco_panoptic
    from training.data.train_datasets import PanopticTrainDataset, UnlabeledTrainDataset
    from training.data.transforms import ResizeShortestEdgeJitter

    data_dir = Path(args.data_dir)
    ds = load_coco_panoptic(data_dir / "images", data_dir / "panoptic", data_dir / "panoptic_annotations.json")
    class_names = dataset_class_names(ds)
    transform = ResizeShortestEdgeJitter(args.memory_crop_size)  # the training default
    labeled = PanopticTrainDataset(ds, transform)
    unlabeled = UnlabeledTrainDataset(ds, transform, cutmix_source=True)  # the reference's CutMix (the default)
    collate = DearliDataCollator()
    n = args.memory_batch_size
    seeds = torch.randint(0, 2**62, (2 * n,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    lab = collate([labeled[(i % len(ds), seeds[i])] for i in range(n)])
    unl = collate([unlabeled[(i % len(ds), seeds[n + i])] for i in range(n)])

    def to_device(batch: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.to(device)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                out[k] = [t.to(device) for t in v]
            else:
                out[k] = v
        return out

    return to_device(lab), to_device(unl), class_names


def benchmark_memory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from modeling_dearli import tiny_model

    labeled, unlabeled, class_names = sample_batches(args, device)
    if args.memory_full_size:
        model = full_size_model(args.clip_model_name, args.seed, num_classes=len(class_names.names))
    else:
        model = tiny_model(class_names=list(class_names.names), thing_ids=class_names.thing_ids, seed=args.seed)
    steps = Steps(model, labeled, unlabeled, device, seed=args.seed)
    meter = CudaPeakMemory(device) if device.type == "cuda" else CpuPeakMemory()
    result: dict[str, Any] = {
        "model": "full-size" if args.memory_full_size else "tiny", "crop_size": args.memory_crop_size,
        "batch_size": args.memory_batch_size,
        "method": "cuda max_memory_allocated" if device.type == "cuda" else (
            "VmHWM peak RSS" if meter.exact else "psutil RSS sampling")}
    kinds = (("supervised", steps.supervised), ("ssl", steps.ssl))
    for name, fn in kinds:
        times, peaks, increases = [], [], []
        for i in range(args.warmup + args.repeats):
            start = time.perf_counter()
            before, peak = meter.measure(fn)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                peaks.append(peak)
                increases.append(peak - before)
        result[name] = {"seconds_per_step": statistics.mean(times), "peak_memory_mb": max(peaks) / 2**20,
                        "step_memory_increase_mb": max(increases) / 2**20}
    sup = result["supervised"]
    for name in ("ssl",):
        result[f"ratio_peak_memory_{name}"] = result[name]["peak_memory_mb"] / sup["peak_memory_mb"]
        result[f"ratio_step_memory_increase_{name}"] = (
            result[name]["step_memory_increase_mb"] / max(sup["step_memory_increase_mb"], 1e-9))
    return result


def print_memory(result: dict[str, Any]) -> None:
    n = result["batch_size"]
    print(f"\nmemory, {result['model']} model, {n} labeled + {n} unlabeled crops of {result['crop_size']}² "
          f"({result['method']})")
    for name in ("supervised", "ssl"):
        r = result[name]
        print(f"{name:>20}: {r['seconds_per_step']:.3f} s/step, peak {r['peak_memory_mb']:.1f} MiB, "
              f"step increase {r['step_memory_increase_mb']:.1f} MiB")
    print(f"SSL / supervised: peak memory {result['ratio_peak_memory_ssl']:.2f}x (target <= 1.6), step memory "
          f"increase {result['ratio_step_memory_increase_ssl']:.2f}x")


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
    if args.miniature_process:
        precision, out = args.miniature_process
        Path(out).write_text(json.dumps(miniature_steps(args, device, precision)))
        return {}
    print(f"{where}; {load_average()}")
    results: dict[str, Any] = {"device": where}
    for section, bench, show in (("full_size", benchmark_full_size, print_full_size),
                                 ("miniature", benchmark_miniature, print_miniature),
                                 ("memory", benchmark_memory, print_memory)):
        if section in args.sections:
            results[section] = bench(args, device)
            show(results[section])
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    cli.run(main)
