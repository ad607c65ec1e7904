"""Frozen OpenCLIP ConvNeXt backbone, its zero-shot head for mask pooling, and class text embeddings."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)


def build_open_clip_model(model_config: dict[str, Any]) -> nn.Module:
    """Build an OpenCLIP model from its architecture config (random weights, nothing downloaded).

    Built under an explicit CPU device so that it also works inside transformers' meta-device `from_pretrained`
    context (OpenCLIP creates non-persistent buffers that would otherwise stay on the meta device).
    """
    import open_clip

    cfg = copy.deepcopy(model_config)
    cfg.get("vision_cfg", {})["timm_model_pretrained"] = False
    with torch.device("cpu"):
        if "hf_model_name" in cfg.get("text_cfg", {}) or cfg.get("custom_text", False):
            model = open_clip.model.CustomTextCLIP(**cfg)
        else:
            model = open_clip.model.CLIP(**cfg)
    return model


def load_open_clip_weights(model: nn.Module, model_name: str, pretrained: str, cache_dir: str | None = None) -> None:
    """Load OpenCLIP weights into `model` from a pretrained tag (downloaded by OpenCLIP) or a local file."""
    import open_clip

    if os.path.isfile(pretrained):
        checkpoint_path = pretrained
    else:
        pretrained_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not pretrained_cfg:
            raise ValueError(
                f"{pretrained!r} is neither a local checkpoint file nor a known OpenCLIP tag for {model_name!r} "
                f"(known tags: {open_clip.list_pretrained_tags_by_model(model_name)})"
            )
        checkpoint_path = open_clip.download_pretrained(pretrained_cfg, cache_dir=cache_dir)
    incompatible = open_clip.load_checkpoint(model, checkpoint_path, strict=True, weights_only=True)
    logger.info("Loaded OpenCLIP weights from %s (%s)", checkpoint_path, incompatible)


def _mark_initialized(module: nn.Module) -> None:
    # transformers must never re-initialise the CLIP towers: they keep OpenCLIP's (or loaded) weights.
    for submodule in module.modules():
        submodule._is_hf_initialized = True


class FrozenClipBackbone(nn.Module):
    """The frozen CLIP ConvNeXt image tower.

    `forward` returns the four stage outputs (strides 4, 8, 16, 32); the last one is also the dense CLIP feature
    map used for mask pooling (ConvNeXt CLIP with its global pooling removed, as in the paper and FC-CLIP).
    Always in eval mode and without gradients, whatever mode the parent model is in.
    """

    def __init__(self, visual: nn.Module, logit_scale: torch.Tensor):
        super().__init__()
        trunk = getattr(visual, "trunk", None)
        if trunk is None or not hasattr(trunk, "stages") or not hasattr(trunk, "stem"):
            raise ValueError(
                "DEARLi needs an OpenCLIP timm ConvNeXt image tower (with `trunk.stem` and `trunk.stages`)"
            )
        self.visual = visual
        # CLIP's own (learned, frozen) temperature for zero-shot classification of mask-pooled features.
        self.logit_scale = nn.Parameter(logit_scale.detach().clone().reshape(()), requires_grad=False)
        # Channels of the four stages (strides 4, 8, 16, 32), from timm's feature metadata.
        self.channels = [int(info["num_chs"]) for info in trunk.feature_info][-4:]
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        _mark_initialized(self)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenClipBackbone":
        # Frozen: stays in eval mode (no dropout / drop-path) even when the model trains.
        return super().train(False)

    def _stages(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        trunk = self.visual.trunk
        x = trunk.stem(pixel_values)
        features = []
        for stage in trunk.stages:
            x = stage(x)
            features.append(x)
        features[-1] = trunk.norm_pre(features[-1])
        return features

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self._stages(pixel_values)

    @torch.no_grad()
    def embed_pooled_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """Map mask-pooled dense features (..., C5) through the CLIP image head to the joint space (..., D)."""
        shape = pooled.shape[:-1]
        x = pooled.reshape(-1, pooled.shape[-1], 1, 1)
        x = self.visual.trunk.head(x)  # norm (+ pooling over the 1x1 map, flatten)
        x = x.reshape(x.shape[0], -1)
        x = self.visual.head(x)  # projection to the CLIP embedding space
        return x.reshape(*shape, -1)


class ClipTextEncoder(nn.Module):
    """The frozen CLIP text tower with its tokenizer; encodes class names into prompt-ensembled embeddings."""

    def __init__(self, clip_model: nn.Module, text_config: dict[str, Any]):
        super().__init__()
        clip_model.visual = None  # the image tower lives in FrozenClipBackbone
        self.clip = clip_model
        self.text_config = dict(text_config)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        _mark_initialized(self)
        super().train(False)

    def train(self, mode: bool = True) -> "ClipTextEncoder":
        return super().train(False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        from open_clip import tokenizer as oc_tokenizer

        context_length = int(self.text_config.get("context_length", 77))
        if self.text_config.get("hf_tokenizer_name"):
            tok = oc_tokenizer.HFTokenizer(self.text_config["hf_tokenizer_name"], context_length=context_length)
        else:
            tok = oc_tokenizer.SimpleTokenizer(context_length=context_length)
        return tok(texts)

    @torch.no_grad()
    def encode_synonyms(self, synonyms: list[str], templates: list[str], batch_size: int = 256) -> torch.Tensor:
        """Embed each synonym with every template, L2-normalise, average over templates, re-normalise: (S, D)."""
        prompts = [template.format(s) for s in synonyms for template in templates]
        device = next(self.clip.parameters()).device
        if getattr(self.clip, "attn_mask", None) is not None:
            # OpenCLIP's causal mask is a non-persistent buffer that transformers' meta-device loading leaves
            # uninitialised: rebuild it (upper triangle -inf) before encoding.
            length = self.clip.attn_mask.shape[-1]
            self.clip.attn_mask = torch.full((length, length), float("-inf"), device=device).triu_(1)
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenize(prompts[start : start + batch_size]).to(device)
            chunks.append(F.normalize(self.encode_tokens(tokens).float(), dim=-1))
        embeddings = torch.cat(chunks).reshape(len(synonyms), len(templates), -1).mean(dim=1)
        return F.normalize(embeddings, dim=-1)

    def _supports_truncation(self) -> bool:
        """Whether cutting the padded context after the longest prompt leaves the embeddings unchanged: a standard
        OpenCLIP text tower (learned positional table, causal mask, pooling at the end-of-text token) fed by the
        CLIP BPE tokenizer, whose padding id 0 follows the end-of-text token."""
        clip = self.clip
        return (
            not self.text_config.get("hf_tokenizer_name")
            and getattr(clip, "text_pool_type", None) == "argmax"
            and isinstance(getattr(clip, "positional_embedding", None), torch.Tensor)
            and isinstance(getattr(clip, "attn_mask", None), torch.Tensor)
            and hasattr(clip, "token_embedding")
        )

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """`encode_text` of the CLIP model on (N, context_length) token ids, run only over the columns up to the
        longest prompt's end-of-text token. With a causal mask the later (padding) positions never influence the
        pooled end-of-text feature, so the result equals the full-context one while costing a fraction of it (ViLD
        prompts use about 15 of the 77 positions)."""
        clip = self.clip
        if not self._supports_truncation():
            return clip.encode_text(tokens)
        used = int(tokens.argmax(dim=-1).max()) + 1  # the end-of-text token has the highest id
        full_positional, full_mask = clip.positional_embedding, clip.attn_mask
        if used >= full_positional.shape[0]:
            return clip.encode_text(tokens)
        try:
            # encode_text reads these two attributes; swap in their leading `used` rows for this call only.
            clip.positional_embedding = nn.Parameter(full_positional[:used], requires_grad=False)
            clip.attn_mask = full_mask[:used, :used]
            return clip.encode_text(tokens[:, :used])
        finally:
            clip.positional_embedding = full_positional
            clip.attn_mask = full_mask


def mask_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Average `features` (B, C, h, w) inside binary `masks` (B, Q, h, w) -> (B, Q, C); empty masks give zeros."""
    area = masks.sum(dim=(-2, -1)).unsqueeze(-1)
    pooled = torch.einsum("bchw,bqhw->bqc", features, masks)
    return pooled / area.clamp(min=1.0)
