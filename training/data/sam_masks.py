"""Class-agnostic SAM pseudo-labels for the decoder warm-up (DeWa, paper Sec. 3.3).

`generate_sam_masks` runs segment_anything's `SamAutomaticMaskGenerator` over an image source (a folder, a list of
paths or a 🤗 `datasets.Dataset`) and stores one record per image, all masks as COCO RLE, in parquet shards that
`datasets` reads directly::

    {image_id: str, file_name: str, height: int, width: int, num_masks: int,
     masks: [{segmentation: {size: [h, w], counts: str}, area: int, bbox: [x, y, w, h],
              predicted_iou: float, stability_score: float}, ...]}

Output folder layout::

    sam_config.json                 generator settings that change the masks (a rerun with other settings is refused)
    shard-r{rank:03d}-{seq:06d}.parquet   finished shards (written to ``*.tmp`` first, then atomically renamed)
    failures-r{rank:03d}.jsonl      unreadable images, one JSON line each (image_id, file_name, error)
    manifest.json                   index rewritten at the end of each run: shards, image / mask / failure counts

A rerun skips the images found in finished shards (and, unless ``retry_failed``, the recorded failures), so an
interrupted run loses at most the shard it was filling. Under ``accelerate launch`` process ``i`` of ``n`` handles
images ``i::n`` and writes its own shard names.

Memory: SAM encodes masks to RLE per point batch (``output_mode="coco_rle"``), so a record never holds dense masks; the
peak is one point batch of ``3 * points_per_batch`` float mask logits at the original image size (lower
``points_per_batch`` for very large images). Finished records are flushed every ``shard_size`` images.

`load_sam_masks` opens the output as a `datasets.Dataset`; `sam_masks_to_targets` turns one record into the
class-agnostic Mask2Former targets of DeWa: every SAM mask is one target of the single class 0, overlaps allowed,
no area filter (as the reference implementation does).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from tqdm.auto import tqdm

from modeling_dearli.image_reading import read_image, to_rgb

from .image_files import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import datasets
    from accelerate import PartialState

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
ImageSource = Union[PathLike, Sequence[PathLike], "datasets.Dataset"]

CONFIG_FILE = "sam_config.json"
MANIFEST_FILE = "manifest.json"
SHARD_GLOB = "shard-*.parquet"
FAILURES_GLOB = "failures-*.jsonl"
# Share of corrupt lines above which a failures log is refused rather than read around.
MAX_CORRUPT_LOG_SHARE = 0.5
_SHARD_RE = re.compile(r"^shard-r(\d{3,})-(\d{6,})\.parquet$")

# --------------------------------------------------------------------------------------------------------------------
# Model registry
# --------------------------------------------------------------------------------------------------------------------


def build_sam_vit_tiny(checkpoint: None = None) -> Sam:
    """A tiny SAM for tests only (about 0.2 M parameters, 256-pixel input): same classes as the real models.

    segment_anything's ViT-B takes ~25-30 s per image on CPU, far too slow for tests. Like the real builders this
    returns a randomly initialised model; `build_sam` loads the checkpoint.
    """
    if checkpoint is not None:
        raise ValueError("build_sam_vit_tiny builds a random model; load weights with build_sam(..., checkpoint)")
    prompt_embed_dim, image_size, patch_size = 32, 256, 16
    image_embedding_size = image_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=prompt_embed_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=8,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_embed_dim, mlp_dim=64, num_heads=2),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


# Builders return randomly initialised models; the real ones are segment_anything's own.
SAM_MODEL_REGISTRY: dict[str, Callable[[], Sam]] = {
    "vit_h": partial(sam_model_registry["vit_h"], checkpoint=None),
    "vit_l": partial(sam_model_registry["vit_l"], checkpoint=None),
    "vit_b": partial(sam_model_registry["vit_b"], checkpoint=None),
    "vit_tiny": build_sam_vit_tiny,  # tests only
}


def build_sam(model_type: str, checkpoint: PathLike, device: str | torch.device = "cpu") -> Sam:
    """Build a SAM of `model_type` and load its `checkpoint` (a state dict file; nothing is ever downloaded).

    Unlike segment_anything's builders this loads with ``weights_only=True`` and ``map_location="cpu"``.
    """
    if model_type not in SAM_MODEL_REGISTRY:
        raise ValueError(f"Unknown SAM model type {model_type!r}; choose from {sorted(SAM_MODEL_REGISTRY)}")
    if checkpoint is None:
        raise ValueError("A SAM checkpoint path is required (nothing is downloaded)")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {path} not found. Download the official {model_type} checkpoint from the "
            "segment-anything repository yourself; this tool downloads nothing."
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable or non-weights file
        raise ValueError(f"cannot read SAM checkpoint {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"SAM checkpoint {path} holds a {type(state_dict).__name__}, not a state dict")
    sam = SAM_MODEL_REGISTRY[model_type]()
    expected = sam.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        example = (f"{reshaped[0]}: {tuple(state_dict[reshaped[0]].shape)} in the file, "
                   f"{tuple(expected[reshaped[0]].shape)} in {model_type}" if reshaped else (missing or unexpected)[0])
        raise ValueError(f"SAM checkpoint {path} does not fit --model_type {model_type}: {len(missing)} tensors "
                         f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape (e.g. {example}); "
                         f"pass the model type the checkpoint was made for ({', '.join(sorted(SAM_MODEL_REGISTRY))})")
    sam.load_state_dict(state_dict)
    return sam.to(device).eval()


# --------------------------------------------------------------------------------------------------------------------
# Generator settings and run statistics
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SamGeneratorConfig:
    """Settings of `SamAutomaticMaskGenerator`; the defaults are the reference ones (SAM's own, ViT-H)."""

    model_type: str = "vit_h"
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0  # > 0 needs opencv

    def generator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `SamAutomaticMaskGenerator` (masks as COCO RLE)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model_type"}
        return {**kwargs, "output_mode": "coco_rle"}

    def identity(self) -> dict[str, Any]:
        """The settings that change the masks (everything but ``points_per_batch``)."""
        return {k: v for k, v in asdict(self).items() if k != "points_per_batch"}


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


# --------------------------------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    """One image to process: its id, its file name (may be empty) and a loader returning a PIL image."""

    image_id: str
    file_name: str
    load: Callable[[], Image.Image]


def _load_dataset_image(dataset: "datasets.Dataset", index: int, column: str, exif_transpose: bool) -> Image.Image:
    value = dataset[index][column]
    if isinstance(value, Image.Image):  # decoded by datasets (which applies the EXIF orientation itself)
        return to_rgb(value)
    if isinstance(value, dict):  # an Image feature with decode=False
        source = value["bytes"] if value.get("bytes") else Path(value["path"])
        return read_image(source, exif_transpose=exif_transpose)
    return to_rgb(Image.fromarray(np.asarray(value)))


def list_image_items(
    source: ImageSource, *, image_column: str = "image", id_column: str | None = None, exif_transpose: bool = True
) -> list[ImageItem]:
    """Enumerate `source` in a deterministic order; each item's ``load()`` reads its image as 8-bit RGB with the
    project's reader (:func:`modeling_dearli.image_reading.read_image`, EXIF orientation applied if `exif_transpose`).

    - a folder: every image file below it (sorted); id = relative path without extension (the file stem for a flat
      folder, e.g. COCO's ``000000139``), file_name = relative path;
    - a list of paths: id = file stem, file_name = the path as given;
    - a `datasets.Dataset`: images from `image_column`; id from `id_column` (default: ``image_id`` or ``id`` when
      present, else the row index), file_name from a ``file_name`` column when present.
    Raises ValueError on duplicate ids.
    """
    items: list[ImageItem] = []
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise NotADirectoryError(f"Image folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        for path in files:
            rel = path.relative_to(root)
            load = partial(read_image, path, exif_transpose=exif_transpose)
            items.append(ImageItem(rel.with_suffix("").as_posix(), rel.as_posix(), load))
    elif hasattr(source, "column_names") and hasattr(source, "select_columns"):
        dataset = source
        if image_column not in dataset.column_names:
            raise ValueError(f"Dataset has no image column {image_column!r} (columns: {dataset.column_names})")
        if id_column is None:
            id_column = next((c for c in ("image_id", "id") if c in dataset.column_names), None)
        ids = [str(v) for v in dataset[id_column]] if id_column else [str(i) for i in range(len(dataset))]
        names = [str(v) for v in dataset["file_name"]] if "file_name" in dataset.column_names else [""] * len(ids)
        images = dataset.select_columns([image_column])
        items = [
            ImageItem(image_id, name, partial(_load_dataset_image, images, i, image_column, exif_transpose))
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


# --------------------------------------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------------------------------------

_MASK_TYPE = pa.struct(
    [
        ("segmentation", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.float32())),  # XYWH, pixels
        ("predicted_iou", pa.float32()),
        ("stability_score", pa.float32()),
    ]
)
SAM_MASKS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_masks", pa.int32()),
        ("masks", pa.list_(_MASK_TYPE)),
    ]
)


