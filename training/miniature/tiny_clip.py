"""The miniature world's tiny CLIP: architecture, caption stream, contrastive pretraining, DEARLi built on it.

* **Architecture** (:data:`TINY_CLIP_MODEL_CONFIG`, shipped as ``assets/tiny_clip_config.json``): an OpenCLIP ``CLIP``
  with a timm ConvNeXt-Atto image tower (four stages, as ``FrozenClipBackbone`` needs; ``timm_pool=""`` keeps timm's
  average pooling + norm head, ``timm_proj="linear"`` projects to the joint space, so mask pooling of the last stage
  followed by the head equals ``encode_image`` on a whole image), a 2-layer text transformer and OpenCLIP's CLIP BPE
  tokenizer (``open_clip.get_tokenizer("ViT-B-32")``, offline).
* **Caption stream** (:func:`sample_pair`): 128x128 images at the pixel scale of the 256x256 world, rendered by
  ``world.py`` from the ``clip_pretrain`` seed stream (disjoint from every panoptic image). Three kinds: close-ups
  of one thing (or a small group of one class) on a stuff background, captioned with the thing only or the thing
  "on" its background; stuff-only crops captioned with the stuff class; small scenes captioned with their whole
  content. Classes are drawn uniformly, so CLIP sees every class equally often, whatever the world's long tail.
  Captions use every synonym, colour / pattern attributes, counts and the 14 ViLD prompt templates among others.
  Close-ups exist because ``DESIGN.md`` measured that scene captions alone make mask-pooled things look like stuff.
  Measured with the shipped weights (``assets/README.md``): close-up crops 88% (things 85%, stuff 100%); mask-pooled
  GT masks 23% for things (7x chance; 15% of things called stuff) and 46% for stuff, whose masks are now often called
  a neighbouring thing: at the 8x8 grid, cells next to a thing carry its features into the stuff mask.
* **Pretraining** (:func:`pretrain`): AdamW + cosine schedule with OpenCLIP's own ``ClipLoss``; resumable
  checkpoints (safetensors + JSON + the optimizer state); the sample stream is a function of (seed, step), so a
  resumed run sees exactly the images it would have seen.
* **DEARLi on it** (:func:`dearli_on_tiny_clip`): through ``DearliForPanopticSegmentation.from_open_clip``, the path
  real weights take; its zero-shot evaluation is :mod:`training.miniature.tiny_clip_zero_shot`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from . import world as W

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SHIPPED_CONFIG = ASSETS_DIR / "tiny_clip_config.json"
SHIPPED_WEIGHTS = ASSETS_DIR / "tiny_clip.safetensors"
SHIPPED_RECORD = ASSETS_DIR / "tiny_clip_record.json"

# The architecture (an OpenCLIP model config): ConvNeXt-Atto image tower, 2-layer text tower, 128-d joint space.
# The shipped JSON is its one definition, so that the architecture and the shipped weights cannot drift apart.
TINY_CLIP_MODEL_CONFIG: dict[str, Any] = json.loads(SHIPPED_CONFIG.read_text())
TOKENIZER_NAME = "ViT-B-32"  # OpenCLIP's CLIP BPE tokenizer (works offline)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Captions: the ViLD prompt templates (what DEARLi encodes class names with) and freer ones.
_VILD = (
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
)
_FREE = ("{}", "a {}", "a close-up of a {}", "an image of a {}", "a picture of the {}", "the {}",
         "a photo of the {}.", "a {} in the picture")
_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}


def tiny_clip_model_config() -> dict[str, Any]:
    """A copy of the architecture (OpenCLIP model-config dict)."""
    return json.loads(json.dumps(TINY_CLIP_MODEL_CONFIG))


def build_tiny_clip(model_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """A randomly initialised OpenCLIP model of the tiny architecture."""
    from modeling_dearli.clip_backbone import build_open_clip_model

    return build_open_clip_model(model_config or tiny_clip_model_config())


def tokenizer(context_length: int | None = None):
    import open_clip

    length = context_length or TINY_CLIP_MODEL_CONFIG["text_cfg"]["context_length"]
    return open_clip.get_tokenizer(TOKENIZER_NAME, context_length=length)


# --------------------------------------------------------------------------------------------------------------------
# caption stream
# --------------------------------------------------------------------------------------------------------------------
def _choice(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _thing_phrase(rng: np.random.Generator, spec: W.ClassSpec, count: int = 1) -> str:
    """'a zebra', 'two striped zebras', 'a red ladybug with black dots' ..."""
    singular = [n for n in spec.names if not n.endswith("s") or n in ("bus",)] or list(spec.names)
    plural = [n for n in spec.names if n not in singular]
    name = _choice(rng, singular) if count == 1 or not plural else _choice(rng, plural)
    r = rng.random()
    if r < 0.35 and spec.attributes:
        attr = _choice(rng, spec.attributes)
        name = f"{name} {attr}" if attr.startswith("with ") else f"{attr} {name}"
    count_word = _COUNT_WORDS.get(count, "several")
    if count == 1:
        count_word = "an" if name[0] in "aeiou" else "a"
    return f"{count_word} {name}"


def _stuff_name(rng: np.random.Generator, spec: W.ClassSpec) -> str:
    name = _choice(rng, spec.names)
    if rng.random() < 0.2 and spec.attributes:
        name = f"{_choice(rng, spec.attributes)} {name}"
    return name


def _template(rng: np.random.Generator, name: str) -> str:
    return _choice(rng, _VILD if rng.random() < 0.6 else _FREE).format(name)




def sample_pair(rng: np.random.Generator, size: int = 128, settings: W.WorldSettings | None = None,
                kinds: dict[str, float] | None = None) -> tuple[np.ndarray, str, str]:
    """One (uint8 image (size, size, 3), caption, kind) pair of the caption stream (module docstring)."""
    settings = settings or W.WorldSettings()
    kinds = kinds or {"object": 0.5, "stuff": 0.2, "scene": 0.3}
    names, p = list(kinds), np.array(list(kinds.values()), np.float64)
    kind = names[int(rng.choice(len(names), p=p / p.sum()))]
    if kind == "stuff":
        spec = _choice(rng, W.STUFF_CLASSES)
        scene = W.Scene(size=size, stuff=[spec.category_id], boundaries=[], scale=1.0)
        image, _, _ = W.render_scene(scene, rng, settings)
        return image, _template(rng, _stuff_name(rng, spec)), kind
    if kind == "object":
        spec = _choice(rng, W.THING_CLASSES)
        scene = W.sample_stuff(rng, size, scale=1.0)
        count = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
        center = (size / 2 + rng.uniform(-0.2, 0.2) * size, size / 2 + rng.uniform(-0.2, 0.2) * size)
        first = W.sample_instance(rng, spec.category_id, size, settings.thing_diameter, center=center, scale=1.0)
        scene.things.append(first)
        for _ in range(count - 1):
            inst = W.sample_instance(rng, spec.category_id, size, (30.0, 60.0), scale=1.0)
            direction = rng.uniform(0, 2 * math.pi)
            dist = (first.radius + inst.radius) * rng.uniform(0.6, 0.95)
            inst.center = (first.center[0] + dist * math.cos(direction), first.center[1] + dist * math.sin(direction))
            scene.things.append(inst)
        image, _, _ = W.render_scene(scene, rng, settings)
        count = len(scene.things)
        if count == 0:  # everything fell outside: a background-only image
            return image, _template(rng, " and ".join(_choice(rng, W._BY_ID[c].names) for c in scene.stuff)), kind
        phrase = _thing_phrase(rng, spec, count)
        if rng.random() < 0.3:
            ground = W._BY_ID[_choice(rng, scene.stuff)]
            return image, f"a photo of {phrase} on the {_stuff_name(rng, ground)}", kind
        if count == 1 and rng.random() < 0.8:
            return image, _template(rng, phrase.split(" ", 1)[1]), kind
        return image, _choice(rng, ("a photo of {}.", "{}", "there are {} in the scene", "{} in the picture")).format(
            phrase), kind
    # a small scene with every class drawn uniformly
    uniform = np.full(len(W.THING_CLASSES), 1 / len(W.THING_CLASSES))
    scene_settings = W.WorldSettings(**{**settings.__dict__, "num_things": (1, 4)})
    scene = W.sample_scene(rng, scene_settings, class_probabilities=uniform, size=size, scale=1.0)
    image, _, segments = W.render_scene(scene, rng, settings)
    counts: dict[int, int] = {}
    for s in segments:
        if s["isthing"]:
            counts[s["category_id"]] = counts.get(s["category_id"], 0) + 1
    stuff = [s["category_id"] for s in segments if not s["isthing"]]
    parts = [_thing_phrase(rng, W._BY_ID[c], n) for c, n in counts.items()]
    rng.shuffle(parts)
    stuff_names = [_stuff_name(rng, W._BY_ID[c]) for c in sorted(stuff, key=lambda c: -sum(
        x["area"] for x in segments if x["category_id"] == c))]
    if parts:
        listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        caption = f"a photo of {listing}" + (f" on the {stuff_names[0]}" if stuff_names else "")
        if len(stuff_names) > 1 and rng.random() < 0.5:
            caption += f" with {stuff_names[1]}"
    else:
        caption = "a photo of " + " and ".join(stuff_names)
    return image, caption, kind


def to_pixel_values(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> CLIP-normalised float (N, 3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(list(images)))).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


MASK_POOLING_THRESHOLD = 0.5  # DearliConfig.mask_pooling_threshold's default
FEATURE_STRIDE = 32  # ConvNeXt's last stage: the grid of the dense CLIP features that DEARLi mask-pools


def masks_on_grid(masks: torch.Tensor, grid: tuple[int, int], threshold: float = MASK_POOLING_THRESHOLD
                  ) -> torch.Tensor:
    """Binary masks ``(..., h, w)`` (e.g. at the decoder's 1/4 resolution) as DEARLi's mask pooling sees them on the
    CLIP feature ``grid``: +-20 logits, bilinearly resized, sigmoid > ``threshold``
    (``DearliForPanopticSegmentation.clip_classify_masks``). Masks too small to cover a cell centre come out empty."""
    logits = torch.where(masks > 0.5, 20.0, -20.0)
    lead = logits.shape[:-2]
    logits = logits.reshape(1, -1, *logits.shape[-2:])
    resized = F.interpolate(logits, size=grid, mode="bilinear", align_corners=False)
    return (resized.sigmoid() > threshold).reshape(*lead, *grid)


def quarter_resolution_masks(ids: np.ndarray, segment_ids: Sequence[int]) -> torch.Tensor:
    """Per segment, its binary mask at 1/4 resolution (area-averaged, > 0.5), the resolution of the decoder's masks."""
    h, w = ids.shape
    if h % 4 == 0 and w % 4 == 0:  # block sums (the same as area interpolation, without float copies of every mask)
        blocks = ids.reshape(h // 4, 4, w // 4, 4)
        return torch.from_numpy(np.stack([(blocks == i).sum((1, 3)) > 8 for i in segment_ids]).reshape(-1, h // 4,
                                                                                                      w // 4))
    full = torch.from_numpy(ids.astype(np.int64))[None] == torch.tensor(list(segment_ids))[:, None, None]
    return F.interpolate(full[None].float(), size=(h // 4, w // 4), mode="area")[0] > 0.5


def _region_caption(rng: np.random.Generator, spec: W.ClassSpec) -> str:
    """A caption naming one region's class: 'a photo of a striped zebra.', 'There is a lawn in the scene', ..."""
    if spec.isthing:
        return _template(rng, _thing_phrase(rng, spec, 1).split(" ", 1)[1])
    return _template(rng, _stuff_name(rng, spec))


def sample_regions(rng: np.random.Generator, size: int = 256, settings: W.WorldSettings | None = None
                   ) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """One scene of the region stream (classes drawn uniformly, the world's layout and pixel scale) -> (uint8 image,
    masks of its segments on the stride-32 CLIP grid (n, size/32, size/32), contiguous class index per mask); segments
    whose mask misses every cell of the grid are left out (mask pooling cannot see them)."""
    settings = settings or W.WorldSettings()
    uniform = np.full(len(W.THING_CLASSES), 1 / len(W.THING_CLASSES))
    scene = W.sample_scene(rng, settings, class_probabilities=uniform, size=size)
    image, ids, segments = W.render_scene(scene, rng, settings)
    index = {c.category_id: i for i, c in enumerate(W.CLASSES)}
    grid = (size // FEATURE_STRIDE, size // FEATURE_STRIDE)
    masks = masks_on_grid(quarter_resolution_masks(ids, [s["id"] for s in segments]).float(), grid)
    keep = masks.flatten(1).any(1)
    labels = [index[s["category_id"]] for s, k in zip(segments, keep.tolist()) if k]
    return image, masks[keep], labels


class CaptionStream(torch.utils.data.IterableDataset):
    """Batches of the caption stream from ``start_step`` on; batch ``step`` is a function of ``(seed, step)`` only, so
    resuming reproduces the stream.

    Each item is ``(pixel_values, tokens, captions, regions)``. ``stream_offset`` shifts the image-caption pairs (a
    continuation reads pairs its first stage never saw). With ``region_scenes > 0``, ``regions`` holds region-caption
    pairs (:meth:`region_batch`), else it is an empty dict.
    """

    def __init__(self, seed: int, batch_size: int, image_size: int = 128, start_step: int = 0,
                 num_steps: int | None = None, kinds: dict[str, float] | None = None, stream_offset: int = 0,
                 region_scenes: int = 0, region_size: int = 256):
        super().__init__()
        self.seed, self.batch_size, self.image_size = int(seed), int(batch_size), int(image_size)
        self.start_step, self.num_steps, self.kinds = int(start_step), num_steps, kinds
        self.stream_offset, self.region_scenes, self.region_size = int(stream_offset), int(region_scenes), int(
            region_size)
        self._tokenizer = tokenizer()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images, captions = [], []
        for i in range(self.batch_size):
            rng = W.scene_rng(self.seed, "clip_pretrain", step, i)
            image, caption, _ = sample_pair(rng, self.image_size, kinds=self.kinds)
            if rng.random() < 0.5:
                image = image[:, ::-1]
            images.append(image)
            captions.append(caption)
        return to_pixel_values(images), self._tokenizer(captions), captions

    def region_batch(self, step: int) -> dict[str, Any]:
        """Region-caption pairs of step ``step`` (``clip_regions`` stream, disjoint from every panoptic image):
        ``region_scenes`` scenes of ``region_size`` pixels and, per class present, one of its regions (so that no two
        regions of a batch share a class: no false negatives among them in the contrastive loss) ->
        ``{"pixel_values": (S, 3, size, size), "masks": (R, size/32, size/32) bool, "scene_index": (R,),
        "tokens": (R, L), "captions": [R], "labels": (R,)}``."""
        images, masks, scene_index, labels = [], [], [], []
        for i in range(self.region_scenes):
            rng = W.scene_rng(self.seed, "clip_regions", step, i)
            image, scene_masks, scene_labels = sample_regions(rng, self.region_size)
            if rng.random() < 0.5:
                image, scene_masks = image[:, ::-1], scene_masks.flip(-1)
            images.append(image)
            masks += list(scene_masks)
            scene_index += [i] * len(scene_labels)
            labels += scene_labels
        rng = W.scene_rng(self.seed, "clip_regions", step, self.region_scenes)
        chosen: dict[int, int] = {}
        for r in rng.permutation(len(labels)).tolist():
            chosen.setdefault(labels[r], r)
        keep = sorted(chosen.values())
        captions = [_region_caption(rng, W.CLASSES[labels[r]]) for r in keep]
        return {"pixel_values": to_pixel_values(images), "masks": torch.stack([masks[r] for r in keep]),
                "scene_index": torch.tensor([scene_index[r] for r in keep]), "tokens": self._tokenizer(captions),
                "captions": captions, "labels": torch.tensor([labels[r] for r in keep])}

    def __iter__(self):
        step = self.start_step
        while self.num_steps is None or step < self.num_steps:
            pixel_values, tokens, captions = self.batch(self.stream_offset + step)
            yield pixel_values, tokens, captions, self.region_batch(step) if self.region_scenes else {}
            step += 1


def region_embeddings(model: torch.nn.Module, pixel_values: torch.Tensor, masks: torch.Tensor,
                      scene_index: torch.Tensor) -> torch.Tensor:
    """Normalised CLIP embeddings (R, D) of mask-pooled regions through the model's own dense path (with gradients):
    ``trunk.forward_features`` -> mean inside each grid mask -> ``trunk.head`` -> ``visual.head`` - what
    ``FrozenClipBackbone`` + ``mask_pool`` + ``embed_pooled_features`` compute at inference."""
    visual = model.visual
    features = visual.trunk.forward_features(pixel_values)[scene_index]  # (R, C, g, g)
    weights = masks.to(features.dtype)[:, None]
    pooled = (features * weights).sum((-2, -1)) / weights.sum((-2, -1)).clamp(min=1.0)
    return F.normalize(visual.head(visual.trunk.head(pooled[..., None, None])), dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# pretraining
# --------------------------------------------------------------------------------------------------------------------
def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_open_clip_weights(model: torch.nn.Module, path: str | os.PathLike[str], dtype: torch.dtype | None = None
                           ) -> None:
    """The model's state dict as an OpenCLIP ``.safetensors`` checkpoint (``open_clip.load_checkpoint`` reads it)."""
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "architecture": json.dumps(TINY_CLIP_MODEL_CONFIG)})


def pretrain(
    output_dir: str | os.PathLike[str],
    seed: int = 0,
    max_train_steps: int = 4000,
    train_batch_size: int = 64,
    image_size: int = 128,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 200,
    checkpointing_steps: int = 250,
    logging_steps: int = 10,
    num_threads: int | None = None,
    kinds: dict[str, float] | None = None,
    eval_fn: Any = None,
    eval_steps: int = 0,
    init_weights: str | os.PathLike[str] | None = None,
    stream_offset: int = 0,
    region_scenes: int = 0,
    region_size: int = 256,
) -> Path:
    """Contrastive pretraining of the tiny CLIP with OpenCLIP's ``ClipLoss``; resumes from ``output_dir`` when it
    holds a checkpoint. Writes ``checkpoint/`` (every ``checkpointing_steps``), ``log.jsonl`` and, at the end,
    ``tiny_clip.safetensors`` (fp32) + ``tiny_clip_config.json``. Returns the final weights path.

    A continuation starts from ``init_weights`` (an OpenCLIP ``.safetensors`` file) with a fresh optimizer and reads
    the caption stream from step ``stream_offset`` on (pairs the first stage never saw). With ``region_scenes > 0``
    every step also holds region-caption pairs (:meth:`CaptionStream.region_batch`): mask-pooled regions of that many
    ``region_size`` scenes, embedded through the dense path DEARLi mask-pools (:func:`region_embeddings`), in the
    same ``ClipLoss`` as the image-caption pairs, so that mask-pooled dense features become class-discriminative."""
    from open_clip.loss import ClipLoss
    from safetensors.torch import load_file

    if num_threads:
        torch.set_num_threads(num_threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = output_dir / "checkpoint"
    config_path = output_dir / "tiny_clip_config.json"
    config_path.write_text(json.dumps(TINY_CLIP_MODEL_CONFIG, indent=1))
    run = {"seed": seed, "max_train_steps": max_train_steps, "train_batch_size": train_batch_size,
           "image_size": image_size, "learning_rate": learning_rate, "weight_decay": weight_decay,
           "warmup_steps": warmup_steps, "kinds": kinds}
    if init_weights is not None or stream_offset or region_scenes:
        run.update({"init_weights": Path(init_weights).name if init_weights else None, "stream_offset": stream_offset,
                    "region_scenes": region_scenes, "region_size": region_size})

    torch.manual_seed(seed)
    model = build_tiny_clip()
    if init_weights is not None:
        initial = load_file(str(init_weights))
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in initial.items()})
        logger.info("initial weights: %s", init_weights)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, betas=(0.9, 0.98),
                                  eps=1e-6)
    start_step, elapsed = 0, 0.0
    if (ckpt_dir / "state.json").is_file():
        state = json.loads((ckpt_dir / "state.json").read_text())
        if state["run"] != json.loads(json.dumps(run)):
            raise ValueError(f"{ckpt_dir} was written by a run with other settings: {state['run']} (now {run})")
        model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")))
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True))
        start_step, elapsed = int(state["step"]), float(state["seconds"])
        logger.info("resumed from step %d (%.0f s trained)", start_step, elapsed)
    loss_fn = ClipLoss()
    stream = CaptionStream(seed, train_batch_size, image_size, start_step, max_train_steps, kinds,
                           stream_offset=stream_offset, region_scenes=region_scenes, region_size=region_size)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=2,
                                         persistent_workers=False)
    model.train()
    log = open(output_dir / "log.jsonl", "a")  # noqa: SIM115 (appended to over the whole run)
    t_last = time.perf_counter()
    step = start_step
    for step_index, (pixel_values, tokens, _captions, regions) in enumerate(loader, start=start_step):
        step = step_index
        lr = _lr_at(step, max_train_steps, learning_rate, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        image_features, text_features, logit_scale = model(pixel_values, tokens)[:3]
        if regions:
            image_features = torch.cat([image_features, region_embeddings(
                model, regions["pixel_values"], regions["masks"], regions["scene_index"])])
            text_features = torch.cat([text_features, model.encode_text(regions["tokens"], normalize=True)])
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        if step % logging_steps == 0 or step == max_train_steps:
            entry = {"step": step, "loss": round(float(loss), 4), "lr": lr, "logit_scale": round(
                float(model.logit_scale.exp()), 2), "seconds": round(elapsed, 1)}
            log.write(json.dumps(entry) + "\n")
            log.flush()
            logger.info("%s", entry)
        if eval_fn is not None and eval_steps and step % eval_steps == 0:
            model.eval()
            result = eval_fn(model)
            model.train()
            log.write(json.dumps({"step": step, "eval": result}) + "\n")
            log.flush()
        if step % checkpointing_steps == 0 or step == max_train_steps:
            _save_checkpoint(ckpt_dir, model, optimizer, step, elapsed, run)
    log.close()
    final = output_dir / "tiny_clip.safetensors"
    save_open_clip_weights(model, final)
    (output_dir / "pretrain_summary.json").write_text(json.dumps({"run": run, "steps": step,
                                                                   "seconds": round(elapsed, 1)}, indent=1))
    return final


def _save_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizer: Any, step: int, seconds: float,
                     run: dict[str, Any]) -> None:
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_open_clip_weights(model, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "seconds": round(seconds, 1), "run": run}))
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    if old.exists():
        import shutil

        shutil.rmtree(old)


