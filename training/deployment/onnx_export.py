"""Export a DEARLi model's forward to ONNX: pixel values in, the three outputs the image processor needs out.

The graph maps ``pixel_values`` ``(batch, 3, height, width)`` (height and width multiples of 32, as the image
processor pads them; batch, height and width dynamic) to ``class_queries_logits`` ``(batch, queries, classes + 1)``,
``masks_queries_logits`` ``(batch, queries, height / 4, width / 4)`` and ``clip_class_logits``
``(batch, queries, classes)``. The class text embeddings are constants of the graph: a new vocabulary needs a new
export. Padding is handled outside the graph (:class:`training.deployment.onnx_runtime.DearliOnnxModel` derives the
unpadded sizes from the processor's ``pixel_mask``, as the PyTorch model does).

The export runs ``torch.onnx.export(..., dynamo=True)`` through transformers' own pixel-decoder and transformer-decoder
forwards (``config.decoder_implementation="transformers"``: the same weights and, tested, the same outputs as the
default forwards, whose cached shapes ``torch.export`` cannot trace). transformers' deformable-attention encoder builds
its reference points with ``torch.linspace(0.5, n - 0.5, n)``, whose ONNX translation keeps the example input's ``n``;
during the export it is given ``arange(n) + 0.5`` (the same values, exactly) so that the graph follows the image size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "INPUT_NAME",
    "METADATA_FILE",
    "MIN_OPSET_VERSION",
    "ONNX_FILE",
    "OUTPUT_NAMES",
    "SIZE_MULTIPLE",
    "check_opset_version",
    "export_onnx",
    "max_opset_version",
]

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
METADATA_FILE = "onnx_export.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("class_queries_logits", "masks_queries_logits", "clip_class_logits")
# The backbone's output stride: the image processor pads images to multiples of it.
SIZE_MULTIPLE = 32
# torch.onnx's dynamo exporter translates every operator at opset 18 (torchlib's opset, ``TORCHLIB_OPSET`` in
# torch/onnx/_internal/exporter/_constants.py, torch 2.14; no public name). A lower ``opset_version`` goes through
# onnx's version converter afterwards, and where that fails torch writes opset 18 anyway (measured: 5, 7, 9 and 13 all
# came out as 18): only opsets from this one up are exported as asked.
MIN_OPSET_VERSION = 18


def _onnxruntime_runs_opset(opset_version: int) -> bool:
    """Whether onnxruntime loads a one-node graph of `opset_version` (it refuses opsets newer than it knows)."""
    import onnx
    import onnxruntime

    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    output = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [value], [output])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset_version)], ir_version=10)
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's own error types (Fail, InvalidGraph, ...) share no public base class
        return False
    return True


def max_opset_version() -> int:
    """The newest ONNX opset that the installed onnx knows (``onnx.defs.onnx_opset_version()``) and onnxruntime, when
    installed, runs: the newest one an export can be checked and used with."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return newest
    while newest > MIN_OPSET_VERSION and not _onnxruntime_runs_opset(newest):
        newest -= 1
    return newest


def check_opset_version(opset_version: int | None) -> None:
    """Raise ``ValueError`` naming the supported range when `opset_version` (``None``: torch's default) is outside
    ``[MIN_OPSET_VERSION, max_opset_version()]``."""
    if opset_version is None:
        return
    newest = max_opset_version()
    if not MIN_OPSET_VERSION <= opset_version <= newest:
        raise ValueError(
            f"opset {opset_version} cannot be exported: supported are opsets {MIN_OPSET_VERSION} to {newest} "
            f"({MIN_OPSET_VERSION}: the opset torch.onnx translates to; {newest}: the newest the installed onnx and "
            "onnxruntime know)"
        )


