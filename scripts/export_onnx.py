"""Export a DEARLi model to ONNX: the forward (pixel values -> class logits, mask logits, CLIP logits) with dynamic
batch and image size, the class text embeddings as constants of the graph.

    python scripts/export_onnx.py --model_name_or_path path/or/hub-id --output_dir exported/
    python scripts/predict.py --model_name_or_path path/or/hub-id --onnx exported/ photos/ --output_dir predictions

``--output_dir`` receives ``model.onnx`` and ``onnx_export.json`` (names, the exported vocabulary); the model folder
still gives the image processor and the class names at inference. A new vocabulary needs a new export. With
``--check`` (default) the graph runs once in onnxruntime on a second image size and its outputs are compared with
PyTorch's. Code in the model folder runs only with ``--trust_remote_code``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import logging
import time
from pathlib import Path

import torch

from training import cli
from training.pretrained import add_model_arguments, load_model_and_processor

logger = logging.getLogger("export_onnx")


def _opset_range() -> str:
    """The supported opsets in words, for ``--help``."""
    from training.deployment.onnx_export import MIN_OPSET_VERSION, max_opset_version

    try:
        newest = max_opset_version()
    except ImportError:  # onnx not installed: the export itself will say so
        return f"from {MIN_OPSET_VERSION} (the opset torch.onnx translates to) to the newest that onnx knows"
    return (f"from {MIN_OPSET_VERSION} (the opset torch.onnx translates to) to {newest} (the newest the installed onnx "
            "and onnxruntime know)")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--output_dir", required=True, help="Folder for model.onnx and onnx_export.json.")
    parser.add_argument("--opset_version", type=cli.positive_int, default=None,
                        help=f"ONNX opset, {_opset_range()} (default: torch.onnx's).")
    parser.add_argument("--example_height", type=cli.positive_int, default=128,
                        help="Height of the tracing example, a multiple of 32 (the graph accepts any multiple).")
    parser.add_argument("--example_width", type=cli.positive_int, default=160,
                        help="Width of the tracing example, a multiple of 32 (the graph accepts any multiple).")
    parser.add_argument("--no_check", action="store_true",
                        help="Skip running the exported graph in onnxruntime against PyTorch on another image size.")
    parser.add_argument("--tolerance", type=cli.positive_float, default=1e-3,
                        help="Largest absolute difference from PyTorch's outputs accepted by the check.")
    return parser.parse_args(argv)


def check_export(model, onnx_dir: Path, size: tuple[int, int], tolerance: float) -> dict[str, float]:
    """Largest absolute difference per output between onnxruntime and PyTorch on one random input of `size`;
    raises ``RuntimeError`` above `tolerance`."""
    from training.deployment.onnx_runtime import DearliOnnxModel

    pixel_values = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, output_clip_logits=True)
    got = DearliOnnxModel(onnx_dir, model.config)(pixel_values=pixel_values)
    differences = {}
    for name in ("class_queries_logits", "masks_queries_logits", "clip_class_logits"):
        differences[name] = float((getattr(got, name) - getattr(expected, name)).abs().max())
    worst = max(differences, key=differences.get)
    if differences[worst] > tolerance:
        raise RuntimeError(f"the exported graph's {worst} differs from PyTorch's by {differences[worst]:.2e} at "
                           f"{size[0]}x{size[1]} (tolerance {tolerance:g})")
    return differences


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from training.deployment.onnx_export import ONNX_FILE, SIZE_MULTIPLE, check_opset_version, export_onnx

    example = (args.example_height, args.example_width)
    if any(s % SIZE_MULTIPLE for s in example):
        raise cli.CliError(f"--example_height and --example_width must be multiples of {SIZE_MULTIPLE}, got {example}")
    try:
        check_opset_version(args.opset_version)
    except ValueError as error:
        raise cli.CliError(f"--opset_version: {error}") from error
    out_dir = cli.prepare_output_dir(args.output_dir)
    if (out_dir / ONNX_FILE).exists():
        raise cli.CliError(f"{out_dir / ONNX_FILE} exists already: choose another --output_dir or remove it")
    model, _ = load_model_and_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    start = time.perf_counter()
    path = export_onnx(model, out_dir, example_size=example, opset_version=args.opset_version)
    logger.info("exported in %.0f s: %s", time.perf_counter() - start, path)
    if not args.no_check:
        # Another size than the tracing example's: the graph must follow it.
        width = example[1] - SIZE_MULTIPLE if example[1] > SIZE_MULTIPLE else 2 * example[1]
        size = (example[0] + SIZE_MULTIPLE, width)
        differences = check_export(model, out_dir, size, args.tolerance)
        logger.info("onnxruntime vs PyTorch at %dx%d, largest absolute differences: %s", *size,
                    ", ".join(f"{k} {v:.1e}" for k, v in differences.items()))
    return 0


if __name__ == "__main__":
    cli.run(main)
