"""Geometric ensembling of M2F-Lang and zero-shot CLIP class posteriors (DEARLi paper, Eq. 6).

This is the single implementation used by the image processor (inference, evaluation) and by the SSL teacher
(pseudo-labels), with the one rule for an unset weight (:func:`resolve_ensemble_alpha`) and the one getter of model
output fields (:func:`output_field`). Torch only: the file is shipped to the Hub as remote code.

Convention: ``ensemble_alpha`` weighs the mask-transformer (M2F-Lang) posterior and ``1 - ensemble_alpha`` the CLIP
posterior, as in the paper (α = 0.6, ``DearliConfig.ensemble_alpha``). The reference implementation's
``GEOMETRIC_ENSEMBLE_ALPHA`` weighs CLIP instead, so its 0.4 is our 0.6.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["class_probabilities", "ensemble_class_probabilities", "output_field", "resolve_ensemble_alpha"]


def _check_ensemble_alpha(ensemble_alpha: float | torch.Tensor) -> None:
    if isinstance(ensemble_alpha, torch.Tensor):
        if ensemble_alpha.numel() and (ensemble_alpha.min() < 0 or ensemble_alpha.max() > 1):
            raise ValueError("ensemble_alpha must lie in [0, 1]")
    elif not 0.0 <= float(ensemble_alpha) <= 1.0:
        raise ValueError(f"ensemble_alpha must lie in [0, 1], got {ensemble_alpha}")


def resolve_ensemble_alpha(ensemble_alpha: float | None, config: Any) -> float:
    """The Eq. 6 weight to use: `ensemble_alpha`, or ``config.ensemble_alpha`` when it is ``None``.

    The one place where "no value given" becomes the model's value: `config` is a ``DearliConfig`` (validation, the SSL
    teacher, ``scripts/evaluate.py``, ``DearliImageProcessor.from_model_config``) or the image processor built from
    one (its post-processing)."""
    value = float(config.ensemble_alpha if ensemble_alpha is None else ensemble_alpha)
    _check_ensemble_alpha(value)
    return value


def ensemble_class_probabilities(
    class_queries_logits: torch.Tensor,
    clip_class_logits: torch.Tensor | None,
    ensemble_alpha: float | torch.Tensor,
) -> torch.Tensor:
    """Ensembled mask-wide class posteriors ``[p_ens * (1 - p_void), p_void]`` of shape ``(..., C + 1)``.

    With ``z = class_queries_logits`` (C classes + no-object):
    ``p_void = softmax(z)[..., C]``, ``p_m2f = softmax(z[..., :C])``, ``p_clip = softmax(clip_class_logits)`` and
    ``p_ens = softmax(a * log p_m2f + (1 - a) * log p_clip)`` with ``a = ensemble_alpha`` (computed with
    ``log_softmax``, so it is stable for any logits). ``a = 1`` reproduces ``softmax(z)`` (plain M2F-Lang), ``a = 0``
    uses CLIP recognition only (the no-object probability always comes from the decoder). Without CLIP logits
    (``None``) the result is ``softmax(z)``.

    Args:
        class_queries_logits: ``(..., Q, C + 1)`` decoder logits, last entry = no-object.
        clip_class_logits: ``(..., Q, C)`` zero-shot CLIP logits of the mask-pooled features, or ``None``.
        ensemble_alpha: weight of the decoder posterior; a float or a tensor broadcastable to ``(..., Q, 1)``.

    Returns:
        Float tensor (at least float32) of shape ``(..., Q, C + 1)`` whose last dimension sums to one.
    """
    _check_ensemble_alpha(ensemble_alpha)
    logits = class_queries_logits
    if not logits.is_floating_point():
        raise TypeError("class_queries_logits must be a floating point tensor")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    if clip_class_logits is None:
        return logits.softmax(-1)
    if clip_class_logits.shape[:-1] != logits.shape[:-1] or clip_class_logits.shape[-1] != logits.shape[-1] - 1:
        raise ValueError(
            "clip_class_logits must have shape (..., Q, C) matching class_queries_logits (..., Q, C + 1); got "
            f"{tuple(clip_class_logits.shape)} and {tuple(logits.shape)}"
        )
    p_void = logits.softmax(-1)[..., -1:]
    if not isinstance(ensemble_alpha, torch.Tensor) and float(ensemble_alpha) == 1.0:
        # Skip CLIP entirely so that non-finite CLIP logits cannot leak in through 0 * inf.
        p_ens = logits[..., :-1].softmax(-1)
    else:
        log_clip = clip_class_logits.to(dtype).log_softmax(-1)
        if not isinstance(ensemble_alpha, torch.Tensor) and float(ensemble_alpha) == 0.0:
            p_ens = log_clip.softmax(-1)
        else:
            log_m2f = logits[..., :-1].log_softmax(-1)
            p_ens = (ensemble_alpha * log_m2f + (1.0 - ensemble_alpha) * log_clip).softmax(-1)
    return torch.cat([p_ens * (1.0 - p_void), p_void], dim=-1)


def class_probabilities(outputs: Any, ensemble_alpha: float | torch.Tensor) -> torch.Tensor:
    """Class posteriors for model outputs: Eq. 6 ensembling when ``outputs`` carry ``clip_class_logits`` (without them,
    the plain decoder softmax). ``outputs`` is a model output (attribute or mapping access)."""
    logits = output_field(outputs, "class_queries_logits")
    if logits is None:
        raise ValueError("outputs have no `class_queries_logits`")
    return ensemble_class_probabilities(logits, output_field(outputs, "clip_class_logits"), ensemble_alpha)


def output_field(outputs: Any, name: str) -> Any:
    """``outputs.<name>`` or ``outputs[name]`` (model outputs are ``ModelOutput`` objects; callers may pass plain
    mappings), ``None`` when absent."""
    value = getattr(outputs, name, None)
    if value is None and isinstance(outputs, Mapping):
        value = outputs.get(name)
    return value
