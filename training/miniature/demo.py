"""The quick demo of the miniature world (``scripts/demo.py``, README command 1): the supervised baseline and DEARLi
trained side by side in minutes on a CPU, their numbers, pictures, and a trained model left behind for ``app.py``.

It is the reproduction (:mod:`training.miniature.reproduction`) restricted to the rows ``supervised``,
``supervised_ensemble`` and ``dearli`` on one labeled fraction with the :data:`DEMO` schedule, then:

* ``<output_dir>/dearli`` - the DEARLi model with an image processor at the world's 256x256 (the web demo's default
  model, ``training.evaluation.segmenter.DEFAULT_MODEL_DIR`` for ``--output_dir outputs/demo``), and
  ``<output_dir>/supervised`` - the supervised one;
* ``<output_dir>/examples`` - validation images of the world (the web demo's default examples);
* ``<output_dir>/pictures/*.png`` - per validation image: the image, its ground truth, the supervised model's
  panoptic result (decoder posteriors) and DEARLi's (ensembled, Eq. 6), with class names in the segments and a legend;
* ``<output_dir>/results.json`` / ``results.md`` - the numbers.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .reproduction import ENSEMBLE_ALPHA, Schedule, fraction_key, reproduce

__all__ = ["DEMO", "DEMO_ROWS", "run_demo", "side_by_side"]

logger = logging.getLogger(__name__)

DEMO = Schedule("demo", fractions=(1 / 32,), headline_fraction=1 / 32, headline_seeds=1, supervised_steps=120,
                ssl_steps=120, dewa_steps=100, mask_images=400)
DEMO_ROWS = ("supervised", "supervised_ensemble", "dearli")
PICTURE_SCALE = 2  # the 256x256 world is drawn at 512x512 so that labels and legend are readable
NUM_PICTURES = 4
NUM_EXAMPLES = 8


def _panoptic(ids: np.ndarray, segments: Sequence[tuple[int, int, float | None]], id2label: dict[int, str],
              thing_ids: Sequence[int], scale: int = 1):
    """A :class:`~training.evaluation.visualization.SegmentationResult` of an id map and ``(id, label, score)``
    segments, enlarged ``scale`` times (nearest neighbour)."""
    from ..evaluation.visualization import from_panoptic

    ids = np.repeat(np.repeat(np.asarray(ids, np.int64), scale, 0), scale, 1)
    infos = [{"id": i, "label_id": label, "score": score} for i, label, score in segments]
    return from_panoptic({"segmentation": ids, "segments_info": infos}, id2label, thing_ids)


def _ground_truth(world_dir: Path, index: int) -> tuple[Image.Image, str, np.ndarray, list[tuple[int, int, None]]]:
    """Validation image ``index`` of the world: image, file name, id map, ``(id, contiguous label, None)`` segments."""
    from modeling_dearli.image_processing_dearli import rgb_to_id

    from .world import world_paths

    paths = world_paths(world_dir, "val")
    data = json.loads(paths["annotations"].read_text())
    annotation = data["annotations"][index]
    image_info = next(im for im in data["images"] if im["id"] == annotation["image_id"])
    image = Image.open(paths["images"] / image_info["file_name"]).convert("RGB")
    ids = rgb_to_id(np.asarray(Image.open(paths["panoptic"] / annotation["file_name"]).convert("RGB")))
    label_of = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    segments = [(s["id"], label_of[s["category_id"]], None) for s in annotation["segments_info"]]
    return image, annotation["file_name"], ids, segments


def side_by_side(panels: Sequence[tuple[str, Image.Image]], margin: int = 8) -> Image.Image:
    """Pictures in a row, each under its title (top-aligned, white background)."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=18)
    title_height = 28
    width = sum(p.width for _, p in panels) + margin * (len(panels) + 1)
    height = max(p.height for _, p in panels) + title_height + 2 * margin
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = margin
    for title, picture in panels:
        draw.text((x + picture.width / 2, margin + title_height / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
        canvas.paste(picture, (x, margin + title_height))
        x += picture.width + margin
    return canvas


def _pictures(output_dir: Path, world_dir: Path, supervised_dir: Path, dearli_dir: Path, results: dict[str, Any],
              num_pictures: int) -> list[Path]:
    from ..evaluation.segmenter import load_segmenter
    from ..evaluation.visualization import overlay

    supervised = load_segmenter(str(supervised_dir), device="cpu")
    dearli = load_segmenter(str(dearli_dir), device="cpu")
    id2label = {int(k): v.split(",")[0] for k, v in dearli.model.config.id2label.items()}  # first names: readable
    things = dearli.thing_ids
    folder = output_dir / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    rows, fraction = results["rows"], results["headline_fraction"]
    sup_pq, dearli_pq = rows["supervised"][fraction]["PQ"], rows["dearli"][fraction]["PQ"]
    written = []
    scale = PICTURE_SCALE
    for index in range(num_pictures):
        logger.info("pictures: %d of %d", index + 1, num_pictures)
        image, name, truth_ids, truth_segments = _ground_truth(world_dir, index)
        big = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
        panels = [("image", big),
                  ("ground truth", overlay(big, _panoptic(truth_ids, truth_segments, id2label, things, scale),
                                           font_size=14))]
        for title, segmenter, alpha in ((f"supervised (PQ {sup_pq:.1f})", supervised, 1.0),
                                        (f"DEARLi (PQ {dearli_pq:.1f})", dearli, ENSEMBLE_ALPHA)):
            result = segmenter.predict(image, ensemble_alphas=[alpha])[0].result
            segments = [(s.id, s.label_id, s.score) for s in result.segments]
            panels.append((title, overlay(big, _panoptic(result.id_map, segments, id2label, things, scale),
                                          font_size=14)))
        path = folder / Path(name).with_suffix(".png").name
        side_by_side(panels).save(path)
        written.append(path)
    return written


def _keep_model(source: Path, target: Path, world_size: int) -> None:
    """Copy a trained model folder (without its checkpoints) to ``target``, with an image processor at the world's
    size (``from_pretrained`` / ``pipeline`` / ``app.py`` then see images as the model was trained and evaluated)."""
    from modeling_dearli import DearliConfig
    from modeling_dearli.image_processing_dearli import DearliImageProcessor

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    config = DearliConfig.from_pretrained(str(target))
    size = {"shortest_edge": world_size, "longest_edge": world_size}
    DearliImageProcessor.from_model_config(config, size=size).save_pretrained(str(target))


def run_demo(output_dir: str | Path, world_seed: int = 0, seed: int = 0, num_workers: int = 2,
             schedule: Schedule = DEMO, world_kwargs: dict[str, Any] | None = None,
             num_pictures: int = NUM_PICTURES) -> dict[str, Any]:
    """Train and evaluate the demo's rows (resumable like the reproduction), keep the models, write the pictures and
    the example images; returns the results with ``pictures`` and ``models`` added."""
    output_dir = Path(output_dir)
    results = reproduce(output_dir, world_seed=world_seed, seed=seed, num_workers=num_workers, schedule=schedule,
                        world_kwargs=world_kwargs, rows=DEMO_ROWS, clip_report=False)
    world_dir = output_dir / "world"
    size = json.loads((world_dir / "world.json").read_text())["config"]["settings"]["image_size"]
    cell = output_dir / "runs" / schedule.name / f"fraction_1_{round(1 / schedule.headline_fraction)}" / f"seed{seed}"
    models = {"supervised": output_dir / "supervised", "dearli": output_dir / "dearli"}
    logger.info("keeping the models in %s and %s", models["supervised"], models["dearli"])
    _keep_model(cell / "supervised" / "model", models["supervised"], size)
    _keep_model(cell / "dearli" / "model", models["dearli"], size)
    from .world import world_paths

    examples = output_dir / "examples"
    examples.mkdir(parents=True, exist_ok=True)
    val_images = sorted(world_paths(world_dir, "val")["images"].glob("*.jpg"))
    for path in val_images[:NUM_EXAMPLES]:
        shutil.copy2(path, examples / path.name)
    results["pictures"] = [str(p) for p in _pictures(output_dir, world_dir, models["supervised"], models["dearli"],
                                                     results, num_pictures)]
    results["models"] = {k: str(v) for k, v in models.items()}
    results["fraction"] = fraction_key(schedule.headline_fraction)
    return results
