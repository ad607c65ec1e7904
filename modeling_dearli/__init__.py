"""DEARLi for 🤗 transformers: semi-supervised panoptic segmentation with CLIP and SAM."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageSegmentation,
    AutoModelForUniversalSegmentation,
)

from .configuration_dearli import VILD_PROMPT_TEMPLATES, DearliConfig
from .ensembling import class_probabilities, ensemble_class_probabilities
from .image_processing_dearli import CLIP_MEAN, CLIP_STD, DearliImageProcessor
from .modeling_dearli import DearliForPanopticSegmentation, DearliPanopticOutput, DearliPreTrainedModel
from .pipeline_dearli import DearliImageSegmentationPipeline, register_pipeline
from .presets import tiny_config, tiny_model

AutoConfig.register("dearli", DearliConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForImageSegmentation, AutoModelForUniversalSegmentation):
    _auto.register(DearliConfig, DearliForPanopticSegmentation, exist_ok=True)
# One torch implementation serves both backends that AutoImageProcessor may request ("torchvision" when torchvision
# is installed, else "pil"); registering only one made transformers warn that the other "is not available".
AutoImageProcessor.register(
    DearliConfig,
    image_processor_classes={"torchvision": DearliImageProcessor, "pil": DearliImageProcessor},
    exist_ok=True,
)
register_pipeline()
DearliConfig.register_for_auto_class()
DearliForPanopticSegmentation.register_for_auto_class("AutoModelForUniversalSegmentation")
DearliImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DearliConfig",
    "DearliForPanopticSegmentation",
    "DearliImageProcessor",
    "DearliImageSegmentationPipeline",
    "DearliPanopticOutput",
    "DearliPreTrainedModel",
    "VILD_PROMPT_TEMPLATES",
    "class_probabilities",
    "ensemble_class_probabilities",
    "tiny_config",
    "tiny_model",
]