def _make_record(item: ImageItem, height: int, width: int, annotations: list[dict[str, Any]]) -> dict[str, Any]:
    masks = [
        {
            "segmentation": {"size": list(a["segmentation"]["size"]), "counts": a["segmentation"]["counts"]},
            "area": int(a["area"]),
            "bbox": [float(v) for v in a["bbox"]],
            "predicted_iou": float(a["predicted_iou"]),
            "stability_score": float(a["stability_score"]),
        }
        for a in annotations
    ]
    return {
        "image_id": item.image_id,
        "file_name": item.file_name,
        "height": height,
        "width": width,
        "num_masks": len(masks),
        "masks": masks,
    }


def _write_shard(records: list[dict[str, Any]], path: Path) -> None:
    """Write `records` to `path` atomically: a temporary file first, then a rename."""
    table = pa.Table.from_pylist(records, schema=SAM_MASKS_SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def shard_files(output_dir: PathLike) -> list[Path]:
    """Finished shards in `output_dir`, sorted."""
    return sorted(Path(output_dir).glob(SHARD_GLOB))


def _done_ids(output_dir: Path) -> set[str]:
    done: set[str] = set()
    for path in shard_files(output_dir):
        done.update(pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist())
    return done


def _read_failures(path: Path) -> list[dict[str, Any]]:
    """The records of a failures log. A line that is not a JSON record with an ``image_id`` is skipped with a warning
    naming the file and line (its image is simply retried); an unterminated last line is the trace of an interrupted
    write (not counted). More than :data:`MAX_CORRUPT_LOG_SHARE` of the other lines corrupt: ``ValueError`` (not a
    failures log)."""
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records, corrupt = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            record, problem = None, str(error)
        else:
            problem = "not a record with an image_id"
        if not isinstance(record, dict) or not isinstance(record.get("image_id"), str):
            interrupted = number == len(lines) and not text.endswith("\n")
            if not interrupted:  # an interrupted last line is the expected trace of a killed run: not counted
                corrupt.append(number)
            logger.warning("%s:%d: skipping a corrupt line%s (%s); its image will be retried", path, number,
                           " (an interrupted write)" if interrupted else "", problem)
            continue
        records.append(record)
    if corrupt and len(corrupt) > MAX_CORRUPT_LOG_SHARE * (len(corrupt) + len(records)):
        raise ValueError(f"{path}: {len(corrupt)} of {len(corrupt) + len(records)} lines are corrupt (lines "
                         f"{corrupt[:5]}): not a failures log of this tool; remove it to retry those images")
    return records


def _append_failure(path: Path, failure: dict[str, Any]) -> None:
    """Append one record, first ending an interrupted last line so that the new record stays readable."""
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(failure) + "\n").encode())


