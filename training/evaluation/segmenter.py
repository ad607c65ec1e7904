"""One image in, overlay pictures and a segment table out: the inference behind the web demo (``app.py``), importable
and testable without a browser.

- :class:`Segmenter` holds a loaded model and its image processor. :meth:`Segmenter.predict` runs the network once
  and post-processes its outputs with several Eq. 6 weights (``ensemble_alpha``: 1.0 = decoder only, 0.0 = CLIP
  only), so the decoder-only and the ensembled result of an image cost one forward pass; the last forward pass is
  kept, so moving the α slider or switching the task only re-runs post-processing.
- The vocabulary as text (:func:`parse_vocabulary`, :func:`format_vocabulary`): one class per line, synonyms
  comma-separated, a trailing ``[stuff]`` for stuff classes (``[thing]`` is the default and may be written out):

      person, man, woman
      sky [stuff]
      grass, lawn [stuff]

  Lines that are empty or start with ``#`` are ignored. At most :data:`MAX_VOCABULARY_CLASSES` classes and
  :data:`MAX_VOCABULARY_LINE_CHARS` characters per line are accepted (every name is encoded with 14 prompt
  templates on each change, and CLIP's tokenizer slows down sharply on very long words; larger vocabularies go
  through ``model.set_class_names`` in Python). A new vocabulary is applied with the model's
  ``set_class_names`` (its kept CLIP text tower encodes the names); a model saved without it
  (``config.keep_text_tower=False``) keeps the vocabulary it was trained with and says so.
- Pictures show unlabelled (void) pixels dimmed towards grey, with an "unlabeled" entry in the legend, so that a
  region no segment claims is not mistaken for one of the classes.
- Images come in as files (a path or bytes) read by the project's one reader,
  :func:`modeling_dearli.image_reading.read_image` (16-bit scaled, EXIF orientation, one ``OSError`` naming an
  unreadable file), or as already decoded images brought to RGB by its :func:`~modeling_dearli.image_reading.to_rgb`.
- :func:`load_segmenter` loads a saved folder or a Hub id (``revision=`` pins a commit). DEARLi checkpoints run the
  installed ``modeling_dearli`` code; the code saved inside a model folder runs only with ``trust_remote_code=True``.
- The web demo's default model and example images: :data:`DEFAULT_MODEL_DIR`, :data:`DEFAULT_EXAMPLES_DIR` (left
  behind by :data:`DEFAULT_MODEL_COMMAND`), or ``model/`` and ``examples/`` beside ``app.py`` in an exported Space.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modeling_dearli.image_reading import ImageSource, read_image, to_rgb

from .visualization import (
    SegmentationResult,
    draw_legend,
    from_instance,
    from_panoptic,
    from_semantic,
    legend_entries,
    overlay,
)

__all__ = [
    "DEFAULT_EXAMPLES_DIR",
    "DEFAULT_MODEL_COMMAND",
    "DEFAULT_MODEL_DIR",
    "IMAGE_EXTENSIONS",
    "SPACE_EXAMPLES_DIR",
    "SPACE_MODEL_DIR",
    "TASKS",
    "UNLABELED",
    "Prediction",
    "Segmenter",
    "VocabularyError",
    "find_example_images",
    "format_vocabulary",
    "load_segmenter",
    "parse_vocabulary",
    "picture_with_unlabeled",
]

logger = logging.getLogger(__name__)

# The web demo's default model: the trained model of the miniature world that README command 1 leaves behind, and that
# world's example images (paths relative to the repository root, where app.py lives).
DEFAULT_MODEL_DIR = Path("outputs/demo/dearli")
DEFAULT_EXAMPLES_DIR = Path("outputs/demo/examples")
DEFAULT_MODEL_COMMAND = "python scripts/demo.py --output_dir outputs/demo"
# The same inside a Space folder written by `python app.py --export_space DIR` (beside its app.py).
SPACE_MODEL_DIR = Path("model")
SPACE_EXAMPLES_DIR = Path("examples")

TASKS = ("panoptic", "semantic", "instance")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Segments below this class probability are dropped (the image processor's defaults: DEARLi keeps every panoptic
# segment; instance output lists the confident ones).
_THRESHOLDS = {"panoptic": 0.0, "instance": 0.0}
# The legend's name for pixels no segment claims (void), and their colour: a grey no class colour comes near
# (class colours have a saturation of at least 0.55), blended as segments are.
UNLABELED = "unlabeled"
_UNLABELED_COLOUR = np.array([128, 128, 128], dtype=np.uint8)
_TINT = 0.55  # opacity of segment and void tints (the overlay's default)
_TAG = re.compile(r"\[\s*([A-Za-z]*)\s*\]\s*$")


MAX_VOCABULARY_CLASSES = 1000  # ADE20K-full's 847 fit
MAX_VOCABULARY_LINE_CHARS = 300  # CLIP's context is 77 tokens: a longer line cannot be encoded in full anyway


class VocabularyError(ValueError):
    """A vocabulary that cannot be applied; the message is meant for the user as it is."""


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary as text


def parse_vocabulary(text: str) -> tuple[list[str], list[int]]:
    """``(class_names, thing_ids)`` of a vocabulary text (syntax in the module docstring). Class names come out in
    the config's form, synonyms joined by ``","``."""
    class_names: list[str] = []
    thing_ids: list[int] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_VOCABULARY_LINE_CHARS:
            raise VocabularyError(f"line {number} has {len(line)} characters; at most {MAX_VOCABULARY_LINE_CHARS} "
                                  "per class line")
        if len(class_names) == MAX_VOCABULARY_CLASSES:
            raise VocabularyError(f"more than {MAX_VOCABULARY_CLASSES} classes (line {number}); larger vocabularies "
                                  "go through model.set_class_names in Python")
        kind = "thing"
        tag = _TAG.search(line)
        if tag:
            kind = tag.group(1).lower()
            if kind not in ("thing", "stuff"):
                raise VocabularyError(f"line {number}: unknown tag [{tag.group(1)}]; write [stuff] or [thing]")
            line = line[: tag.start()].strip()
        synonyms = [s.strip() for s in line.split(",") if s.strip()]
        if not synonyms:
            raise VocabularyError(f"line {number}: no class name before the tag")
        if kind == "thing":
            thing_ids.append(len(class_names))
        class_names.append(",".join(synonyms))
    if not class_names:
        raise VocabularyError("the vocabulary is empty: write one class per line")
    return class_names, thing_ids


