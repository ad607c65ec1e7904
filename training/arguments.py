"""The one argument builder of the three training loops, with YAML presets (``--config``) that the command line
overrides.

Style of transformers' ``*_no_trainer.py`` examples: argparse with ``help=`` on every flag. :func:`build_parser` gives
each loop (``dewa``, ``supervised``, ``ssl``) its groups: the data it reads (class-agnostic masks, or a panoptic dataset
with its
labeled partition and validation set), the semi-supervised settings (``ssl`` only), the options every loop shares
(output, schedule, optimisation, checkpoints, tracking) and the initial model. :func:`parse_args` parses and checks
them.

A preset is a YAML mapping of flag names (``learning_rate`` or ``learning-rate``) to values; it replaces the parser's
defaults, and any flag given on the command line wins over it. ``--config NAME`` without a path resolves to the packaged
preset ``training/configs/NAME.yaml``. A preset may start from others, ``_base_: NAME`` or ``_base_: [NAME, ...]``
(relative to its own folder, or packaged presets; later ones win), and state only what differs: the paper's runs
inherit ``configs/base/<stage>.yaml`` and ``configs/base/<dataset>.yaml``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import cli, earlier_names
from .data.color_augmentation import COLOR_AUGMENTATIONS, ColorAugSSD
from .data.hub_datasets import DatasetColumns, DatasetImages, load_image_split, looks_like_hub_id
from .data.panoptic_datasets import NAMED_DATASETS
from .data.resolutions import evaluation_size
from .data.train_datasets import (
    MasksTrainDataset,
    PanopticDataConfig,
    PanopticTrainingData,
    load_training_data,
    mask_train_dataset,
)
from .data.transforms import SCALE_AUGMENTATIONS, GeometricAugmentation, build_geometric_augmentation
from .model_init import DECODER_INIT_ALIASES, DECODER_INITS

__all__ = [
    "CONFIG_DIR",
    "DATASETS",
    "LOOPS",
    "add_common_training_args",
    "add_dataset_source_args",
    "add_model_args",
    "add_mask_data_args",
    "add_panoptic_data_args",
    "add_ssl_args",
    "build_parser",
    "color_augmentation",
    "geometric_augmentation",
    "load_config_file",
    "load_panoptic_training_data",
    "mask_training_dataset",
    "panoptic_data_config",
    "parse_args",
    "parse_args_with_config",
    "resolve_config_path",
]


def _decoder_init(value: str) -> str:
    """A --decoder_init value, with the accepted earlier spellings mapped to their names."""
    return DECODER_INIT_ALIASES.get(value, value)


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASE_KEY = "_base_"
LOOPS = ("dewa", "supervised", "ssl")
DATASETS = NAMED_DATASETS
# Defaults that differ between the loops (a --config preset overrides them, the command line overrides both).
LOOP_DEFAULTS: dict[str, dict[str, Any]] = {
    "dewa": {"train_batch_size": 16, "project_name": "dearli_dewa"},
    "supervised": {"train_batch_size": 16, "project_name": "dearli_supervised"},
    "ssl": {"train_batch_size": 8, "project_name": "dearli_ssl", "mixed_precision": "no"},
}


def resolve_config_path(config: str | Path) -> Path:
    """A preset file: an existing path, or the name of a packaged preset (``demo_dewa`` -> configs/demo_dewa.yaml)."""
    path = Path(config)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{config}", CONFIG_DIR / f"{config}.yaml", CONFIG_DIR / f"{config}.yml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"Config {config!r} is neither a file nor a packaged preset (available: {available})")


def load_config_file(config: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML preset into a dict with argparse-style keys (dashes become underscores), its ``_base_`` presets
    merged in first (see the module docstring)."""
    path = resolve_config_path(config).resolve()
    if path in _chain:
        raise ValueError(f"Config {path} inherits from itself: {' -> '.join(str(p) for p in (*_chain, path))}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"Config {path} must be a YAML mapping of argument names to values, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data = {earlier_names.FLAGS.get(k, k): v for k, v in data.items()}
    bases = data.pop(BASE_KEY, None)
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases or []:
        local = path.parent / str(base)
        found = next((c for c in (local, local.with_name(local.name + ".yaml")) if c.is_file()), None)
        merged.update(load_config_file(found or str(base), (*_chain, path)))
    merged.update(data)
    return merged


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with the values of ``--config FILE`` (if given) as defaults: CLI > preset > parser default.

    Unknown preset keys and values outside an argument's ``choices`` raise ``ValueError``. The resolved preset path is
    stored in ``args.config``.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    config_path = None
    if known.config:
        config_path = resolve_config_path(known.config)
        values = load_config_file(config_path)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise ValueError(f"Unknown keys in config {config_path}: {unknown}")
        for key, value in values.items():
            action = actions[key]
            if action.type is str and value is not None:
                bad = [v for v in (value if isinstance(value, list) else [value]) if not isinstance(v, str)]
                if bad:
                    raise ValueError(
                        f"Config {config_path}: {key}={value!r} must be a string; quote it in the YAML file "
                        f"(YAML reads e.g. 1_128 as the integer 1128)"
                    )
            if isinstance(value, str) and action.type is not None and action.type is not str:
                value = action.type(value)
            items = value if isinstance(value, list) and action.nargs not in (None, "?") else [value]
            if action.choices is not None and value is not None:
                bad = [v for v in items if v not in action.choices]
                if bad:
                    raise ValueError(f"Config {config_path}: {key}={value!r} not in {list(action.choices)}")
            values[key] = value
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    args.config = str(config_path) if config_path else None
    return args


def add_common_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Flags every loop shares (output, schedule, optimisation, checkpoints, tracking, data loading).

    Keyword arguments override the defaults below (e.g. ``train_batch_size=8``); a `--config` preset overrides both.
    """
    d = {
        "output_dir": None,
        "seed": 42,
        "max_train_steps": 80_000,
        "checkpointing_steps": 5_000,
        "checkpoints_total_limit": 2,
        "logging_steps": 50,
        "mixed_precision": "auto",
        "learning_rate": 1e-4,
        "weight_decay": 0.05,
        "weight_decay_norm": 0.0,
        "weight_decay_embed": 0.0,
        "lr_power": 0.9,
        "lr_warmup_steps": 0,
        "gradient_clip": 0.01,
        "train_batch_size": 16,
        "crop_size": [640],
        "scale_augmentation": "shortest_edge",
        "color_augmentation": "ssd",
        "flip_prob": 0.5,
        "num_workers": 4,
        "report_to": "tensorboard",
        "project_name": "dearli",
    }
    unknown = set(defaults) - set(d)
    if unknown:
        raise ValueError(f"Unknown common defaults: {sorted(unknown)}")
    d.update(defaults)
    g = parser.add_argument_group("common training options")
    g.add_argument("--config", type=str, default=None,
                   help="YAML preset (a path, or a name in training/configs/) whose values replace the defaults; "
                        "flags given on the command line win over it.")
    g.add_argument("--output_dir", type=str, default=d["output_dir"],
                   help="Where checkpoints, logs and the final model (save_pretrained) are written.")
    g.add_argument("--seed", type=int, default=d["seed"],
                   help="Seed of the model initialisation, data order and augmentation (reproducible runs).")
    g.add_argument("--max_train_steps", type=int, default=d["max_train_steps"],
                   help="Total number of optimisation steps (iterations).")
    g.add_argument("--checkpointing_steps", type=int, default=d["checkpointing_steps"],
                   help="Save a resumable checkpoint every N steps (0 disables; the final step is always saved).")
    g.add_argument("--checkpoints_total_limit", type=int, default=d["checkpoints_total_limit"],
                   help="Keep at most this many checkpoints (oldest deleted first; 0 keeps all).")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="Resume from a checkpoint folder, or 'latest' for the newest one in output_dir (starts fresh "
                        "when there is none). Continues exactly: model, optimizer, scheduler, RNG and data position.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Train from scratch in an --output_dir that holds a finished run or checkpoints, replacing "
                        "them (without it, or --resume_from_checkpoint, such a folder is refused).")
    g.add_argument("--with_tracking", action="store_true",
                   help="Log losses, learning rate and metrics with the tracker(s) of --report_to.")
    g.add_argument("--report_to", type=str, default=d["report_to"],
                   help="Tracker(s) for --with_tracking: 'tensorboard' (offline, under output_dir/logs), 'wandb', "
                        "'all', ... (any accelerate tracker name, comma separated).")
    g.add_argument("--project_name", type=str, default=d["project_name"],
                   help="Tracker project / run name.")
    g.add_argument("--logging_steps", type=int, default=d["logging_steps"],
                   help="Log training losses every N steps.")
    g.add_argument("--mixed_precision", type=str, default=d["mixed_precision"], choices=["auto", "no", "fp16", "bf16"],
                   help="Mixed precision: 'auto' = bf16 on GPUs that support it (else fp16), 'no' on CPU; or as given "
                        "('bf16' also on a CPU with native bf16, avx512_bf16 or amx_bf16 in lscpu: torch's CPU "
                        "autocast, refused on other CPUs; the loss and sampling positions stay float32). "
                        "Default 'no' (fp32) for ssl.py, as the released SSL runs: bf16 roughly halves activation "
                        "memory and speeds up recent GPUs, but the teacher's pseudo-labels and the student's updates "
                        "then differ from the reference's (not measured); DeWa and the supervised loop default to "
                        "'auto' (the reference trains DeWa with fp16 AMP).")
    g.add_argument("--learning_rate", type=float, default=d["learning_rate"], help="AdamW peak learning rate.")
    g.add_argument("--weight_decay", type=float, default=d["weight_decay"], help="AdamW weight decay.")
    g.add_argument("--weight_decay_norm", type=float, default=d["weight_decay_norm"],
                   help="Weight decay of normalisation-layer parameters (the released configs: 0; equal to "
                        "--weight_decay decays them like everything else).")
    g.add_argument("--weight_decay_embed", type=float, default=d["weight_decay_embed"],
                   help="Weight decay of nn.Embedding parameters: object queries, decoder level embedding, no-object "
                        "embedding (the released configs: 0; equal to --weight_decay: decayed like everything else).")
    g.add_argument("--lr_power", type=float, default=d["lr_power"],
                   help="Power of the poly learning-rate schedule lr * (1 - step / max_steps) ** power.")
    g.add_argument("--lr_warmup_steps", type=int, default=d["lr_warmup_steps"],
                   help="Linear warm-up steps before the poly decay (0 in the paper).")
    g.add_argument("--gradient_clip", type=float, default=d["gradient_clip"],
                   help="Clip the gradient norm of all trainable parameters together (full-model clipping) to this "
                        "value; 0 disables.")
    g.add_argument("--train_batch_size", type=int, default=d["train_batch_size"],
                   help="Training images per step over all processes (divided among them).")
    g.add_argument("--crop_size", type=int, nargs="+", default=d["crop_size"],
                   help="Training crop size: one int (square) or height width.")
    g.add_argument("--scale_augmentation", type=str, default=d["scale_augmentation"], choices=SCALE_AUGMENTATIONS,
                   help="Random scale before the crop: 'shortest_edge' = the released configs' (shorter side drawn "
                        "from min_scale..max_scale x the crop in steps of 0.1, longer side capped at "
                        "--train_longest_edge); 'lsj' = large-scale jitter as the paper's text says (image fitted into "
                        "s x the crop, s ~ U(min_scale, max_scale): smaller objects, more padding).")
    g.add_argument("--min_scale", type=float, default=None,
                   help="Smallest scale of the crop size (default: 0.5 for shortest_edge, 0.1 for lsj).")
    g.add_argument("--max_scale", type=float, default=None, help="Largest scale of the crop size (default: 2.0).")
    g.add_argument("--train_longest_edge", type=int, default=None,
                   help="shortest_edge only: cap of the longer side of the resized training image (default: 4 x the "
                        "crop, as the released configs: 2560 for crop 640, 2048 for 512).")
    g.add_argument("--flip_prob", type=float, default=d["flip_prob"], help="Probability of a horizontal flip.")
    g.add_argument("--color_augmentation", type=str, default=d["color_augmentation"], choices=COLOR_AUGMENTATIONS,
                   help="Photometric augmentation of the images trained with ground truth (DeWa's SAM images, the "
                        "labeled images of SSL and of the supervised baseline): 'ssd' = detectron2's COLOR_AUG_SSD "
                        "(brightness, contrast, saturation, hue; the released configs), 'none'. Unlabeled images "
                        "never get it (their strong view has its own colour jitter).")
    g.add_argument("--num_workers", type=int, default=d["num_workers"],
                   help="DataLoader worker processes (at most the CPUs available: larger values are lowered).")
    g.add_argument("--max_skipped_share", type=float, default=0.01,
                   help="Training examples that cannot be read (truncated or corrupt files) are skipped, logged with "
                        "their path and counted; the run stops when more than this share of them was skipped.")
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags choosing the initial model: a preset, an OpenCLIP model, or a saved DEARLi (``--init_from``)."""
    g = parser.add_argument_group("model initialisation")
    g.add_argument("--model_preset", type=str, default=None, choices=["tiny"],
                   help="Build a fresh preset model ('tiny': random tiny CLIP, for tests and the CPU demo).")
    g.add_argument("--clip_model_name", type=str, default="convnext_base_w_320",
                   help="OpenCLIP architecture of a fresh model (when neither --model_preset nor --init_from).")
    g.add_argument("--clip_pretrained", type=str, default=None,
                   help="OpenCLIP pretrained tag or local checkpoint file for a fresh model, or to re-encode class "
                        "names when --init_from lacks the CLIP text tower. Nothing is downloaded unless a tag needs "
                        "it.")
    g.add_argument("--init_from", type=str, default=None,
                   help="Initialise from a saved DEARLi folder (save_pretrained output, e.g. of dewa.py); the class "
                        "names are switched to the dataset's.")
    g.add_argument("--keep_text_tower", action="store_true",
                   help="Keep the CLIP text tower in the model and its saved folder (allows set_class_names later).")
    g.add_argument("--num_queries", type=int, default=None,
                   help="Override the number of object queries of a fresh model.")
    g.add_argument("--train_num_points", type=int, default=None,
                   help="Override the number of points sampled for the mask losses (default of the config).")
    g.add_argument("--ensemble_alpha", type=float, default=None,
                   help="Eq. 6 weight of the decoder posterior (1 - ensemble_alpha for CLIP; 1 = decoder only), stored "
                        "in the model's config: used by validation, the SSL teacher's pseudo-labels and the saved "
                        "model (default: the initial model's, 0.6 for a fresh one).")
    g.add_argument("--decoder_init", type=_decoder_init, default="xavier", choices=DECODER_INITS,
                   help="Initial decoder weights of a fresh model: 'xavier' = transformers' Mask2Former init with "
                        "the reference's pixel-decoder fills (Xavier-uniform, a deformable sampling grid); 'normal' = "
                        "N(0, 0.02) everywhere and no sampling grid (for comparisons).")
    g.add_argument("--model_config_overrides", type=str, default=None,
                   help='JSON dict of DearliConfig values for a fresh model, e.g. \'{"decoder_layers": 4}\' (with '
                        '--init_from only loss settings such as class_weight or train_num_points).')
    return parser


def add_mask_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeWa's data: class-agnostic masks (SAM's or Felzenszwalb's) and the images they were generated from."""
    g = parser.add_argument_group("class-agnostic mask data")
    g.add_argument("--masks_dir", type=str, nargs="+", default=None,
                   help="Output folder(s) of scripts/generate_sam_masks.py (parquet shards of class-agnostic masks as "
                        "RLE, from SAM or another --mask_source).")
    g.add_argument("--image_dir", type=str, nargs="+", default=None,
                   help="Image folder(s) the masks were generated from (a record's image is image_dir/file_name); "
                        "one per --masks_dir, or one for all.")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="The 🤗 dataset the masks were generated from (scripts/generate_sam_masks.py "
                        "--dataset_name), a Hub id (owner/name) or a local folder, instead of --image_dir or besides "
                        "it (then the first --masks_dir go with the --train_split splits, the others with the "
                        "--image_dir folders); a mask record's image is the row its image_id names (see --id_column).")
    add_dataset_image_args(g)
    g.add_argument("--train_split", type=str, nargs="+", default=["train"],
                   help="🤗 dataset: the split(s) the masks were generated from, one per --masks_dir, or one for all; "
                        "only these are read.")
    g.add_argument("--id_column", type=str, default=None,
                   help="🤗 dataset: the column naming each image in the masks, as given to "
                        "scripts/generate_sam_masks.py (default: image_id or id if present, else the row number).")
    g.add_argument("--drop_empty_masks", action="store_true",
                   help="Drop the masks that the crop leaves empty. By default they stay as empty targets, as in "
                        "the released DeWa: they count in the loss normalisation and teach the queries matched to "
                        "them to predict nothing.")
    g.add_argument("--no_exif_transpose", action="store_true",
                   help="Do not apply EXIF orientation to images (only if the masks were generated that way).")
    return parser


