"""Panoptic datasets in the 🤗 datasets layout: read one from the Hub or a local folder (``datasets.load_dataset`` /
``load_from_disk``) into the rows of :mod:`training.data.panoptic_datasets`, and write one (parquet shards with
``Image`` features, a categories file and a dataset card: a folder ready for the Hub). Only the splits asked for are
read. A split read for its images only (:func:`load_image_split`, its rows keyed by :func:`image_keys`) is the source
of the class-agnostic masks and of DeWa.

A split is a table with one row per image and the columns (names configurable, see :class:`DatasetColumns`)

* the image (``datasets.Image``, default column ``image``),
* the panoptic PNG: segment ids RGB-encoded as in COCO panoptic, ``id = R + 256 G + 256² B``, 0 = void
  (``datasets.Image``, default ``panoptic``, or ``label`` when the dataset has no ``panoptic`` column),
* the segments of the PNG (default ``segments_info``): a list of ``{"id", "category_id"[, "iscrowd"]}`` (more keys
  such as ``area`` and ``bbox`` may be present; a JSON string of that list is accepted too),
* optionally ``image_id`` and ``file_name`` (default: the row's index and the image file's name, or the index),
  and the optional columns of :mod:`training.data.panoptic_datasets` (``semantic``, ``void_segment_id``).

The label space travels with the dataset as :data:`CATEGORIES_FILE` beside the data: a COCO ``categories`` list (or a
dict holding one under ``"categories"``) of ``{"id", "name", "isthing"}``, the name with its synonyms comma-separated
(``"zebra,zebras"``); ``isthing`` is the thing/stuff split. ``--class_names_file`` replaces it (the same JSON, or
``id:name,synonym,...`` lines whose thing flags come from the dataset's categories file). A dataset saved with
``save_to_disk`` by :func:`training.data.panoptic_datasets.load_coco_panoptic` also carries its label space in its
info.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modeling_dearli.image_reading import read_image, to_rgb
from training.data.class_names import (
    ClassNames,
    class_names_from_categories,
    read_categories_json,
    read_class_names,
)
from training.data.panoptic_datasets import dataset_class_names, panoptic_features
from training.data.panoptic_format import VOID_SEGMENT_COLUMN

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES_FILE",
    "DatasetColumns",
    "DatasetImages",
    "DatasetSourceError",
    "image_keys",
    "load_dataset_splits",
    "load_image_split",
    "looks_like_hub_id",
    "open_splits",
    "read_row_image",
    "to_panoptic_rows",
    "write_dataset_folder",
]

CATEGORIES_FILE = "categories.json"
PANOPTIC_COLUMN_FALLBACKS = ("panoptic", "label")
# Columns of training.data.panoptic_datasets' rows that are kept when present (ADE20K's semantic maps for mIoU,
# COCO-Objects' segment of the void pixels).
OPTIONAL_COLUMNS = ("semantic", VOID_SEGMENT_COLUMN)
# A Hub dataset id: "owner/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub dataset id, ``owner/name``."""
    return bool(_HUB_ID.match(name))


class DatasetSourceError(ValueError):
    """A 🤗 dataset that cannot be used: a missing split, column or label space (the message says which)."""


@dataclass(frozen=True)
class DatasetColumns:
    """Column names of a 🤗 panoptic dataset.

    Args:
        image: the image column.
        panoptic: the panoptic PNG column (``None``: ``panoptic``, else ``label``, whichever the dataset has).
        segments_info: the segments' list (``id``, ``category_id``, optional ``iscrowd``).
    """

    image: str = "image"
    panoptic: str | None = None
    segments_info: str = "segments_info"


