"""The folder of class-agnostic masks (SAM's or an unsupervised algorithm's) for the decoder warm-up (DeWa, paper
Sec. 3.3): one record per image, all masks as COCO RLE, in parquet shards that `datasets` reads directly::

    {image_id: str, file_name: str, height: int, width: int, num_masks: int,
     masks: [{segmentation: {size: [h, w], counts: str}, area: int, bbox: [x, y, w, h],
              predicted_iou: float, stability_score: float}, ...]}

Layout::

    mask_config.json                generator settings that change the masks (a rerun with other settings is refused;
                                    folders written earlier name it sam_config.json, which is still read)
    shard-r{rank:03d}-{seq:06d}.parquet   finished shards (written to ``*.tmp`` first, then atomically renamed)
    failures-r{rank:03d}.jsonl      unreadable images, one JSON line each (image_id, file_name, error)
    manifest.json                   index rewritten at the end of each run: shards, image / mask / failure counts
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "mask_config.json"
# The settings file's name in folders written by earlier releases (read, never written).
EARLIER_CONFIG_FILE = "sam_config.json"
MANIFEST_FILE = "manifest.json"
SHARD_GLOB = "shard-*.parquet"
FAILURES_GLOB = "failures-*.jsonl"
# Share of corrupt lines above which a failures log is refused rather than read around.
MAX_CORRUPT_LOG_SHARE = 0.5
_SHARD_RE = re.compile(r"^shard-r(\d{3,})-(\d{6,})\.parquet$")


def config_path(output_dir: PathLike) -> Path:
    """The settings file of `output_dir`: ``mask_config.json``, or the earlier name where only that exists."""
    output_dir = Path(output_dir)
    earlier = output_dir / EARLIER_CONFIG_FILE
    return earlier if earlier.is_file() and not (output_dir / CONFIG_FILE).is_file() else output_dir / CONFIG_FILE


_MASK_TYPE = pa.struct(
    [
        ("segmentation", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.float32())),  # XYWH, pixels
        ("predicted_iou", pa.float32()),
        ("stability_score", pa.float32()),
    ]
)
MASKS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_masks", pa.int32()),
        ("masks", pa.list_(_MASK_TYPE)),
    ]
)


def make_record(item: Any, height: int, width: int, annotations: list[dict[str, Any]]) -> dict[str, Any]:
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


def write_shard(records: list[dict[str, Any]], path: Path) -> None:
    """Write `records` to `path` atomically: a temporary file first, then a rename."""
    table = pa.Table.from_pylist(records, schema=MASKS_SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def shard_files(output_dir: PathLike) -> list[Path]:
    """Finished shards in `output_dir`, sorted."""
    return sorted(Path(output_dir).glob(SHARD_GLOB))


def done_ids(output_dir: Path) -> set[str]:
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


def append_failure(path: Path, failure: dict[str, Any]) -> None:
    """Append one record, first ending an interrupted last line so that the new record stays readable."""
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(failure) + "\n").encode())


def failed_ids(output_dir: Path) -> set[str]:
    return {record["image_id"] for path in sorted(output_dir.glob(FAILURES_GLOB)) for record in _read_failures(path)}


def next_shard_index(output_dir: Path, rank: int) -> int:
    matches = [_SHARD_RE.match(p.name) for p in shard_files(output_dir)]
    indices = [int(m.group(2)) for m in matches if m is not None and int(m.group(1)) == rank]
    return max(indices, default=-1) + 1


def check_config(output_dir: Path, config: Any, write: bool) -> None:
    path = config_path(output_dir)
    identity = config.identity()
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != identity:
            changed = {k: (existing.get(k), v) for k, v in identity.items() if existing.get(k) != v}
            raise ValueError(
                f"{output_dir} holds masks made with other settings {changed} (old, new); "
                "use another --output-dir or the same settings"
            )
    elif write:
        write_json_atomic(identity, output_dir / CONFIG_FILE)


def write_manifest(output_dir: PathLike) -> dict[str, Any]:
    """Rescan `output_dir` and write ``manifest.json``: shards with image and mask counts, failures."""
    output_dir = Path(output_dir)
    shards = []
    for path in shard_files(output_dir):
        counts = pq.read_table(path, columns=["num_masks"]).column("num_masks").to_pylist()
        shards.append({"file": path.name, "num_images": len(counts), "num_masks": int(sum(counts))})
    failed = failed_ids(output_dir) - done_ids(output_dir)
    settings = config_path(output_dir)
    manifest = {
        "format": "dearli-sam-masks/1",
        "config": json.loads(settings.read_text()) if settings.is_file() else None,
        "num_images": sum(s["num_images"] for s in shards),
        "num_masks": sum(s["num_masks"] for s in shards),
        "num_failed": len(failed),
        "failed_image_ids": sorted(failed),
        "shards": shards,
    }
    write_json_atomic(manifest, output_dir / MANIFEST_FILE)
    return manifest