def add_dataset_image_args(group: Any) -> Any:
    """The flags that read a 🤗 dataset's configuration and image column (every loop and script reading one)."""
    group.add_argument("--dataset_config_name", type=str, default=None,
                       help="🤗 dataset: its configuration (the second argument of datasets.load_dataset).")
    group.add_argument("--image_column", type=str, default="image", help="🤗 dataset: the image column.")
    return group


def add_dataset_source_args(group: Any) -> Any:
    """The flags that read a 🤗 panoptic dataset's columns and configuration (the panoptic loops and
    ``scripts/evaluate.py``)."""
    add_dataset_image_args(group)
    group.add_argument("--panoptic_column", type=str, default=None,
                       help="🤗 dataset: the panoptic PNG column (segment ids RGB-encoded as in COCO panoptic, "
                            "id = R + 256 G + 256^2 B, 0 = void); default 'panoptic', or 'label' when the dataset "
                            "has no 'panoptic' column.")
    group.add_argument("--segments_info_column", type=str, default="segments_info",
                       help="🤗 dataset: the column listing each image's segments as {id, category_id[, iscrowd]} "
                            "(a JSON string of that list is read too).")
    return group


def add_panoptic_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A panoptic dataset, its labeled partition and its validation set (supervised and semi-supervised loops)."""
    g = parser.add_argument_group("panoptic data")
    g.add_argument("--dataset_name", type=str, default="coco_panoptic",
                   help="Label space and loader: COCO panoptic (133 classes), COCO-Objects (81), ADE20K (150, "
                        "after scripts/prepare_ade20k.py), 'custom' (a COCO panoptic folder, classes from the "
                        "annotation JSON), or a 🤗 dataset: a Hub id (owner/name) or a local folder (save_to_disk "
                        "output, or files datasets.load_dataset reads, e.g. parquet shards) with the columns of "
                        "--image_column, --panoptic_column and --segments_info_column and its classes in a "
                        "categories.json (see README, '🤗 datasets').")
    add_dataset_source_args(g)
    g.add_argument("--train_split", type=str, default="train",
                   help="🤗 dataset: the split trained on (labeled and, with --partition / --labeled_fraction, "
                        "unlabeled images).")
    g.add_argument("--validation_split", type=str, default="validation",
                   help="🤗 dataset: the split validated on; 'none' validates nothing. A dataset without a "
                        "'validation' split trains without validation (logged); another name must exist.")
    g.add_argument("--ade20k_root", type=str, default=None,
                   help="ADEChallengeData2016 folder (for --dataset_name ade20k; replaces the --train_*/--val_* "
                        "folders).")
    g.add_argument("--train_images_dir", type=str, default=None, help="Training images folder (COCO format).")
    g.add_argument("--train_panoptic_dir", type=str, default=None, help="Training panoptic PNG folder.")
    g.add_argument("--train_annotations", type=str, default=None, help="Training panoptic annotation JSON.")
    g.add_argument("--val_images_dir", type=str, default=None, help="Validation images folder (COCO format).")
    g.add_argument("--val_panoptic_dir", type=str, default=None, help="Validation panoptic PNG folder.")
    g.add_argument("--val_annotations", type=str, default=None,
                   help="Validation panoptic annotation JSON (no validation when no validation data is given).")
    g.add_argument("--class_names_file", type=str, default=None,
                   help="Class names with synonyms, one 'id:name,synonym,...' line per category id (the format of the "
                        "shipped class-name files; e.g. class_names.txt of a generated miniature world), for "
                        "--dataset_name custom or coco_panoptic; default: the JSON's category names (custom). For a "
                        "🤗 dataset it replaces its categories.json: such lines (thing flags from categories.json) or "
                        "a COCO categories JSON ({id, name, isthing} per class).")
    g.add_argument("--partition", type=str, default=None,
                   help="The labeled training images: a text file with one image file name (or image id) per line, "
                        "or a standard partition's name (e.g. 1_512 for COCO, 1_128 for ADE20K: the files shipped in "
                        "training/data/assets/splits); supervised default: every training image is labeled. In "
                        "semi-supervised training the other training images are unlabeled data.")
    g.add_argument("--labeled_fraction", type=float, default=None,
                   help="Instead of --partition: a random labeled subset of this fraction (drawn with --seed).")
    g.add_argument("--coco_objects_void", type=str, default="background", choices=["background", "void"],
                   help="COCO-Objects: unlabeled (void) pixels become background in training and in the validation "
                        "ground truth, as the reference's prepare_coco_objects.py ('background'), or stay void "
                        "('void': no target, not evaluated).")
    g.add_argument("--restrict_to_present_classes", action="store_true",
                   help="Use only the classes that occur in the labeled training images (small demos).")
    g.add_argument("--eval_steps", type=int, default=5_000, help="Validate every N steps (0: only at the end).")
    g.add_argument("--eval_shortest_edge", type=int, default=None,
                   help="Validation images are resized so that their shorter side has this length; also the size of "
                        "the image processor saved with the model (default: the dataset's test size, ADE20K 640, COCO "
                        "512, otherwise 640).")
    g.add_argument("--eval_longest_edge", type=int, default=None,
                   help="Cap of the longer side of validation images and of the saved image processor (default: the "
                        "dataset's, ADE20K 2560, COCO 2048, otherwise 2560).")
    g.add_argument("--eval_threshold", type=float, default=0.0,
                   help="Panoptic inference: keep queries whose best class probability exceeds this (paper: 0).")
    g.add_argument("--eval_overlap_threshold", type=float, default=0.8,
                   help="Panoptic inference: minimal visible fraction of a query's mask (paper: 0.8).")
    g.add_argument("--max_eval_images", type=int, default=None, help="Validate on at most this many images.")
    g.add_argument("--eval_batch_size", type=int, default=1, help="Validation images per process and batch.")
    return parser


def _ema_decay(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {value!r}") from None


def add_ssl_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Mean Teacher, pseudo-label and strong-augmentation flags of the semi-supervised loop."""
    g = parser.add_argument_group("semi-supervised learning")
    g.add_argument("--unlabeled_batch_size", type=int, default=8,
                   help="Unlabeled images per step over all processes (the labeled ones are --train_batch_size).")
    g.add_argument("--unlabeled_images_dir", type=str, nargs="+", default=None,
                   help="Folder(s) of images without any annotation (searched recursively), used as unlabeled data "
                        "besides the training images outside --partition / --labeled_fraction; alone, every "
                        "annotated training image is labeled. Files that are not readable images are skipped and "
                        "counted in the log.")
    g.add_argument("--unlabeled_weight", type=float, default=1.0,
                   help="Weight of the unlabeled (pseudo-label) loss; the paper sums both losses (1.0).")
    g.add_argument("--ema_decay", type=_ema_decay, default=0.999,
                   help="EMA decay gamma of the teacher (Eq. 2), or 'auto': the paper's horizon relative to the "
                        "schedule (0.999 for 80k steps, 1 - 80 / --max_train_steps in general; e.g. 0.92 for 1,000 "
                        "steps), so that a short run's teacher follows its student as the paper's does.")
    g.add_argument("--teacher_init", type=str, default=None,
                   help="Initial teacher weights (a save_pretrained DEARLi folder). Without it the teacher starts "
                        "as a copy of the initial student (with --init_from: those weights, e.g. DeWa's).")
    g.add_argument("--ema_schedule", type=str, default="auto", choices=["auto", "constant", "ramp_up"],
                   help="EMA decay of the teacher: 'constant' = gamma from step 0; 'ramp_up' = min(1 - 1/(t+1), gamma) "
                        "(the first update copies the student); 'auto' = as the reference: constant when the teacher "
                        "starts from given weights (--init_from or --teacher_init: DEARLi starts student and teacher "
                        "from DeWa), ramp-up when it starts from a fresh model (DEAR from scratch).")
    g.add_argument("--pseudo_label_threshold", type=float, default=0.0,
                   help="Teacher panoptic inference: keep queries whose best class probability exceeds this.")
    g.add_argument("--pseudo_label_overlap_threshold", type=float, default=0.8,
                   help="Teacher panoptic inference: minimal visible fraction of a query's mask.")
    g.add_argument("--color_jitter_prob", type=float, default=1.0,
                   help="Probability of colour jitter on the strong view (reference: always).")
    g.add_argument("--color_jitter", type=float, nargs=4, default=[0.8, 0.8, 0.8, 0.2],
                   metavar=("BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"),
                   help="Colour jitter strengths as torchvision's ColorJitter: brightness, contrast and saturation "
                        "factors drawn from [1 - x, 1 + x], hue shifted by up to x turns (reference: 0.8 0.8 0.8 0.2, "
                        "i.e. up to +-72 degrees of hue). Where classes are defined by colour (the miniature world), "
                        "hue and saturation jitter change the class the image shows.")
    g.add_argument("--grayscale_prob", type=float, default=0.2, help="Probability of grayscale on the strong view.")
    g.add_argument("--blur_prob", type=float, default=0.5,
                   help="Probability of Gaussian blur (sigma in [0.1, 2]) on the strong view.")
    g.add_argument("--cutmix_prob", type=float, default=0.5,
                   help="Probability of a CutMix box (2-40%% of the crop, aspect 0.3-3.3) per unlabeled image; 0 "
                        "disables CutMix.")
    g.add_argument("--cutmix_source", type=str, default="separate_image", choices=["separate_image", "same_batch"],
                   help="Where CutMix boxes come from: 'separate_image' = another random unlabeled crop, labelled by a "
                        "second teacher pass (the reference; about 1.5x the teacher compute and one more image to load "
                        "per unlabeled image); 'same_batch' = the next image of the batch with its pseudo-label (no "
                        "extra teacher pass or image, but fewer distinct images per step and boxes may cover the "
                        "source's padding; skipped with one unlabeled image per process).")
    g.add_argument("--pseudo_label_eval_steps", type=int, default=0,
                   help="Every N steps (and after the last), score the teacher's pseudo-labels (ensembled and "
                        "decoder-only) and the student's decoder on a fixed subset of the unlabeled images against "
                        "their ground truth (PQ, PQ_th, PQ_st; logged and appended to "
                        "OUTPUT_DIR/pseudo_label_quality.jsonl). Needs annotated unlabeled images; 0: off.")
    g.add_argument("--pseudo_label_eval_images", type=int, default=64,
                   help="Size of the fixed subset of unlabeled images scored by --pseudo_label_eval_steps.")
    g.add_argument("--final_model", type=str, default="student", choices=["student", "teacher"],
                   help="Which model is saved in --output_dir (the other goes to a sub-folder 'teacher' or "
                        "'student'). The paper evaluates the student of the last iteration.")
    return parser


