"""Loading a saved DEARLi (a ``save_pretrained`` folder or a Hub id) for the command-line tools.

- No code from a model folder runs unless the user asks (``trust_remote_code=True``, the scripts'
  ``--trust_remote_code``): importing :mod:`modeling_dearli` registers its config, model and image processor with the
  Auto classes, so our own models load with the installed code; a folder whose model type needs its own code is
  refused with a message saying so.
- A local path that does not exist is reported as such at once, never tried on the Hub.
- A folder without ``preprocessor_config.json`` gets the image processor matching its config.
- Weights holding NaN or inf (a damaged file, a diverged run) are refused, naming the first such tensor: such a model
  would segment nothing, without a word.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "add_model_arguments",
    "check_finite_weights",
    "check_model_location",
    "first_non_finite_tensor",
    "load_image_processor",
    "load_model_and_processor",
]

logger = logging.getLogger(__name__)

# What the Hub accepts as a repository id: "name" or "namespace/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def add_model_arguments(parser: Any) -> None:
    """The command-line flags of the model to load: ``--model_name_or_path`` (``--model`` accepted, hidden) and
    ``--trust_remote_code`` (a :class:`training.cli.ArgumentParser`)."""
    parser.add_argument("--model_name_or_path", required=True,
                        help="Model folder (save_pretrained output, with its image processor) or Hub id.")
    parser.add_hidden_alias("--model", "--model_name_or_path")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow the model folder's own Python code to run, for a model type this package does not "
                             "provide (DEARLi models always use the installed code); review the code first.")


def check_model_location(name_or_path: str | os.PathLike) -> str:
    """`name_or_path` if it is a model folder or a Hub id; ``FileNotFoundError`` for a local path that does not exist
    (anything that is not a Hub id, or whose first component is an existing folder, e.g. ``runs/missing``) and for a
    folder without ``config.json``."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{text} has no config.json: not a model folder (save_pretrained output)")
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"{text} is a file; give a model folder (save_pretrained output) or a Hub id")
    first = Path(text.replace("\\", "/").split("/")[0]).expanduser()
    if not _HUB_ID.match(text) or ("/" in text and first.is_dir()):
        raise FileNotFoundError(f"model folder {text} does not exist")
    return text


def first_non_finite_tensor(model: Any) -> str | None:
    """The name of the first floating-point tensor of `model`'s state dict that holds NaN or inf, or ``None``. Only
    what a checkpoint stores is checked: non-persistent buffers such as OpenCLIP's causal attention mask legitimately
    hold -inf."""
    import torch

    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite_weights(model: Any, location: str | os.PathLike) -> Any:
    """Return `model` (loaded from `location`); raise ``ValueError`` naming the first tensor holding NaN or inf."""
    name = first_non_finite_tensor(model)
    if name is not None:
        raise ValueError(f"the model in {location} holds non-finite values (NaN or inf) in {name}: its weights are "
                         "damaged or come from a run that diverged")
    return model


def load_image_processor(name_or_path: str, config: Any, trust_remote_code: bool = False,
                         revision: str | None = None) -> Any:
    """The model's saved image processor, or ``DearliImageProcessor.from_model_config(config)`` (its classes, stuff
    classes and ensembling weight) when the folder has none."""
    from transformers import AutoImageProcessor

    from modeling_dearli import DearliImageProcessor

    path = Path(name_or_path)
    if path.is_dir() and not (path / "preprocessor_config.json").is_file():
        logger.info("%s has no preprocessor_config.json: using DearliImageProcessor.from_model_config", path)
        return DearliImageProcessor.from_model_config(config)
    return AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)


def load_model_and_processor(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False,
                             revision: str | None = None) -> tuple[Any, Any]:
    """``(model, image processor)`` of a saved DEARLi in eval mode; see the module docstring. `revision` pins a Hub
    commit (review remote code at that commit before trusting it)."""
    from transformers import AutoConfig, AutoModelForUniversalSegmentation

    import modeling_dearli  # noqa: F401  (registers the DEARLi Auto classes: our models need no remote code)

    location = check_model_location(name_or_path)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, revision=revision)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ValueError(f"{location} holds a model whose code lives in its folder (not a DEARLi model of this "
                         "package); it is only run with --trust_remote_code, after you have reviewed it") from error
    model = AutoModelForUniversalSegmentation.from_pretrained(location, config=config, revision=revision,
                                                              trust_remote_code=trust_remote_code)
    check_finite_weights(model, location)
    return model.eval(), load_image_processor(location, model.config, trust_remote_code, revision)