def _is_saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _local_cache_dir(folder: Path) -> str:
    """A ``datasets`` cache folder of its own for the local dataset `folder` as it is now (its path and every file's
    name, size and modification time). ``datasets`` names the cache of a folder whose card lists its data files by
    pattern (``data/train-*``) after the folder's name and that card only, so another folder of the same name, or
    this one with new data, would read the first one's cached rows (measured with datasets 5.2)."""
    import hashlib

    import datasets

    listing = [str(folder.resolve())]
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            listing.append(f"{path.relative_to(folder).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "local_folders" / f"{folder.name}-{digest}")


def open_splits(
    name: str, splits: Sequence[str], config_name: str | None = None, required: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], list[str], Path | None]:
    """The `splits` of `name` (a ``save_to_disk`` folder, a folder ``load_dataset`` reads, or a Hub id) that it has,
    as ``{split: datasets.Dataset}``; only these are read (and prepared into the cache, one split at a time: a split
    nobody asks for is never opened). Also returns all of its split names and its local folder, if any.

    Args:
        name: a Hub dataset id or a local folder.
        splits: the split names wanted.
        config_name: the dataset's configuration (``load_dataset``'s second argument).
        required: ``{split: flag}``: splits that must exist; a missing one raises :class:`DatasetSourceError` naming
            the flag, before any split is read.
    """
    import datasets

    def check(available: list[str]) -> None:
        for split, flag in (required or {}).items():
            if split not in available:
                raise DatasetSourceError(f"{name} has no split {split!r} (splits: {', '.join(available)}): pass {flag}")

    folder = Path(name).expanduser()
    if folder.is_dir() and _is_saved_to_disk(folder):
        if (folder / "state.json").is_file():  # one Dataset: the split "train"
            check(["train"])
            return ({"train": datasets.load_from_disk(str(folder))} if "train" in splits else {}), ["train"], folder
        available = [str(s) for s in json.loads((folder / "dataset_dict.json").read_text())["splits"]]
        check(available)
        opened = {s: datasets.load_from_disk(str(folder / s)) for s in dict.fromkeys(splits) if s in available}
        return opened, available, folder
    if not folder.is_dir():
        if Path(name).exists():
            raise DatasetSourceError(f"{name} is a file, not a dataset folder or Hub id")
        if not looks_like_hub_id(name):
            raise DatasetSourceError(f"{name!r} is neither a local dataset folder nor a Hub dataset id ('owner/name')")
        folder = None
    path = str(folder) if folder is not None else name
    cache = {"cache_dir": _local_cache_dir(folder)} if folder is not None else {}
    builder = datasets.load_dataset_builder(path, config_name, **cache)
    files = builder.config.data_files
    available = list(files) if files else list(builder.info.splits or {})
    check(available)
    opened = {}
    for split in dict.fromkeys(splits):
        if split in available:
            # This split's files only: load_dataset prepares every split it is given files for.
            kwargs = {"data_files": {split: files[split]}} if files else {}
            opened[split] = datasets.load_dataset(path, config_name, split=split, **kwargs, **cache)
    return opened, available, folder


def load_image_split(
    name: str,
    split: str = "train",
    *,
    config_name: str | None = None,
    image_column: str = "image",
    split_flag: str = "--split",
) -> Any:
    """One split of a 🤗 dataset read for its images only (any other columns may be there or not): the class-agnostic
    masks' source (``scripts/generate_sam_masks.py``, ``training/dewa.py``). Only that split is read
    (:func:`open_splits`); a missing split or image column raises :class:`DatasetSourceError` naming the flag.

    Args:
        name: a Hub dataset id or a local folder (``save_to_disk`` output, or anything ``load_dataset`` reads).
        split: the split. An ``Image`` column comes undecoded: :func:`read_row_image` reads its files' bytes.
        config_name: the dataset's configuration.
        image_column: the image column (``datasets.Image`` or image paths / arrays).
        split_flag: the flag named when `split` is missing.
    """
    import datasets

    opened, _, _ = open_splits(name, [split], config_name, required={split: split_flag})
    ds = opened[split]
    if image_column not in ds.column_names:
        raise DatasetSourceError(f"{name} ({split}) has no column {image_column!r} (columns: "
                                 f"{', '.join(ds.column_names)}): pass --image_column")
    if isinstance(ds.features[image_column], datasets.Image):  # the file bytes: read by read_row_image
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def image_keys(ds: Any, id_column: str | None = None) -> list[str]:
    """The key of each row of an image dataset, as the class-agnostic mask shards name images (``image_id``): the
    `id_column` (default ``image_id``, else ``id``, when present), else the row number; all as strings."""
    if id_column is None:
        id_column = next((c for c in ("image_id", "id") if c in ds.column_names), None)
    elif id_column not in ds.column_names:
        raise DatasetSourceError(f"the dataset has no column {id_column!r} (columns: {', '.join(ds.column_names)}): "
                                 f"pass --id_column")
    return [str(v) for v in ds[id_column]] if id_column else [str(i) for i in range(len(ds))]


