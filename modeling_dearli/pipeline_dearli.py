"""``pipeline("image-segmentation")`` for DEARLi with the model's own post-processing defaults.

transformers' ``ImageSegmentationPipeline`` passes ``threshold=0.9`` (and ``overlap_mask_area_threshold=0.5``) to
``post_process_*`` whether or not the caller gave them, which removes every segment of a model whose scores are
lower (DEARLi's panoptic inference keeps every query, ``threshold=0.0``), and it logs that DEARLi "is not supported"
because its check only lists transformers' own models. :class:`DearliImageSegmentationPipeline` passes only the
arguments the caller gave, so the image processor's defaults apply, and returns the processor's segments in the
pipeline's format (``{"score", "label", "mask"}`` per segment; instance masks are full, overlaps kept).

It reaches ``pipeline()`` in two ways:

* from a saved folder as remote code: ``config.json`` names it in ``custom_pipelines`` (transformers' custom-pipeline
  mechanism) and ``save_pretrained`` copies this file beside the model, so
  ``pipeline("image-segmentation", model=folder, trust_remote_code=True)`` works where this package is not installed;
* with the package installed: :func:`register_pipeline` (called on ``import modeling_dearli``) routes the
  ``"image-segmentation"`` task to this class, so no ``trust_remote_code`` is needed. ``pipeline()`` chooses the class
  from the task alone, and a config's ``custom_pipelines`` entry always demands ``trust_remote_code``; the installed
  config therefore reports no custom pipeline (``DearliConfig.custom_pipelines``). Every model that is not a DEARLi
  gets the task's previous class (transformers' own), unchanged.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline
from transformers.utils import logging

from .configuration_dearli import DearliConfig

try:  # PIL is a transformers vision dependency (the pipeline itself requires it)
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

logger = logging.get_logger(__name__)

TASK = "image-segmentation"
SUBTASKS = ("panoptic", "semantic", "instance")
# post_process_instance_segmentation's own options, passed through when the caller gives them.
INSTANCE_OPTIONS = ("top_k", "min_area", "mask_iou_threshold")


class DearliImageSegmentationPipeline(ImageSegmentationPipeline):
    """Image segmentation with a DEARLi model: panoptic (default), semantic or instance, with the image processor's
    defaults for every threshold the caller does not give (``threshold``, ``mask_threshold``,
    ``overlap_mask_area_threshold``)."""

    serves_model_type = DearliConfig.model_type
    # No video processor: without this, pipeline() looks for one and, finding the folder's remote code, asks on stdin
    # whether to run it although the installed package is in use.
    _load_video_processor = False
    # The task's class for every other model (transformers' own, or whatever was registered before us).
    fallback_class: type = ImageSegmentationPipeline

    def __new__(cls, *args: Any, **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        if getattr(getattr(model, "config", None), "model_type", None) != cls.serves_model_type:
            return cls.fallback_class(*args, **kwargs)
        return super().__new__(cls)

    def check_model_type(self, supported_models: Any) -> None:
        """A DEARLi model is what this pipeline serves (transformers' check lists only its own models)."""
        if self.model.config.model_type != self.serves_model_type:
            logger.error(f"{type(self).__name__} serves DEARLi models, got {type(self.model).__name__}")

    def _sanitize_parameters(self, **kwargs: Any):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        postprocess.update({name: kwargs[name] for name in INSTANCE_OPTIONS if name in kwargs})
        return preprocess, forward, postprocess

    def postprocess(self, model_outputs: Any, subtask: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        """Segments of one image as ``{"score", "label", "mask"}`` (``mask``: an ``L``-mode PIL image, 255 inside).

        ``kwargs`` are only the thresholds (and, for instances, ``top_k`` / ``min_area`` / ``mask_iou_threshold``) the
        caller gave; ``subtask=None`` means panoptic.
        """
        processor, target_sizes = self.image_processor, model_outputs["target_size"]
        subtask = subtask or "panoptic"
        misplaced = [name for name in INSTANCE_OPTIONS if name in kwargs and subtask != "instance"]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} apply to subtask='instance' only, got subtask={subtask!r}")
        if subtask == "panoptic":
            result = processor.post_process_panoptic_segmentation(model_outputs, target_sizes=target_sizes, **kwargs)[0]
            segmentation = result["segmentation"]
            return [self._segment(s["label_id"], s["score"], segmentation == s["id"]) for s in result["segments_info"]]
        if subtask == "instance":
            result = processor.post_process_instance_segmentation(
                model_outputs, target_sizes=target_sizes, return_binary_maps=True, **kwargs
            )[0]
            return [
                self._segment(s["label_id"], s["score"], mask)
                for s, mask in zip(result["segments_info"], result["segmentation"], strict=True)
            ]
        if subtask == "semantic":  # no thresholds: every pixel gets its most probable class
            segmentation = processor.post_process_semantic_segmentation(model_outputs, target_sizes=target_sizes)[0]
            return [self._segment(label, None, segmentation == label) for label in segmentation.unique().tolist()]
        raise ValueError(f"subtask must be one of {SUBTASKS}, got {subtask!r}")

    def _segment(self, label_id: int, score: float | None, mask: torch.Tensor) -> dict[str, Any]:
        pixels = mask.to(torch.uint8).mul_(255).cpu().numpy()
        return {"score": score, "label": self.model.config.id2label[int(label_id)], "mask": Image.fromarray(pixels)}


def register_pipeline() -> None:
    """Route ``pipeline("image-segmentation")`` to :class:`DearliImageSegmentationPipeline` for DEARLi models (other
    models keep the task's current class). Idempotent."""
    entry = PIPELINE_REGISTRY.supported_tasks[TASK]
    previous = entry["impl"]
    if previous is DearliImageSegmentationPipeline:
        return
    if isinstance(previous, str):  # transformers registers its own classes by dotted path
        module, name = previous.rsplit(".", 1)
        previous = getattr(importlib.import_module(module), name)
    DearliImageSegmentationPipeline.fallback_class = previous
    PIPELINE_REGISTRY.supported_tasks[TASK] = {**entry, "impl": DearliImageSegmentationPipeline}


__all__ = ["DearliImageSegmentationPipeline", "register_pipeline"]