class _ExportedForward(torch.nn.Module):
    """``pixel_values -> (class_queries_logits, masks_queries_logits, clip_class_logits)`` of a DEARLi model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values=pixel_values, output_clip_logits=True, return_dict=True)
        return outputs.class_queries_logits, outputs.masks_queries_logits, outputs.clip_class_logits


def _reference_points(spatial_shapes_list, valid_ratios, device):
    """transformers' ``Mask2FormerPixelDecoderEncoderOnly.get_reference_points`` with ``arange(n) + 0.5`` for
    ``linspace(0.5, n - 0.5, n)`` (equal values; the ONNX translation of ``linspace`` fixes ``n``)."""
    points = []
    for level, (height, width) in enumerate(spatial_shapes_list):
        ref_y, ref_x = torch.meshgrid(
            torch.arange(height, dtype=valid_ratios.dtype, device=device) + 0.5,
            torch.arange(width, dtype=valid_ratios.dtype, device=device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]


@contextlib.contextmanager
def exportable(model: Any) -> Iterator[torch.nn.Module]:
    """The model's forward as an exportable module (see the module docstring); the model is restored on exit."""
    config = model.config
    encoder = model.pixel_decoder.encoder
    implementation, training = config.decoder_implementation, model.training
    config.decoder_implementation = "transformers"
    encoder.get_reference_points = _reference_points  # instance attribute: shadows the class's static method
    model.eval()
    try:
        yield _ExportedForward(model).eval()
    finally:
        del encoder.get_reference_points
        config.decoder_implementation = implementation
        model.train(training)


def export_onnx(
    model: Any,
    output_dir: str | os.PathLike,
    example_size: tuple[int, int] = (128, 160),
    opset_version: int | None = None,
    optimize: bool = True,
) -> Path:
    """Write ``model.onnx`` (the forward, dynamic batch and image size) and ``onnx_export.json`` (input / output names,
    the vocabulary the graph was exported with) into `output_dir`; returns the ONNX file's path.

    Args:
        model: a ``DearliForPanopticSegmentation`` (left as it was).
        output_dir: folder to write into (created; existing export files are replaced by the caller's choice only:
            this function refuses a folder that already holds ``model.onnx``).
        example_size: ``(height, width)`` of the example input used for tracing (multiples of 32).
        opset_version: ONNX opset, from ``MIN_OPSET_VERSION`` to :func:`max_opset_version` (``None``: torch's
            default); another one is refused with a ``ValueError``, and a graph that torch wrote at another opset
            than asked raises a ``RuntimeError`` before anything is saved.
        optimize: run torch.onnx's graph optimisation after the export.
    """
    output_dir = Path(output_dir)
    path = output_dir / ONNX_FILE
    if path.exists():
        raise FileExistsError(f"{path} exists already; choose another output folder or remove it")
    if any(s % SIZE_MULTIPLE for s in example_size):
        raise ValueError(f"example_size must be multiples of {SIZE_MULTIPLE}, got {example_size}")
    check_opset_version(opset_version)
    output_dir.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, *example_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height_over_32", min=1, max=1024)
    width = torch.export.Dim("width_over_32", min=1, max=1024)
    dynamic_shapes = {INPUT_NAME: {0: batch, 2: SIZE_MULTIPLE * height, 3: SIZE_MULTIPLE * width}}
    with exportable(model) as module, torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset_version,
            optimize=optimize,
            verbose=False,
        )
    written = program.model.opset_imports.get("")
    if opset_version is not None and written != opset_version:
        raise RuntimeError(f"torch.onnx wrote opset {written} instead of the requested {opset_version}; nothing saved")
    program.save(str(path))
    config = model.config
    metadata = {
        "onnx_file": ONNX_FILE,
        "input_name": INPUT_NAME,
        "output_names": list(OUTPUT_NAMES),
        "size_multiple": SIZE_MULTIPLE,
        "class_names": list(config.class_names),
        "thing_ids": list(config.thing_ids),
        "num_queries": int(config.num_queries),
        "torch_version": torch.__version__,
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    logger.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path