def read_row_image(ds: Any, index: int, image_column: str = "image", exif_transpose: bool = True) -> Image.Image:
    """The image of row `index` as 8-bit RGB with the project's reader
    (:func:`modeling_dearli.image_reading.read_image`, EXIF orientation applied if `exif_transpose`; an image decoded
    by ``datasets`` has it applied already). `ds` is best narrowed to the image column (``select_columns``), so that
    no other column is decoded. An unreadable image raises ``OSError``."""
    value = ds[index][image_column]
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):  # an Image feature with decode=False
        return read_image(value["bytes"] if value.get("bytes") else Path(value["path"]), exif_transpose=exif_transpose)
    if isinstance(value, (str, os.PathLike)):
        return read_image(Path(value), exif_transpose=exif_transpose)
    return to_rgb(Image.fromarray(np.asarray(value)))


class DatasetImages:
    """The images of a 🤗 dataset split looked up by the key the mask shards give them (:func:`image_keys`): DeWa's
    join of class-agnostic masks to the dataset's rows.

    Args:
        ds: the split (e.g. :func:`load_image_split`).
        image_column: its image column.
        id_column: the key column the masks were generated with (``None``: :func:`image_keys`' default).
        name: how errors and skip logs name the dataset.
    """

    def __init__(self, ds: Any, image_column: str = "image", id_column: str | None = None,
                 name: str = "the dataset") -> None:
        self.rows = {key: row for row, key in enumerate(image_keys(ds, id_column))}
        if len(self.rows) != len(ds):
            raise DatasetSourceError(f"{name}: image keys occur twice: pass --id_column with a unique column")
        self.images = ds.select_columns([image_column])
        self.image_column = image_column
        self.name = name

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def source(self, key: str) -> str:
        """Where the image of `key` is, for logs: ``<dataset> row <n>``."""
        return f"{self.name} row {self.rows[key]}"

    def read(self, key: str, exif_transpose: bool = True) -> Image.Image:
        """The image of `key` (:func:`read_row_image`)."""
        return read_row_image(self.images, self.rows[key], self.image_column, exif_transpose)


def _hub_categories(name: str) -> Path | None:
    """The Hub dataset's categories file, downloaded (``None`` when the repository has none)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(name, CATEGORIES_FILE, repo_type="dataset"))
    except EntryNotFoundError:
        return None


def _label_space(
    name: str, folder: Path | None, first_split: Any, class_names_file: str | os.PathLike[str] | None
) -> ClassNames:
    """The dataset's label space: `class_names_file`, else its categories file, else a label space saved in its info."""
    categories = None
    if folder is not None:
        categories = folder / CATEGORIES_FILE if (folder / CATEGORIES_FILE).is_file() else None
    elif class_names_file is None or not str(class_names_file).endswith(".json"):
        categories = _hub_categories(name)
    if class_names_file is not None:
        path = Path(class_names_file)
        if path.suffix == ".json":
            return class_names_from_categories(read_categories_json(path), str(path))
        if categories is None:
            raise DatasetSourceError(
                f"{name} has no {CATEGORIES_FILE} to tell things from stuff for the names of {path}: give the classes "
                f"as a COCO categories JSON ({{'id', 'name', 'isthing'}}) instead"
            )
        return read_class_names(path, categories_json=categories)
    if categories is not None:
        return class_names_from_categories(read_categories_json(categories), str(categories))
    saved = dataset_class_names(first_split)
    if saved is not None:
        return saved
    raise DatasetSourceError(
        f"{name} carries no label space: add a {CATEGORIES_FILE} ({{'id', 'name', 'isthing'}} per class) to it, or "
        f"pass --class_names_file"
    )