def format_vocabulary(class_names: Sequence[str], thing_ids: Sequence[int]) -> str:
    """The text form of a vocabulary (inverse of :func:`parse_vocabulary`)."""
    things = set(thing_ids)
    lines = []
    for i, name in enumerate(class_names):
        line = ", ".join(s.strip() for s in name.split(",") if s.strip())
        lines.append(line if i in things else f"{line} [stuff]")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Inference


@dataclass
class Prediction:
    """One post-processed result: the segments, the overlay picture and their table rows."""

    task: str
    ensemble_alpha: float
    result: SegmentationResult
    picture: Image.Image

    @property
    def rows(self) -> list[list[Any]]:
        """``[label, score, area in pixels]`` per segment, largest first (score ``None`` for semantic segments)."""
        segments = sorted(self.result.segments, key=lambda s: (-s.area, s.id))
        return [[s.label, None if s.score is None else round(float(s.score), 3), int(s.area)] for s in segments]


class Segmenter:
    """A DEARLi model and its image processor, segmenting one image at a time (thread-safe: one request at a time).

    Args:
        model: a ``DearliForPanopticSegmentation`` (put in eval mode).
        processor: its ``DearliImageProcessor``.
        device: where the model runs (default: the model's device).
        max_image_side: larger images are downscaled to this longest side first (the processor resizes anyway).
        display_width: about the width in pixels at which pictures are shown; labels and legend are sized to be
            readable there (at least 11 pixels high in the picture itself).
    """

    def __init__(self, model: Any, processor: Any, device: str | torch.device | None = None,
                 max_image_side: int = 1280, display_width: int = 480) -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.max_image_side = int(max_image_side)
        self.display_width = int(display_width)
        self._lock = threading.Lock()
        self._cached: tuple[tuple[str, tuple[str, ...]], Any] | None = None

    # Vocabulary ---------------------------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return list(self.model.config.class_names)

    @property
    def thing_ids(self) -> list[int]:
        return list(self.model.config.thing_ids)

    @property
    def can_change_vocabulary(self) -> bool:
        """Whether the model kept its CLIP text tower (``config.keep_text_tower``) to encode new class names."""
        return getattr(self.model, "text_encoder", None) is not None

    @property
    def vocabulary_text(self) -> str:
        return format_vocabulary(self.class_names, self.thing_ids)

    def set_vocabulary(self, text: str) -> bool:
        """Apply a vocabulary text; ``True`` when it changed the model's classes. Raises :class:`VocabularyError` for
        text that does not parse, names the model refuses, and any change to a model without its text tower."""
        class_names, thing_ids = parse_vocabulary(text)
        with self._lock:
            return self._apply_vocabulary(class_names, thing_ids)

    def _apply_vocabulary(self, class_names: list[str], thing_ids: list[int]) -> bool:
        if class_names == self.class_names and thing_ids == self.thing_ids:
            return False
        if not self.can_change_vocabulary:
            raise VocabularyError(
                f"This model was saved without its CLIP text tower (config.keep_text_tower=False), so it cannot "
                f"encode new class names: its vocabulary stays the {len(self.class_names)} classes it was trained on."
            )
        try:
            self.model.set_class_names(class_names, thing_ids)
        except (ValueError, RuntimeError) as error:
            raise VocabularyError(str(error)) from error
        num_labels = len(class_names)
        things = set(thing_ids)
        self.processor.num_labels = num_labels
        self.processor.label_ids_to_fuse = [i for i in range(num_labels) if i not in things]
        self._cached = None
        return True

    # Segmentation ---------------------------------------------------------------------------------------------------

    def prepare_image(self, image: ImageSource | Image.Image | np.ndarray) -> Image.Image:
        """8-bit RGB, longest side at most ``max_image_side``. A file (path or bytes) is read by the project's image
        reader (EXIF orientation applied; ``OSError`` naming a file that cannot be read); a decoded image is brought
        to RGB by its ``to_rgb`` (16-bit images scaled, not clipped)."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = to_rgb(image) if isinstance(image, Image.Image) else read_image(image)
        if max(image.size) > self.max_image_side:
            scale = self.max_image_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
        return image

    def predict(
        self,
        image: ImageSource | Image.Image | np.ndarray,
        task: str = "panoptic",
        ensemble_alphas: Sequence[float | None] = (None,),
        vocabulary: str | None = None,
    ) -> list[Prediction]:
        """One :class:`Prediction` per Eq. 6 weight in ``ensemble_alphas`` (``None``: the processor's default, i.e. the
        model's ``config.ensemble_alpha``), all from one forward pass; ``vocabulary`` (text) is applied first."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        image = self.prepare_image(image)
        with self._lock:
            if vocabulary is not None:
                self._apply_vocabulary(*parse_vocabulary(vocabulary))
            outputs = self._forward(image)
            id2label = {int(k): v for k, v in self.model.config.id2label.items()}
            return [self._postprocess(outputs, image, task, alpha, id2label) for alpha in ensemble_alphas]

    def _forward(self, image: Image.Image) -> Any:
        key = (hashlib.blake2b(image.tobytes() + repr(image.size).encode(), digest_size=16).hexdigest(),
               tuple(self.class_names))
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        inputs = self.processor(images=image, return_tensors="pt", device=self.device)
        with torch.inference_mode():
            outputs = self.model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        self._cached = (key, outputs)
        return outputs

    def _postprocess(self, outputs: Any, image: Image.Image, task: str, ensemble_alpha: float | None,
                     id2label: dict[int, str]) -> Prediction:
        alpha = float(self.processor.ensemble_alpha if ensemble_alpha is None else ensemble_alpha)
        sizes = [(image.height, image.width)]
        if task == "panoptic":
            raw = self.processor.post_process_panoptic_segmentation(
                outputs, threshold=_THRESHOLDS["panoptic"], target_sizes=sizes, ensemble_alpha=alpha)[0]
            result = from_panoptic(raw, id2label, self.thing_ids)
        elif task == "semantic":
            raw = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes,
                                                                    ensemble_alpha=alpha)[0]
            result = from_semantic(raw, id2label, self.thing_ids)
        else:
            raw = self.processor.post_process_instance_segmentation(
                outputs, threshold=_THRESHOLDS["instance"], target_sizes=sizes, ensemble_alpha=alpha)[0]
            result = from_instance(raw, id2label)
        font_size = max(11, round(13 * image.width / self.display_width))
        return Prediction(task, alpha, result, picture_with_unlabeled(image, result, font_size))