def _failed_ids(output_dir: Path) -> set[str]:
    return {record["image_id"] for path in sorted(output_dir.glob(FAILURES_GLOB)) for record in _read_failures(path)}


def _next_shard_index(output_dir: Path, rank: int) -> int:
    matches = [_SHARD_RE.match(p.name) for p in shard_files(output_dir)]
    indices = [int(m.group(2)) for m in matches if m is not None and int(m.group(1)) == rank]
    return max(indices, default=-1) + 1


def _check_config(output_dir: Path, config: Any, write: bool) -> None:
    path = output_dir / CONFIG_FILE
    identity = config.identity()
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != identity:
            changed = {k: (existing.get(k), v) for k, v in identity.items() if existing.get(k) != v}
            raise ValueError(
                f"{output_dir} holds SAM masks made with other settings {changed} (old, new); "
                "use another --output-dir or the same settings"
            )
    elif write:
        _write_json_atomic(identity, path)


def write_manifest(output_dir: PathLike) -> dict[str, Any]:
    """Rescan `output_dir` and write ``manifest.json``: shards with image and mask counts, failures."""
    output_dir = Path(output_dir)
    shards = []
    for path in shard_files(output_dir):
        counts = pq.read_table(path, columns=["num_masks"]).column("num_masks").to_pylist()
        shards.append({"file": path.name, "num_images": len(counts), "num_masks": int(sum(counts))})
    failed = _failed_ids(output_dir) - _done_ids(output_dir)
    config_path = output_dir / CONFIG_FILE
    manifest = {
        "format": "dearli-sam-masks/1",
        "config": json.loads(config_path.read_text()) if config_path.is_file() else None,
        "num_images": sum(s["num_images"] for s in shards),
        "num_masks": sum(s["num_masks"] for s in shards),
        "num_failed": len(failed),
        "failed_image_ids": sorted(failed),
        "shards": shards,
    }
    _write_json_atomic(manifest, output_dir / MANIFEST_FILE)
    return manifest


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