def _resolve_columns(ds: Any, columns: DatasetColumns, where: str) -> tuple[str, str, str]:
    present = list(ds.column_names)
    panoptic = columns.panoptic or next((c for c in PANOPTIC_COLUMN_FALLBACKS if c in present), "panoptic")
    for column, flag in ((columns.image, "--image_column"), (panoptic, "--panoptic_column"),
                         (columns.segments_info, "--segments_info_column")):
        if column not in present:
            raise DatasetSourceError(f"{where} has no column {column!r} (columns: {', '.join(present)}): pass {flag}")
    return columns.image, panoptic, columns.segments_info


def _file_names(ds: Any, image_column: str) -> list[str]:
    """The image file names of a split: its ``file_name`` column, else its images' file names, else row numbers."""
    if "file_name" in ds.column_names:
        return [str(f) for f in ds["file_name"]]
    column = ds.select_columns([image_column]).with_format("arrow")[image_column]
    try:  # the struct's "path" field only: the image bytes are not read
        chunks = column.chunks if hasattr(column, "chunks") else [column]
        paths = [p for chunk in chunks for p in chunk.field("path").to_pylist()]
    except (AttributeError, KeyError, ValueError, TypeError):
        paths = None
    if paths and all(paths) and len({Path(p).name for p in paths}) == len(paths):
        return [Path(p).name for p in paths]
    return [f"{i:08d}" for i in range(len(ds))]


def to_panoptic_rows(ds: Any, columns: DatasetColumns, class_names: ClassNames, where: str = "the dataset") -> Any:
    """A split in the 🤗 layout -> the rows of :mod:`training.data.panoptic_datasets` (``image``, ``panoptic``,
    ``image_id``, ``file_name``, ``segments_info`` with contiguous ``label`` and ``isthing``). Only the segments'
    column is rewritten; the images stay where they are (no copy of the image data)."""
    image, panoptic, segments_column = _resolve_columns(ds, columns, where)
    index = class_names.category_to_index
    rows = []
    for row_number, segments in enumerate(ds[segments_column]):
        if isinstance(segments, str):
            segments = json.loads(segments)
        converted = []
        for s in segments or []:
            if "id" not in s or "category_id" not in s:
                raise DatasetSourceError(f"{where}, row {row_number}: a segment needs 'id' and 'category_id', got "
                                         f"{sorted(s)}")
            category = int(s["category_id"])
            if category not in index:
                raise DatasetSourceError(f"{where}, row {row_number}: category_id {category} is not in the label space "
                                         f"({len(class_names)} classes, ids {list(class_names.category_ids)[:8]}...)")
            label = index[category]
            converted.append({
                "id": int(s["id"]), "category_id": category, "label": label, "iscrowd": int(s.get("iscrowd") or 0),
                "isthing": bool(class_names.is_thing[label]), "area": int(s.get("area") or 0),
                "bbox": [float(x) for x in (s.get("bbox") or [0, 0, 0, 0])],
            })
        rows.append(converted)
    has_ids = "image_id" in ds.column_names
    file_names = _file_names(ds, image)
    keep = [image, panoptic] + (["image_id"] if has_ids else [])
    keep += [c for c in OPTIONAL_COLUMNS if c in ds.column_names and c not in keep]
    out = ds.select_columns(keep)
    if image != "image" or panoptic != "panoptic":
        out = out.rename_columns({c: n for c, n in ((image, "image"), (panoptic, "panoptic")) if c != n})
    features = panoptic_features("string" if has_ids and out.features["image_id"].dtype == "string" else "int64")
    if not has_ids:
        out = out.add_column("image_id", list(range(len(out))), feature=features["image_id"])
    out = out.add_column("file_name", file_names, feature=features["file_name"])
    out = out.add_column("segments_info", rows, feature=features["segments_info"])
    return out