def build_parser(loop: str, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of a training loop (``"dewa"``, ``"supervised"`` or ``"ssl"``); `description` is its ``--help``."""
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; known: {LOOPS}")
    parser = cli.ArgumentParser(description=description)
    if loop == "dewa":
        add_mask_data_args(parser)
    else:
        add_panoptic_data_args(parser)
    if loop == "ssl":
        add_ssl_args(parser)
    add_common_training_args(parser, **LOOP_DEFAULTS[loop])
    add_model_args(parser)
    for earlier, current in earlier_names.FLAGS.items():
        if f"--{current}" in parser._option_string_actions:
            parser.add_hidden_alias(f"--{earlier}", f"--{current}")
    return parser


# Ranges of numeric flags, checked after the preset and the command line are merged (a value from a YAML preset is
# checked too): (lowest, highest, lowest excluded).
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    **{name: (0.0, 1.0, False) for name in (
        "flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob", "cutmix_prob", "ema_decay",
        "max_skipped_share", "eval_threshold", "eval_overlap_threshold", "pseudo_label_threshold",
        "pseudo_label_overlap_threshold", "ensemble_alpha")},
    **{name: (0.0, None, True) for name in (
        "learning_rate", "min_scale", "max_scale", "max_train_steps", "train_batch_size", "unlabeled_batch_size",
        "eval_batch_size", "eval_shortest_edge", "eval_longest_edge", "max_eval_images", "num_queries",
        "train_num_points", "pseudo_label_eval_images")},
    **{name: (0.0, None, False) for name in (
        "weight_decay", "gradient_clip", "lr_power", "lr_warmup_steps", "checkpointing_steps",
        "checkpoints_total_limit", "logging_steps", "num_workers", "eval_steps", "unlabeled_weight",
        "pseudo_label_eval_steps")},
    "labeled_fraction": (0.0, 1.0, True),
}


def check_ranges(args: argparse.Namespace) -> list[str]:
    """Problems of numeric arguments outside their range (:data:`_RANGES`, crop sizes, min <= max scale)."""
    problems = []
    for name, (low, high, low_excluded) in _RANGES.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (low is not None and (value <= low if low_excluded else value < low)) \
                or (high is not None and value > high):
            interval = f"{'(' if low_excluded else '['}{low:g}, {'inf' if high is None else f'{high:g}'}]"
            problems.append(f"--{name} must lie in {interval}, got {value!r}")
    jitter = getattr(args, "color_jitter", None)
    if jitter is not None and (len(jitter) != 4 or any(v < 0 for v in jitter[:3]) or not 0 <= jitter[3] <= 0.5):
        problems.append(f"--color_jitter takes brightness, contrast, saturation >= 0 and hue in [0, 0.5], got {jitter}")
    crop = getattr(args, "crop_size", None)
    if crop is not None and (len(crop) not in (1, 2) or any(int(c) < 1 for c in crop)):
        problems.append(f"--crop_size takes one or two positive sizes, got {crop}")
    if not problems and getattr(args, "min_scale", None) and getattr(args, "max_scale", None) \
            and args.min_scale > args.max_scale:
        problems.append(f"--min_scale {args.min_scale} is larger than --max_scale {args.max_scale}")
    return problems


def parse_args(loop: str, argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """Parse (``--config`` preset, then the command line) and check the arguments of a training loop."""
    parser = build_parser(loop, description)
    args = parse_args_with_config(parser, argv)
    if not args.output_dir:
        parser.error("--output_dir is required")
    if getattr(args, "ema_decay", None) == "auto":
        from .ema import ema_decay_for_schedule

        args.ema_decay = ema_decay_for_schedule(args.max_train_steps)
    problems = check_ranges(args)
    if problems:
        parser.error("; ".join(problems))
    if loop == "dewa":
        if not args.masks_dir or not (args.image_dir or args.dataset_name):
            parser.error("--masks_dir and --image_dir (or --dataset_name) are required (on the command line or in "
                         "--config)")
        if args.image_dir and args.dataset_name:
            if len(args.train_split) + len(args.image_dir) != len(args.masks_dir):
                parser.error(f"with --dataset_name and --image_dir give one --masks_dir per --train_split, then one "
                             f"per --image_dir ({len(args.train_split)} + {len(args.image_dir)}), got "
                             f"{len(args.masks_dir)}")
        elif args.image_dir and len(args.image_dir) not in (1, len(args.masks_dir)):
            parser.error("give one --image_dir, or one per --masks_dir")
        elif args.dataset_name and len(args.train_split) not in (1, len(args.masks_dir)):
            parser.error("give one --train_split, or one per --masks_dir")
        return args
    size = evaluation_size(args.dataset_name)
    if args.eval_shortest_edge is None:
        args.eval_shortest_edge = size["shortest_edge"]
    if args.eval_longest_edge is None:
        args.eval_longest_edge = size["longest_edge"]
    if args.dataset_name not in DATASETS:
        folders = [f"--{f}" for f in ("train_images_dir", "train_panoptic_dir", "train_annotations", "val_images_dir",
                                      "val_panoptic_dir", "val_annotations", "ade20k_root") if getattr(args, f)]
        if folders:
            parser.error(f"--dataset_name {args.dataset_name} is a 🤗 dataset, which replaces {', '.join(folders)}")
        if not Path(args.dataset_name).expanduser().is_dir() and not looks_like_hub_id(args.dataset_name):
            parser.error(f"--dataset_name {args.dataset_name!r} is none of {', '.join(DATASETS)}, no local folder and "
                         "no Hub dataset id (owner/name)")
    elif args.dataset_name == "ade20k":
        if not args.ade20k_root:
            parser.error("--dataset_name ade20k needs --ade20k_root")
    elif not (args.train_images_dir and args.train_panoptic_dir and args.train_annotations):
        parser.error("--train_images_dir, --train_panoptic_dir and --train_annotations are required")
    if loop == "ssl" and not (args.partition or args.labeled_fraction or args.unlabeled_images_dir):
        parser.error("give --partition or --labeled_fraction (the rest of the training set is the unlabeled data), "
                     "or --unlabeled_images_dir (folders of unannotated images), or both")
    if args.partition and args.labeled_fraction:
        parser.error("give at most one of --partition and --labeled_fraction")
    return args


# --------------------------------------------------------------------------------------------------------------------
# The loops' data from their arguments (training.data takes plain values)
# --------------------------------------------------------------------------------------------------------------------
def geometric_augmentation(args: argparse.Namespace) -> GeometricAugmentation:
    """The scale / crop / flip of ``--scale_augmentation``, ``--crop_size``, ``--min_scale``, ``--max_scale``,
    ``--train_longest_edge``, ``--flip_prob``."""
    return build_geometric_augmentation(args.scale_augmentation, args.crop_size, args.min_scale, args.max_scale,
                                        args.train_longest_edge, args.flip_prob)


def color_augmentation(args: argparse.Namespace) -> ColorAugSSD | None:
    """The photometric augmentation of images with ground truth (``--color_augmentation``)."""
    return ColorAugSSD() if args.color_augmentation == "ssd" else None


def mask_training_dataset(args: argparse.Namespace) -> MasksTrainDataset:
    """DeWa's data: every ``--masks_dir`` with its ``--image_dir`` (or ``--dataset_name`` split), under
    :func:`geometric_augmentation` and :func:`color_augmentation`."""
    images: list[Any] = []
    if args.dataset_name:
        images += [DatasetImages(load_image_split(args.dataset_name, split, config_name=args.dataset_config_name,
                                                  image_column=args.image_column, split_flag="--train_split"),
                                 args.image_column, args.id_column, f"{args.dataset_name} ({split})")
                   for split in args.train_split]
    images += args.image_dir or []
    return mask_train_dataset(args.masks_dir, images, geometric_augmentation(args),
                              exif_transpose=not args.no_exif_transpose, color_augmentation=color_augmentation(args),
                              drop_empty_masks=args.drop_empty_masks)


def panoptic_data_config(args: argparse.Namespace) -> PanopticDataConfig:
    """The ``panoptic data`` flags as a :class:`~training.data.train_datasets.PanopticDataConfig`."""
    return PanopticDataConfig(
        dataset_name=args.dataset_name, train_images_dir=args.train_images_dir,
        train_panoptic_dir=args.train_panoptic_dir, train_annotations=args.train_annotations,
        val_images_dir=args.val_images_dir, val_panoptic_dir=args.val_panoptic_dir,
        val_annotations=args.val_annotations, ade20k_root=args.ade20k_root, class_names_file=args.class_names_file,
        partition=args.partition, labeled_fraction=args.labeled_fraction,
        unlabeled_images_dirs=tuple(getattr(args, "unlabeled_images_dir", None) or ()), seed=args.seed,
        restrict_to_present_classes=args.restrict_to_present_classes, max_eval_images=args.max_eval_images,
        coco_objects_void_to_background=getattr(args, "coco_objects_void", "background") == "background",
        dataset_config_name=args.dataset_config_name, train_split=args.train_split,
        validation_split=None if str(args.validation_split).lower() == "none" else args.validation_split,
        columns=DatasetColumns(args.image_column, args.panoptic_column, args.segments_info_column),
    )


def load_panoptic_training_data(args: argparse.Namespace) -> PanopticTrainingData:
    """:func:`~training.data.train_datasets.load_training_data` of :func:`panoptic_data_config`."""
    return load_training_data(panoptic_data_config(args))
