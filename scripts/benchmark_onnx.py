"""The exported ONNX graph in onnxruntime (CPU) against the PyTorch model (fp32, its default forwards, and under bf16
autocast where the CPU has native bf16), same run, same inputs, same number of threads: largest output differences and
forward time.

    python scripts/benchmark_onnx.py --onnx_dir outputs/onnx_full            # the full-size model, 640x640
    python scripts/benchmark_onnx.py --model_name_or_path M --onnx_dir O     # a saved model and its export

Without ``--model_name_or_path`` the model is the paper's size (OpenCLIP ConvNeXt-B ``convnext_base_w_320``, 200
queries, 150 classes) with random weights and random unit-norm class embeddings (timing does not depend on the
weights). ``--onnx_dir`` is reused when it holds an export, else the model is exported there first (minutes).
PyTorch and onnxruntime run alternately, ``--repeats`` times each after ``--warmup`` runs; the medians and their ratios
are printed (wall and process CPU seconds), and written as JSON with ``--output``. ``--no_bf16`` leaves the bf16 runs
out. The onnxruntime session does not spin-wait between runs (``--onnx_allow_spinning`` lets it, onnxruntime's own
default): spinning threads take the cores from the PyTorch runs beside them.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import os

# On a shared (oversubscribed) CPU, OpenMP's default spin-waiting makes every multi-threaded op wait for descheduled
# threads; every runtime is timed under the same setting, as in scripts/benchmarks/ (export OMP_WAIT_POLICY=ACTIVE to
# override).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from training import cli

logger = logging.getLogger("benchmark_onnx")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model_name_or_path", default=None,
                        help="Saved model (default: the full-size architecture with random weights).")
    parser.add_argument("--onnx_dir", required=True, help="Export folder: reused if it holds model.onnx, else written.")
    parser.add_argument("--clip_model_name", default="convnext_base_w_320", help="OpenCLIP architecture (no weights).")
    parser.add_argument("--num_classes", type=cli.positive_int, default=150, help="Classes of the random model.")
    parser.add_argument("--num_queries", type=cli.positive_int, default=200, help="Queries of the random model.")
    parser.add_argument("--size", type=cli.positive_int, nargs=2, default=[640, 640], metavar=("HEIGHT", "WIDTH"),
                        help="Input size (multiples of 32).")
    parser.add_argument("--batch_size", type=cli.positive_int, default=1, help="Images per forward.")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="Threads of both runtimes (default: torch's current setting).")
    parser.add_argument("--warmup", type=cli.non_negative_int, default=1, help="Untimed runs of each first.")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="Timed runs of each.")
    parser.add_argument("--onnx_allow_spinning", action="store_true",
                        help="Let onnxruntime's threads spin-wait between runs (its own default; off in the project's "
                             "runtime, as spinning threads slow the PyTorch work beside them).")
    parser.add_argument("--no_bf16", action="store_true",
                        help="Leave out PyTorch under bf16 autocast (run by default where the CPU has native bf16).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random model and input.")
    parser.add_argument("--output", default=None, help="Also write the results as JSON here.")
    return parser.parse_args(argv)


def random_full_size_model(clip_model_name: str, num_classes: int, num_queries: int, seed: int):
    """The paper-size DEARLi with random weights and random unit-norm class text embeddings (as if encoded)."""
    from modeling_dearli import DearliConfig, DearliForPanopticSegmentation

    torch.manual_seed(seed)
    names = [f"class {i}" for i in range(num_classes)]
    config = DearliConfig(class_names=names, thing_ids=list(range(0, num_classes, 2)),
                          clip_model_name=clip_model_name, num_queries=num_queries)
    model = DearliForPanopticSegmentation(config)
    with torch.no_grad():
        model.text_embeddings.copy_(torch.nn.functional.normalize(torch.randn_like(model.text_embeddings), dim=-1))
    return model.eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from modeling_dearli.precision import autocast, bf16_supported
    from training.deployment.onnx_export import ONNX_FILE, SIZE_MULTIPLE, export_onnx
    from training.deployment.onnx_runtime import DearliOnnxModel
    from training.pretrained import load_model_and_processor

    if any(s % SIZE_MULTIPLE for s in args.size):
        raise cli.CliError(f"--size must be multiples of {SIZE_MULTIPLE}, got {args.size}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.model_name_or_path:
        model = load_model_and_processor(args.model_name_or_path)[0]
    else:
        model = random_full_size_model(args.clip_model_name, args.num_classes, args.num_queries, args.seed)
    onnx_dir = Path(args.onnx_dir)
    export_seconds = None
    if not (onnx_dir / ONNX_FILE).exists():
        start = time.perf_counter()
        export_onnx(model, onnx_dir)
        export_seconds = time.perf_counter() - start
    runtime = DearliOnnxModel(onnx_dir, model.config, num_threads=threads, allow_spinning=args.onnx_allow_spinning)

    pixel_values = torch.randn(args.batch_size, 3, *args.size, generator=torch.Generator().manual_seed(args.seed))
    names = ("class_queries_logits", "masks_queries_logits", "clip_class_logits")

    def run_torch():
        with torch.inference_mode():
            return model(pixel_values=pixel_values, output_clip_logits=True)

    def run_torch_bf16():
        with torch.inference_mode(), autocast("cpu", bf16=True):
            return model(pixel_values=pixel_values, output_clip_logits=True)

    def run_onnx():
        return runtime(pixel_values=pixel_values)

    runs = {"pytorch_fp32": run_torch, "onnxruntime": run_onnx}
    if not args.no_bf16 and bf16_supported("cpu"):
        runs["pytorch_bf16"] = run_torch_bf16

    expected, got = run_torch(), run_onnx()
    differences = {n: float((getattr(got, n) - getattr(expected, n)).abs().max()) for n in names}
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    seconds = {key: [] for key in runs}
    cpu_seconds = {key: [] for key in runs}
    for _ in range(args.repeats):  # alternately, so that load on the machine affects all alike
        for key, fn in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            seconds[key].append(time.perf_counter() - start)
            cpu_seconds[key].append(time.process_time() - start_cpu)
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu_seconds.items()}
    result = {
        "model": args.model_name_or_path or f"{args.clip_model_name} (random weights), {args.num_queries} queries, "
                                            f"{args.num_classes} classes",
        "input": [args.batch_size, 3, *args.size],
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "export_seconds": export_seconds,
        "max_abs_difference": differences,
        "seconds": seconds,
        "median_seconds": medians,
        "cpu_seconds": cpu_seconds,
        "median_cpu_seconds": cpu_medians,
        "onnxruntime_over_pytorch": medians["onnxruntime"] / medians["pytorch_fp32"],
    }
    if "pytorch_bf16" in medians:
        result["pytorch_bf16_over_pytorch"] = medians["pytorch_bf16"] / medians["pytorch_fp32"]
    print(f"input {tuple(result['input'])}, {threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"{args.repeats} runs each (median):")
    print("  largest |onnxruntime - PyTorch|: " + ", ".join(f"{n} {d:.1e}" for n, d in differences.items()))
    labels = {"pytorch_fp32": "PyTorch fp32", "onnxruntime": "onnxruntime", "pytorch_bf16": "PyTorch bf16"}
    for key, label in labels.items():
        if key in medians:
            print(f"  {label:<13} {medians[key]:7.3f} s wall ({medians[key] / medians['pytorch_fp32']:.2f}x PyTorch "
                  f"fp32's), {cpu_medians[key]:7.3f} s CPU ({cpu_medians[key] / cpu_medians['pytorch_fp32']:.2f}x)")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    cli.run(main)