def load_dataset_splits(
    name: str,
    splits: Mapping[str, str | None],
    *,
    config_name: str | None = None,
    columns: DatasetColumns | None = None,
    class_names_file: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any | None], ClassNames]:
    """Splits of a 🤗 panoptic dataset as rows of :mod:`training.data.panoptic_datasets`, with its label space.

    Args:
        name: a Hub dataset id or a local folder (``save_to_disk`` output, or anything ``load_dataset`` reads).
        splits: ``{role: split}`` (e.g. ``{"train": "train", "validation": "validation"}``); a split of ``None``
            gives ``None``. The keys name the flags in errors (``--<role>_split``, or ``--<role>`` for a role ending
            in ``split``); a role ending in ``?`` is optional: ``None`` when the dataset lacks that split.
            Only these splits are read (:func:`open_splits`).
        config_name: the dataset's configuration (``load_dataset``'s second argument).
        columns: the column names (:class:`DatasetColumns`).
        class_names_file: replaces the dataset's label space (module docstring).
    """
    columns = columns or DatasetColumns()
    required = {split: f"--{role}" if role.endswith("split") else f"--{role}_split"
                for role, split in splits.items() if split is not None and not role.endswith("?")}
    opened, available, folder = open_splits(name, [s for s in splits.values() if s is not None], config_name,
                                            required=required)
    chosen = {role.rstrip("?"): None if split not in opened else (split, opened[split])
              for role, split in splits.items()}
    first = next((ds for _, ds in filter(None, chosen.values())), None)
    if first is None:
        raise DatasetSourceError(f"{name}: none of the splits {list(splits.values())} is there "
                                 f"(splits: {', '.join(available)})")
    class_names = _label_space(name, folder, first, class_names_file)
    out = {role: None if pair is None else to_panoptic_rows(pair[1], columns, class_names, f"{name} ({pair[0]})")
           for role, pair in chosen.items()}
    return out, class_names


# --------------------------------------------------------------------------------------------------------------------
# Writing: panoptic rows -> a folder of parquet shards, the categories file and a dataset card
# --------------------------------------------------------------------------------------------------------------------
def _hub_rows(ds: Any) -> Any:
    """Rows of :mod:`training.data.panoptic_datasets` -> the 🤗 layout of the module docstring (COCO's segment keys,
    no derived ``label`` / ``isthing``)."""
    import datasets

    v = datasets.Value
    segment = {"id": v("int64"), "category_id": v("int64"), "iscrowd": v("int64"), "area": v("int64"),
               "bbox": datasets.List(v("float64"), length=4)}
    keys = list(segment)
    segments = [[{k: s[k] for k in keys} for s in segs] for segs in ds["segments_info"]]
    out = ds.select_columns(["image", "panoptic", "image_id", "file_name"])
    return out.add_column("segments_info", segments, feature=datasets.List(segment))


def write_dataset_folder(
    splits: Mapping[str, Any],
    class_names: ClassNames,
    output_dir: str | os.PathLike[str],
    *,
    card: str = "",
    max_rows_per_shard: int = 1000,
) -> Path:
    """Write panoptic rows as a 🤗 dataset folder ready for the Hub: ``data/<split>-NNNNN-of-NNNNN.parquet`` (image
    bytes embedded), :data:`CATEGORIES_FILE` and ``README.md`` (a card whose YAML names the splits' files, then
    `card`). ``datasets.load_dataset(output_dir)`` reads it back; ``hf upload`` publishes it as it is.

    Args:
        splits: ``{split name: rows}`` (rows as :func:`training.data.panoptic_datasets.load_coco_panoptic` returns).
        class_names: the label space, written to the categories file with synonyms and thing flags.
        output_dir: a new or empty folder.
        card: Markdown for the card's body.
        max_rows_per_shard: rows per parquet file at most.
    """
    from datasets.table import embed_table_storage

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty: write the dataset to a new or empty folder")
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    configs = []
    for split, ds in splits.items():
        ds = _hub_rows(ds)
        num_shards = max(1, -(-len(ds) // max_rows_per_shard))
        for index in range(num_shards):
            shard = ds.shard(num_shards=num_shards, index=index, contiguous=True)
            shard = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
            shard.with_format(None).to_parquet(output_dir / "data" / f"{split}-{index:05d}-of-{num_shards:05d}.parquet")
        configs.append(f"  - split: {split}\n    path: data/{split}-*")
    lines = ",\n".join(f"  {json.dumps(c)}" for c in class_names.categories_with_synonyms())
    (output_dir / CATEGORIES_FILE).write_text(f'{{"categories": [\n{lines}\n]}}\n')
    header = ("---\nconfigs:\n- config_name: default\n  data_files:\n" + "\n".join(configs) + "\n"
              "task_categories:\n- image-segmentation\ntags:\n- panoptic-segmentation\n---\n")
    (output_dir / "README.md").write_text(header + card)
    return output_dir
