"""Run an exported DEARLi graph (:mod:`training.deployment.onnx_export`) in onnxruntime, as a stand-in for the
PyTorch model: the same call (``model(pixel_values=..., pixel_mask=...)``) and the same outputs, so the image
processor's ``post_process_*`` methods, ``scripts/predict.py`` and :class:`training.evaluation.segmenter.Segmenter`
use it unchanged.

    model = DearliOnnxModel.from_pretrained("exported/", "path/to/model")  # the model folder gives the config
    processor = AutoImageProcessor.from_pretrained("path/to/model")
    outputs = model(**processor(images=image, return_tensors="pt"))
    processor.post_process_panoptic_segmentation(outputs, target_sizes=[image.size[::-1]])

The vocabulary is fixed by the export (the text embeddings are constants of the graph): a model folder whose class
names differ from the exported ones is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .onnx_export import METADATA_FILE

__all__ = ["DearliOnnxModel", "load_onnx_segmenter"]


class DearliOnnxModel:
    """An exported DEARLi forward in an ``onnxruntime.InferenceSession``, called like the PyTorch model.

    Args:
        onnx_dir: folder written by ``scripts/export_onnx.py`` (``model.onnx`` and ``onnx_export.json``).
        config: the model's ``DearliConfig`` (class names, thing classes, ``id2label``); it must name the classes the
            graph was exported with.
        providers: onnxruntime execution providers (default: ``["CPUExecutionProvider"]``).
        num_threads: intra-op threads of the session (default: onnxruntime's choice).
        allow_spinning: let the session's threads spin-wait for work after each run (onnxruntime's default). Off by
            default: the post-processing that follows every forward runs in PyTorch on the same cores, and spinning
            threads take the cores from it (a PyTorch forward right after an onnxruntime one ran ~10x slower here).
    """

    #: The text tower is not part of the graph: the vocabulary cannot change (see the module docstring).
    text_encoder = None

    def __init__(self, onnx_dir: str | os.PathLike, config: Any, providers: list[str] | None = None,
                 num_threads: int | None = None, allow_spinning: bool = False) -> None:
        import onnxruntime

        onnx_dir = Path(onnx_dir)
        metadata_path = onnx_dir / METADATA_FILE
        if not metadata_path.is_file():
            raise FileNotFoundError(
                f"{onnx_dir} has no {METADATA_FILE}: not a folder written by scripts/export_onnx.py"
            )
        try:
            self.metadata = json.loads(metadata_path.read_text())
        except ValueError as error:  # JSONDecodeError, or bytes that are not text
            raise ValueError(f"{metadata_path} is not valid JSON: {error}") from None
        exported = (list(self.metadata["class_names"]), list(self.metadata["thing_ids"]))
        if (list(config.class_names), list(config.thing_ids)) != exported:
            raise ValueError(
                f"the graph in {onnx_dir} was exported with {len(exported[0])} other classes than the model config's "
                f"{len(config.class_names)} ({exported[0][:3]}... vs {list(config.class_names)[:3]}...): the "
                "vocabulary is part of the graph, export again after changing it"
            )
        self.config = config
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        spinning = "1" if allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        self.session = onnxruntime.InferenceSession(
            str(onnx_dir / self.metadata["onnx_file"]), sess_options=options,
            providers=providers or ["CPUExecutionProvider"],
        )
        self.input_name = self.metadata["input_name"]
        self.output_names = list(self.metadata["output_names"])

    @classmethod
    def from_pretrained(cls, onnx_dir: str | os.PathLike, model_name_or_path: str | os.PathLike, **kwargs: Any):
        """The graph in `onnx_dir` with the config of the saved model `model_name_or_path` (folder or Hub id)."""
        from transformers import AutoConfig

        import modeling_dearli  # noqa: F401  (registers DearliConfig: no remote code)

        return cls(onnx_dir, AutoConfig.from_pretrained(model_name_or_path), **kwargs)

    # The parts of the PyTorch model's interface that callers use --------------------------------------------------

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # outputs are returned as CPU tensors whatever the provider

    def eval(self) -> DearliOnnxModel:
        return self

    def to(self, device: str | torch.device) -> DearliOnnxModel:
        """Outputs come back on the CPU (the session's providers choose where it runs); other devices are refused."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"an onnxruntime session returns CPU tensors; choose its providers instead of {device}")
        return self

    def parameters(self) -> Iterator[torch.Tensor]:
        """No trainable parameters; one empty CPU tensor, so that ``next(model.parameters()).device`` works."""
        yield torch.empty(0)

    def __call__(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, **unused: Any):
        """``DearliPanopticOutput`` with ``class_queries_logits``, ``masks_queries_logits``, ``clip_class_logits``
        and, given ``pixel_mask``, ``unpadded_sizes`` (as the PyTorch model computes them)."""
        from modeling_dearli import DearliPanopticOutput

        values = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        arrays = self.session.run(self.output_names, {self.input_name: values})
        tensors = dict(zip(self.output_names, (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)))
        unpadded_sizes = None
        if pixel_mask is not None:
            valid = pixel_mask.to("cpu").bool()
            unpadded_sizes = torch.stack([valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)], dim=1)
        return DearliPanopticOutput(unpadded_sizes=unpadded_sizes, **tensors)

    forward = __call__


def load_onnx_segmenter(onnx_dir: str | os.PathLike, model_name_or_path: str | os.PathLike, **kwargs: Any):
    """A :class:`training.evaluation.segmenter.Segmenter` on the exported graph in `onnx_dir`, with the image
    processor and config of the saved model `model_name_or_path`; `kwargs` go to :class:`DearliOnnxModel`."""
    from training.evaluation.segmenter import Segmenter
    from training.pretrained import check_model_location, load_image_processor

    location = check_model_location(model_name_or_path)
    model = DearliOnnxModel.from_pretrained(onnx_dir, location, **kwargs)
    return Segmenter(model, load_image_processor(location, model.config), device="cpu")
