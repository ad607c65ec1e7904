"""Command-line arguments shared by the training loops, with YAML presets (`--config`) that the command line overrides.

Style of transformers' ``*_no_trainer.py`` examples: one argparse parser per loop, ``help=`` on every flag. A preset is
a YAML mapping of flag names (``learning_rate`` or ``learning-rate``) to values; it replaces the parser's defaults, and
any flag given on the command line wins over it. ``--config NAME`` without a path resolves to the packaged preset
``training/configs/NAME.yaml``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CONFIG_DIR",
    "add_common_training_args",
    "add_model_args",
    "crop_size_pair",
    "load_config_file",
    "parse_args_with_config",
    "resolve_config_path",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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


def load_config_file(config: str | Path) -> dict[str, Any]:
    """Read a YAML preset into a dict with argparse-style keys (dashes become underscores)."""
    path = resolve_config_path(config)
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"Config {path} must be a YAML mapping of argument names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


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
                        f"Config {config_path}: {key}={value!r} must be a string; quote it in the YAML file (YAML reads "
                        f"e.g. 1_128 as the integer 1128)"
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


def crop_size_pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``640`` or ``[512, 640]`` -> (height, width)."""
    if isinstance(value, int):
        return (value, value)
    value = list(value)
    if len(value) == 1:
        return (int(value[0]), int(value[0]))
    if len(value) != 2:
        raise ValueError(f"crop size must be one or two ints, got {value}")
    return (int(value[0]), int(value[1]))


def add_common_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Flags every loop shares (output, schedule, optimisation, checkpoints, tracking, data loading).

    Keyword arguments override the defaults below (e.g. ``train_batch_size=16``); a `--config` preset overrides both.
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
        "lr_power": 0.9,
        "lr_warmup_steps": 0,
        "gradient_clip": 0.01,
        "train_batch_size": 16,
        "crop_size": [640],
        "min_scale": 0.1,
        "max_scale": 2.0,
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
                   help="Mixed precision: 'auto' = bf16 on GPUs that support it (else fp16), 'no' on CPU; or as given.")
    g.add_argument("--learning_rate", type=float, default=d["learning_rate"], help="AdamW peak learning rate.")
    g.add_argument("--weight_decay", type=float, default=d["weight_decay"], help="AdamW weight decay.")
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
    g.add_argument("--min_scale", type=float, default=d["min_scale"],
                   help="Smallest random scale of the crop size the image is resized to fit in.")
    g.add_argument("--max_scale", type=float, default=d["max_scale"],
                   help="Largest random scale of the crop size the image is resized to fit in.")
    g.add_argument("--flip_prob", type=float, default=d["flip_prob"], help="Probability of a horizontal flip.")
    g.add_argument("--num_workers", type=int, default=d["num_workers"], help="DataLoader worker processes.")
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
                        "names when --init_from lacks the CLIP text tower. Nothing is downloaded unless a tag needs it.")
    g.add_argument("--init_from", type=str, default=None,
                   help="Initialise from a saved DEARLi folder (save_pretrained output, e.g. of dewa.py); the class "
                        "names are switched to the dataset's.")
    g.add_argument("--keep_text_tower", action="store_true",
                   help="Keep the CLIP text tower in the model and its saved folder (allows set_class_names later).")
    g.add_argument("--num_queries", type=int, default=None, help="Override the number of object queries of a fresh model.")
    g.add_argument("--train_num_points", type=int, default=None,
                   help="Override the number of points sampled for the mask losses (default of the config).")
    g.add_argument("--model_config_overrides", type=str, default=None,
                   help='JSON dict of DearliConfig values for a fresh model, e.g. \'{"decoder_layers": 4}\' (with '
                        '--init_from only loss settings such as class_weight or train_num_points).')
    return parser