def picture_with_unlabeled(image: Image.Image, result: SegmentationResult, font_size: int) -> Image.Image:
    """:func:`~training.evaluation.visualization.overlay` of `result` on `image`, with the void pixels (id 0) dimmed
    towards grey and the legend listing them as :data:`UNLABELED` (last) when there are any."""
    void = result.id_map == 0
    if void.any():
        rgb = np.asarray(image, dtype=np.float32).copy()
        rgb[void] = (1 - _TINT) * rgb[void] + _TINT * _UNLABELED_COLOUR.astype(np.float32)
        image = Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))
    picture = overlay(image, result, legend=False, font_size=font_size)
    entries = legend_entries(result) + ([(UNLABELED, _UNLABELED_COLOUR)] if void.any() else [])
    if not entries:
        return picture
    from PIL import ImageFont

    panel = draw_legend(entries, picture.width, ImageFont.load_default(size=font_size))
    framed = Image.new("RGB", (picture.width, picture.height + panel.height), (255, 255, 255))
    framed.paste(picture, (0, 0))
    framed.paste(panel, (0, picture.height))
    return framed


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def load_segmenter(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> Segmenter:
    """A :class:`Segmenter` for a saved DEARLi folder or Hub id, loaded by
    :func:`training.pretrained.load_model_and_processor`: our own models run the installed ``modeling_dearli`` code;
    code saved with a model runs only with ``trust_remote_code=True`` (review it, and pin it with ``revision``)."""
    from transformers import PretrainedConfig

    from modeling_dearli import DearliConfig
    from training.pretrained import check_model_location, load_model_and_processor

    location = check_model_location(name_or_path)
    model_type = PretrainedConfig.get_config_dict(location, revision=revision)[0].get("model_type")
    if model_type != DearliConfig.model_type:
        raise ValueError(f"{location} holds a {model_type!r} model, not DEARLi: the demo needs DEARLi's CLIP "
                         "ensembling and vocabulary")
    model, processor = load_model_and_processor(location, trust_remote_code=trust_remote_code, revision=revision)
    return Segmenter(model, processor, device=device)


def find_example_images(folder: str | os.PathLike | None, limit: int = 12) -> list[Path]:
    """Up to ``limit`` image files of ``folder`` (sorted by name); none when it is ``None`` or missing."""
    if folder is None or not Path(folder).is_dir():
        return []
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return files[:limit]