def generate_sam_masks(
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
    _check_config(output_dir, config if mask_generator is None else mask_generator.config, write=is_main)
    if is_main:  # leftovers of interrupted shard writes
        for tmp in output_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
    if state is not None and world > 1:
        state.wait_for_everyone()

    items = list_image_items(source, image_column=image_column, id_column=id_column,
                             exif_transpose=exif_transpose)[rank::world]
    skip = _done_ids(output_dir) | (set() if retry_failed else _failed_ids(output_dir))
    todo = [item for item in items if item.image_id not in skip]
    stats = GenerationStats(num_skipped=len(items) - len(todo))
    if max_images is not None:
        todo = todo[:max_images]
    logger.info(
        "SAM masks, process %d/%d: %d images, %d already done, %d to do",
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
            "SAM masks in %s: %d images, %d masks, %d unreadable",
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
            "redo the same images. Initialise Accelerate for this device before calling generate_sam_masks."
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
    shard_index = _next_shard_index(output_dir, rank)
    failures_path = output_dir / f"failures-r{rank:03d}.jsonl"
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal buffer, shard_index
        if buffer:
            _write_shard(buffer, output_dir / f"shard-r{rank:03d}-{shard_index:06d}.parquet")
            shard_index += 1
            buffer = []

    start = time.perf_counter()
    bar = tqdm(todo, desc=f"SAM masks [{rank}]", unit="img", disable=not show_progress, dynamic_ncols=True)
    for item in bar:
        try:
            image = _to_rgb_array(item.load())
        except Exception as error:  # unreadable image: log, record, skip
            logger.warning("Skipping unreadable image %s (%s): %r", item.image_id, item.file_name, error)
            _append_failure(failures_path, {"image_id": item.image_id, "file_name": item.file_name, "error": repr(error)})
            stats.num_failed += 1
            continue
        annotations = generator.generate(image)
        buffer.append(_make_record(item, image.shape[0], image.shape[1], annotations))
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


# --------------------------------------------------------------------------------------------------------------------
# Reading: datasets + targets
# --------------------------------------------------------------------------------------------------------------------


def load_sam_masks(output_dir: PathLike, cache_dir: PathLike | None = None) -> "datasets.Dataset":
    """The SAM masks in `output_dir` as a `datasets.Dataset` (one row per image, finished shards only).

    Equivalent to ``datasets.load_dataset("parquet", data_files=<the shards>, split="train")``.
    Raises ValueError if an image id occurs twice.
    """
    import datasets

    files = shard_files(output_dir)
    if not files:
        features = datasets.Features.from_arrow_schema(SAM_MASKS_SCHEMA)
        return datasets.Dataset.from_dict({name: [] for name in SAM_MASKS_SCHEMA.names}, features=features)
    dataset = datasets.load_dataset(
        "parquet",
        data_files=[str(f) for f in files],
        split="train",
        cache_dir=None if cache_dir is None else str(cache_dir),
    )
    ids = dataset["image_id"]
    if len(set(ids)) != len(dataset):
        raise ValueError(f"Duplicate image ids in {output_dir}: was it written by two runs at once?")
    return dataset


def sam_masks_index(dataset: "datasets.Dataset") -> dict[str, int]:
    """Map image_id -> row of a `load_sam_masks` dataset (to join it with an image dataset)."""
    return {image_id: row for row, image_id in enumerate(dataset["image_id"])}


def decode_sam_masks(record: Mapping[str, Any]) -> np.ndarray:
    """Decode a record's RLE masks with pycocotools: uint8 array (n, height, width) of 0/1."""
    height, width = int(record["height"]), int(record["width"])
    rles = [
        {"size": [int(s) for s in m["segmentation"]["size"]], "counts": m["segmentation"]["counts"]}
        for m in record["masks"]
    ]
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    with warnings.catch_warnings():
        # pycocotools (2.0.11) calls np.array(copy=False) on its own mask type, whose __array__ lacks numpy 2's `copy`
        # keyword: "DeprecationWarning: __array__ implementation doesn't accept a copy keyword" on every call.
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        dense = mask_utils.decode(rles)  # (H, W, n), Fortran order
    if dense.shape[:2] != (height, width):
        raise ValueError(f"RLE size {dense.shape[:2]} differs from the record's image size {(height, width)}")
    return np.ascontiguousarray(dense.transpose(2, 0, 1))


def sam_masks_to_targets(
    record: Mapping[str, Any],
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    size: tuple[int, int] | None = None,
    drop_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic Mask2Former targets of one SAM record (paper Sec. 3.3, DeWa).

    Every SAM mask becomes one target of the single class 0; overlaps are allowed and there is no area filter.

    Args:
        record: a row of `load_sam_masks` (or any dict with height, width and masks[*].segmentation RLEs).
        transform: geometric hook applied to the uint8 masks (n, H, W) at image size, e.g. the resize + crop applied
            to the image; must keep the first dimension.
        size: finally resize to (height, width) with nearest-neighbour interpolation.
        drop_empty: drop masks left without any pixel (e.g. cropped away); masks of any positive area are kept.

    Returns:
        mask_labels: float32 (n, H, W) of 0/1; class_labels: int64 zeros (n,).
    """
    masks = torch.from_numpy(decode_sam_masks(record))
    if transform is not None:
        masks = transform(masks)
    if size is not None and tuple(masks.shape[-2:]) != tuple(size):
        masks = torch.nn.functional.interpolate(masks[None].float(), size=tuple(size), mode="nearest")[0]
    masks = masks.float()
    if drop_empty and len(masks):
        masks = masks[masks.flatten(1).any(dim=1)]
    return masks, torch.zeros(len(masks), dtype=torch.long)
