"""Batch collation for DEARLi training: pad images to a common size, build `pixel_mask`, pad the target masks.

Works as the `collate_fn` of a torch `DataLoader` in the Accelerate loops and as the `data_collator` of
`transformers.Trainer` (with ``TrainingArguments(label_names=["mask_labels", "class_labels"],
remove_unused_columns=False)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["MODEL_INPUT_KEYS", "DearliDataCollator", "model_inputs", "pad_to_size"]

# The keys of a collated batch that `DearliForPanopticSegmentation.forward` takes.
MODEL_INPUT_KEYS = ("pixel_values", "pixel_mask", "mask_labels", "class_labels")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments in a collated batch (extra keys such as ``image_id`` are left out)."""
    return {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch}


def pad_to_size(tensor: torch.Tensor, height: int, width: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two dimensions of `tensor` bottom/right to (height, width)."""
    h, w = tensor.shape[-2:]
    if h > height or w > width:
        raise ValueError(f"cannot pad {(h, w)} to the smaller size {(height, width)}")
    if (h, w) == (height, width):
        return tensor
    return F.pad(tensor, (0, width - w, 0, height - h), value=value)


@dataclass
class DearliDataCollator:
    """Collate examples ``{"pixel_values": (3, h, w), "mask_labels": (n, h, w), "class_labels": (n,), ...}``.

    - ``pixel_values`` are padded bottom/right with `pad_value` (0 = the CLIP mean after normalisation) to the largest
      height/width of the batch rounded up to a multiple of `size_divisor`, and stacked to (B, 3, H, W);
    - ``pixel_mask`` (B, H, W) int64 is 1 on real pixels: an example's own ``pixel_mask`` (e.g. from
      `training.data.transforms.valid_pixel_mask`, which also marks a crop's padding) or its whole image, padded with 0;
    - ``mask_labels`` are padded with 0 to (n_i, H, W) and kept as a list (float), ``class_labels`` kept as a list
      (int64) — transformers' Mask2Former convention;
    - any other key is returned as a list (e.g. ``image_id``, ground truth for evaluation) unless `drop_extra_keys`.

    Examples without labels (``mask_labels`` absent) give a batch without ``mask_labels``/``class_labels``.
    """

    size_divisor: int = 32
    pad_value: float = 0.0
    return_pixel_mask: bool = True
    drop_extra_keys: bool = False

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        images = [torch.as_tensor(f["pixel_values"]) for f in features]
        for i, image in enumerate(images):
            if image.ndim != 3:
                raise ValueError(
                    f"example {i}: pixel_values must be (channels, height, width), got {tuple(image.shape)}"
                )
        divisor = max(int(self.size_divisor), 1)
        height = math.ceil(max(im.shape[-2] for im in images) / divisor) * divisor
        width = math.ceil(max(im.shape[-1] for im in images) / divisor) * divisor
        batch: dict[str, Any] = {
            "pixel_values": torch.stack([pad_to_size(im.float(), height, width, self.pad_value) for im in images])
        }
        if self.return_pixel_mask:
            masks = []
            for f, image in zip(features, images):
                own = f.get("pixel_mask")
                own = torch.ones(image.shape[-2:], dtype=torch.long) if own is None else torch.as_tensor(own).long()
                masks.append(pad_to_size(own, height, width, 0))
            batch["pixel_mask"] = torch.stack(masks)

        has_labels = ["mask_labels" in f and f["mask_labels"] is not None for f in features]
        if any(has_labels):
            if not all(has_labels):
                raise ValueError("either every example of a batch has mask_labels or none has")
            mask_labels, class_labels = [], []
            for i, f in enumerate(features):
                masks = torch.as_tensor(f["mask_labels"]).float()
                classes = torch.as_tensor(f["class_labels"]).long().reshape(-1)
                if masks.ndim != 3 or masks.shape[0] != classes.shape[0]:
                    raise ValueError(
                        f"example {i}: mask_labels {tuple(masks.shape)} do not match class_labels "
                        f"{tuple(classes.shape)}"
                    )
                if masks.shape[-2:] != images[i].shape[-2:]:
                    raise ValueError(
                        f"example {i}: mask_labels size {tuple(masks.shape[-2:])} differs from the image "
                        f"{tuple(images[i].shape[-2:])}"
                    )
                mask_labels.append(pad_to_size(masks, height, width, 0.0))
                class_labels.append(classes)
            batch["mask_labels"] = mask_labels
            batch["class_labels"] = class_labels

        if not self.drop_extra_keys:
            extra = {k for f in features for k in f} - set(MODEL_INPUT_KEYS)
            for key in sorted(extra):
                batch[key] = [f.get(key) for f in features]
        return batch
