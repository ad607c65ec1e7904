"""Generation of class-agnostic masks into a :mod:`training.data.mask_shards` folder: SAM's automatic mask generator
(or any generator with its interface, e.g. `training.data.unsupervised_masks.FelzenszwalbMaskGenerator`) over an image
source (a folder, a list of paths or a 🤗 `datasets.Dataset`).

A rerun skips the images found in finished shards (and, unless ``retry_failed``, the recorded failures), so an
interrupted run loses at most the shard it was filling. Under ``accelerate launch`` process ``i`` of ``n`` handles
images ``i::n`` and writes its own shard names.

Memory: SAM encodes masks to RLE per point batch (``output_mode="coco_rle"``), so a record never holds dense masks; the
peak is one point batch of ``3 * points_per_batch`` float mask logits at the original image size (lower
``points_per_batch`` for very large images). Finished records are flushed every ``shard_size`` images.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from modeling_dearli.image_reading import read_image

from .hub_datasets import image_keys, read_row_image
from .image_files import IMAGE_EXTENSIONS, is_file_entry
from .mask_shards import (
    append_failure,
    check_config,
    done_ids,
    failed_ids,
    make_record,
    next_shard_index,
    write_manifest,
    write_shard,
)
from .sam_models import SamGeneratorConfig, build_sam

if TYPE_CHECKING:
    import datasets
    from accelerate import PartialState

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

ImageSource = Union[PathLike, Sequence[PathLike], "datasets.Dataset"]


@dataclass
class GenerationStats:
    """Counts of one `generate_sam_masks` call (summed over processes; seconds = slowest process)."""

    num_images: int = 0  # images processed in this run
    num_masks: int = 0
    num_failed: int = 0  # unreadable images in this run
    num_skipped: int = 0  # images already done (or failed) in earlier runs
    seconds: float = 0.0  # generation wall time, model loading excluded

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else 0.0

    @property
    def masks_per_second(self) -> float:
        return self.num_masks / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def merge(cls, parts: Sequence["GenerationStats"]) -> "GenerationStats":
        return cls(
            num_images=sum(p.num_images for p in parts),
            num_masks=sum(p.num_masks for p in parts),
            num_failed=sum(p.num_failed for p in parts),
            num_skipped=sum(p.num_skipped for p in parts),
            seconds=max((p.seconds for p in parts), default=0.0),
        )


@dataclass(frozen=True)
class ImageItem:
    """One image to process: its id, its file name (may be empty) and a loader returning a PIL image."""

    image_id: str
    file_name: str
    load: Callable[[], Image.Image]


def list_image_items(
    source: ImageSource, *, image_column: str = "image", id_column: str | None = None, exif_transpose: bool = True
) -> list[ImageItem]:
    """Enumerate `source` in a deterministic order; each item's ``load()`` reads its image as 8-bit RGB with the
    project's reader (:func:`modeling_dearli.image_reading.read_image`, EXIF orientation applied if `exif_transpose`).

    - a folder: every image file below it (sorted); id = relative path without extension (the file stem for a flat
      folder, e.g. COCO's ``000000139``), file_name = relative path;
    - a list of paths: id = file stem, file_name = the path as given;
    - a `datasets.Dataset` (e.g. :func:`training.data.hub_datasets.load_image_split`): images from `image_column`
      (:func:`~training.data.hub_datasets.read_row_image`); id from `id_column`
      (:func:`~training.data.hub_datasets.image_keys`: default ``image_id`` or ``id`` when present, else the row
      index), file_name from a ``file_name`` column when present.
    Raises ValueError on duplicate ids.
    """
    items: list[ImageItem] = []
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise NotADirectoryError(f"Image folder {root} does not exist")
        # Broken links too: reading them fails and names them.
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and is_file_entry(p))
        for path in files:
            rel = path.relative_to(root)
            load = partial(read_image, path, exif_transpose=exif_transpose)
            items.append(ImageItem(rel.with_suffix("").as_posix(), rel.as_posix(), load))
    elif hasattr(source, "column_names") and hasattr(source, "select_columns"):
        dataset = source
        if image_column not in dataset.column_names:
            raise ValueError(f"Dataset has no image column {image_column!r} (columns: {dataset.column_names})")
        ids = image_keys(dataset, id_column)
        names = [str(v) for v in dataset["file_name"]] if "file_name" in dataset.column_names else [""] * len(ids)
        images = dataset.select_columns([image_column])
        items = [
            ImageItem(image_id, name, partial(read_row_image, images, i, image_column, exif_transpose))
            for i, (image_id, name) in enumerate(zip(ids, names))
        ]
    else:
        for p in source:
            path = Path(p)
            items.append(ImageItem(path.stem, str(p), partial(read_image, path, exif_transpose=exif_transpose)))
    counts: dict[str, int] = {}
    for item in items:
        counts[item.image_id] = counts.get(item.image_id, 0) + 1
    duplicates = [image_id for image_id, n in counts.items() if n > 1]
    if duplicates:
        raise ValueError(f"Duplicate image ids in the source: {sorted(duplicates)[:5]}")
    return items


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"Empty image of shape {array.shape}")
    return array


def generate_masks(
    source: ImageSource,
    output_dir: PathLike,
    sam_checkpoint: PathLike | None = None,
    *,
    config: SamGeneratorConfig | None = None,
    model: Sam | None = None,
    mask_generator: Any = None,
    device: str | torch.device | None = None,
    shard_size: int = 100,
    process_index: int | None = None,
    num_processes: int | None = None,
    retry_failed: bool = False,
    max_images: int | None = None,
    image_column: str = "image",
    id_column: str | None = None,
    exif_transpose: bool = True,
    progress: bool = True,
) -> GenerationStats:
    """Run SAM's automatic mask generator over `source` and write parquet shards to `output_dir` (resumable).

    Args:
        source: a folder, a list of image paths or a `datasets.Dataset` (see `list_image_items`).
        output_dir: output folder (created); a rerun skips the images already there.
        sam_checkpoint: SAM state dict for ``config.model_type`` (required unless `model` is given).
        config: generator settings, default the reference ones (vit_h, 32 points per side, 0.88 / 0.95).
        model: an already built SAM (then `sam_checkpoint` is not read).
        mask_generator: another mask source with SAM's interface instead of SAM: ``generate(uint8 RGB image)`` ->
            ``coco_rle`` annotations, and a ``config`` with ``identity()`` (e.g.
            `training.data.unsupervised_masks.FelzenszwalbMaskGenerator`); `config`, `model` and `sam_checkpoint` are
            then not used.
        device: where SAM runs; default the Accelerate device of this process.
        shard_size: images per shard; an interruption loses at most this many.
        process_index, num_processes: this process' share ``items[process_index::num_processes]``; default from
            Accelerate (``accelerate launch``), 0 / 1 for a plain run.
        retry_failed: process images recorded as unreadable again.
        max_images: process at most this many new images in this process (for quick measurements).
        image_column, id_column: columns of a `datasets.Dataset` source.
        exif_transpose: apply the EXIF orientation (as datasets' Image feature does) before SAM.
        progress: show a tqdm bar (images/s) on the local main process.

    Returns:
        `GenerationStats` summed over processes.
    """
    config = config or SamGeneratorConfig()
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    state = None
    if process_index is None or num_processes is None:
        state = _accelerate_state(device)
        process_index, num_processes = state.process_index, state.num_processes
    rank, world = int(process_index), int(num_processes)
    if not 0 <= rank < world:
        raise ValueError(f"process_index {rank} outside 0..{world - 1}")
    is_main = rank == 0
    local_main = state.is_local_main_process if state is not None else True

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_config(output_dir, config if mask_generator is None else mask_generator.config, write=is_main)
    if is_main:  # leftovers of interrupted shard writes
        for tmp in output_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
    if state is not None and world > 1:
        state.wait_for_everyone()

    items = list_image_items(source, image_column=image_column, id_column=id_column,
                             exif_transpose=exif_transpose)[rank::world]
    skip = done_ids(output_dir) | (set() if retry_failed else failed_ids(output_dir))
    todo = [item for item in items if item.image_id not in skip]
    stats = GenerationStats(num_skipped=len(items) - len(todo))
    if max_images is not None:
        todo = todo[:max_images]
    logger.info(
        "masks, process %d/%d: %d images, %d already done, %d to do",
        rank,
        world,
        len(items),
        stats.num_skipped,
        len(todo),
    )

    if todo:
        if mask_generator is not None:
            generator = mask_generator
        else:
            if device is None:
                device = state.device if state is not None else "cpu"
            if model is None:
                model = build_sam(config.model_type, sam_checkpoint, device)  # type: ignore[arg-type]
            else:
                model = model.to(device).eval()
            generator = SamAutomaticMaskGenerator(model, **config.generator_kwargs())
        _run(generator, todo, output_dir, rank, shard_size, stats, progress and local_main)

    if state is not None and world > 1:
        from accelerate.utils import gather_object

        stats = GenerationStats.merge(gather_object([stats]))
        state.wait_for_everyone()
    if is_main:
        manifest = write_manifest(output_dir)
        logger.info(
            "masks in %s: %d images, %d masks, %d unreadable",
            output_dir,
            manifest["num_images"],
            manifest["num_masks"],
            manifest["num_failed"],
        )
    return stats


def _accelerate_state(device: str | torch.device | None) -> "PartialState":
    """Accelerate's process state; CPU runs under torchrun / ``accelerate launch`` get a gloo group too."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState only builds a CPU process group when asked for the CPU (AcceleratorState reads this flag itself).
    cpu = (
        parse_flag_from_env("ACCELERATE_USE_CPU")
        or (device is not None and torch.device(device).type == "cpu")
        or not torch.cuda.is_available()
    )
    state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(
            f"Launched {launched} processes but Accelerate sees {state.num_processes}; every process would "
            "redo the same images. Initialise Accelerate for this device before calling generate_masks."
        )
    return state


def _run(
    generator: SamAutomaticMaskGenerator,
    todo: list[ImageItem],
    output_dir: Path,
    rank: int,
    shard_size: int,
    stats: GenerationStats,
    show_progress: bool,
) -> None:
    """The generation loop of one process: read, run SAM, buffer records, flush shards."""
    shard_index = next_shard_index(output_dir, rank)
    failures_path = output_dir / f"failures-r{rank:03d}.jsonl"
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal buffer, shard_index
        if buffer:
            write_shard(buffer, output_dir / f"shard-r{rank:03d}-{shard_index:06d}.parquet")
            shard_index += 1
            buffer = []

    start = time.perf_counter()
    bar = tqdm(todo, desc=f"masks [{rank}]", unit="img", disable=not show_progress, dynamic_ncols=True)
    for item in bar:
        try:
            image = _to_rgb_array(item.load())
        except Exception as error:  # unreadable image: log, record, skip
            logger.warning("Skipping unreadable image %s (%s): %r", item.image_id, item.file_name, error)
            append_failure(
                failures_path, {"image_id": item.image_id, "file_name": item.file_name, "error": repr(error)}
            )
            stats.num_failed += 1
            continue
        annotations = generator.generate(image)
        buffer.append(make_record(item, image.shape[0], image.shape[1], annotations))
        del image, annotations
        stats.num_images += 1
        stats.num_masks += buffer[-1]["num_masks"]
        if len(buffer) >= shard_size:
            flush()
        elapsed = time.perf_counter() - start
        bar.set_postfix(masks=stats.num_masks, masks_per_s=f"{stats.num_masks / max(elapsed, 1e-9):.1f}", refresh=False)
    flush()
    bar.close()
    stats.seconds = time.perf_counter() - start
