"""DEARLi for 🤗 transformers: semi-supervised panoptic segmentation with CLIP and SAM."""

from transformers import AutoConfig, AutoModel, AutoModelForImageSegmentation, AutoModelForUniversalSegmentation

from .configuration_dearli import VILD_PROMPT_TEMPLATES, DearliConfig
from .modeling_dearli import DearliForPanopticSegmentation, DearliPanopticOutput, DearliPreTrainedModel
from .presets import tiny_config, tiny_model

AutoConfig.register("dearli", DearliConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForImageSegmentation, AutoModelForUniversalSegmentation):
    _auto.register(DearliConfig, DearliForPanopticSegmentation, exist_ok=True)
DearliConfig.register_for_auto_class()
DearliForPanopticSegmentation.register_for_auto_class("AutoModelForUniversalSegmentation")

__all__ = [
    "DearliConfig",
    "DearliForPanopticSegmentation",
    "DearliPanopticOutput",
    "DearliPreTrainedModel",
    "VILD_PROMPT_TEMPLATES",
    "tiny_config",
    "tiny_model",
]