# --------------------------------------------------------------------------------------------------------------------
# DEARLi on the tiny CLIP
# --------------------------------------------------------------------------------------------------------------------
def world_class_names() -> tuple[list[str], list[int]]:
    """The world's label space as DEARLi takes it: ``"name,synonym,..."`` per class (class-name file order) and the
    contiguous thing ids."""
    return [",".join(c.names) for c in W.CLASSES], [i for i, c in enumerate(W.CLASSES) if c.isthing]


def dearli_on_tiny_clip(
    config_path: str | os.PathLike[str] = SHIPPED_CONFIG,
    weights_path: str | os.PathLike[str] = SHIPPED_WEIGHTS,
    prompt_templates: Sequence[str] | None = None,
    **config_kwargs: Any,
):
    """A tiny DEARLi (``modeling_dearli.presets`` decoder sizes) on the tiny CLIP, built by ``from_open_clip`` from the
    OpenCLIP model-config JSON and the ``.safetensors`` weights, with the world's classes."""
    from modeling_dearli import DearliForPanopticSegmentation
    from modeling_dearli.configuration_dearli import VILD_PROMPT_TEMPLATES
    from modeling_dearli.presets import TINY_DECODER_KWARGS

    class_names, thing_ids = world_class_names()
    kwargs = {**TINY_DECODER_KWARGS, "prompt_templates": list(prompt_templates or VILD_PROMPT_TEMPLATES),
              **config_kwargs}
    model = DearliForPanopticSegmentation.from_open_clip(str(config_path), str(weights_path), class_names=class_names,
                                                         thing_ids=thing_ids, **kwargs)
    return model.eval()
