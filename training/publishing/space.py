"""A Hugging Face Space folder for the web demo (``python app.py --export_space DIR``).

The folder runs as a Gradio Space and with ``python app.py`` anywhere the requirements are installed:

    DIR/app.py                   the demo (the repository's app.py)
    DIR/model/                   the saved model (config, safetensors weights, image processor)
    DIR/examples/                example images
    DIR/modeling_dearli/, DIR/training/   the dearli code the app imports, copied as is (Spaces start ``app.py`` from
                                 the folder, so these import without installing dearli, at exactly the exported version)
    DIR/requirements.txt         dearli's dependencies and its ``app`` extra (from pyproject.toml)
    DIR/README.md                the Space card (``sdk: gradio``, ``app_file: app.py``)

Upload it with ``hf upload <user>/<space> DIR . --repo-type space`` (weights go through the Hub's large-file storage).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = ["export_space", "space_requirements"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def space_requirements(pyproject: str | os.PathLike = REPO_ROOT / "pyproject.toml") -> list[str]:
    """dearli's dependencies plus its ``app`` extra: from ``pyproject.toml`` in a checkout, else from the installed
    distribution's metadata."""
    path = Path(pyproject)
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:
        tomllib = None
    if path.is_file() and tomllib is not None:
        project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
        return [*project["dependencies"], *project.get("optional-dependencies", {}).get("app", [])]
    from importlib.metadata import requires

    requirements = []
    for line in requires("dearli") or []:
        spec, _, marker = line.partition(";")
        if not marker.strip() or re.search(r"""extra\s*==\s*["']app["']""", marker):
            requirements.append(spec.strip())
    return requirements


def _copy_model(model: str, target: Path, revision: str | None) -> None:
    """A local folder's files (not its sub-folders: training checkpoints, logs) or a Hub snapshot."""
    source = Path(model).expanduser()
    if source.is_dir():
        target.mkdir()
        for item in sorted(source.iterdir()):
            if item.is_file():
                shutil.copy2(item, target / item.name)
        return
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=model, revision=revision, local_dir=target)


def export_space(
    output_dir: str | os.PathLike,
    app_file: str | os.PathLike,
    model: str | os.PathLike,
    examples_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    title: str = "DEARLi panoptic segmentation",
) -> Path:
    """Write the Space folder described in the module docstring; ``output_dir`` must not exist or be empty (nothing
    is overwritten). ``app_file`` is the demo's ``app.py``. Returns the folder."""
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    import modeling_dearli
    import training
    from training.evaluation.segmenter import SPACE_EXAMPLES_DIR, SPACE_MODEL_DIR, find_example_images

    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(app_file, out / "app.py")
    _copy_model(os.fspath(model), out / SPACE_MODEL_DIR, revision)
    examples = find_example_images(examples_dir)
    if examples:
        (out / SPACE_EXAMPLES_DIR).mkdir()
        for path in examples:
            shutil.copy2(path, out / SPACE_EXAMPLES_DIR / path.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in (modeling_dearli, training):
        source = Path(package.__file__).parent
        shutil.copytree(source, out / source.name, ignore=ignore)
    (out / "requirements.txt").write_text("\n".join(space_requirements()) + "\n", encoding="utf-8")
    data = SpaceCardData(title=title, sdk="gradio", sdk_version=gradio.__version__, app_file="app.py", license="mit",
                         pinned=False, tags=["image-segmentation", "panoptic-segmentation", "dearli"])
    content = (f"---\n{data.to_yaml()}\n---\n\n# {title}\n\nDEARLi (semi-supervised panoptic segmentation with CLIP "
               "and SAM) as a web demo: upload an image, choose panoptic / semantic / instance, move `ensemble_alpha` "
               "(1.0 = decoder only, 0.0 = CLIP only) and edit the vocabulary. Written by `python app.py "
               "--export_space`; run it locally with `pip install -r requirements.txt && python app.py`.\n")
    SpaceCard(content).save(out / "README.md")
    return out
