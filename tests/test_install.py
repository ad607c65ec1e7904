"""A non-editable install works on its own: class names, partitions, the sample, presets, a tiny model and
post-processing from the installed package, run from a directory outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    from PIL import Image

    import modeling_dearli
    import training
    from modeling_dearli import DearliImageProcessor
    from modeling_dearli.presets import tiny_model
    from training.arguments import resolve_config_path
    from training.data.package_data import COCO_PANOPTIC_SAMPLE, DATA_DIR
    from training.data.class_names import load_class_names
    from training.data.partitions import partition_keys

    site = Path(sys.argv[1]).resolve()
    for module in (modeling_dearli, training):  # the installed copy, not the checkout
        assert site in Path(module.__file__).resolve().parents, module.__file__
    assert site in DATA_DIR.resolve().parents, DATA_DIR
    assert len(load_class_names("ade20k")) == 150 and len(load_class_names("coco_panoptic")) == 133
    assert len(partition_keys("ade20k", "1_128")) == 158 and len(partition_keys("coco", "1_512")) == 232
    assert resolve_config_path("ssl_ade20k_1_128").is_file()
    assert (DATA_DIR / "class_names" / "LICENSE-DEARLi-reference.txt").is_file()

    names = load_class_names("coco_panoptic")
    model = tiny_model(class_names=list(names.names[:3]), thing_ids=[0, 1], seed=0).eval()
    processor = DearliImageProcessor.from_model_config(model.config, size={"shortest_edge": 64, "longest_edge": 96})
    image = Image.open(COCO_PANOPTIC_SAMPLE.images / "000000439180.jpg")
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    result = processor.post_process_panoptic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    assert tuple(result["segmentation"].shape) == image.size[::-1]
    print("INSTALLED-OK", len(result["segments_info"]))
    """
)


@pytest.mark.slow
def test_non_editable_install_works_from_another_directory(tmp_path):
    """`pip install --no-deps --no-build-isolation <repo>` into a fresh venv (dependencies from the system site), then
    the package's data, presets, a tiny model and post-processing from a directory outside the repository."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "runs",
                                                                "outputs", ".pytest_cache", ".ruff_cache"))
    venv = tmp_path / "venv"
    # Without its own pip and setuptools (Python 3.11's bundled setuptools 65 cannot build wheels without `wheel`): the
    # system's pip and setuptools >= 70.1 build, and install into the venv.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              str(source)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, env=env, check=True).stdout.strip()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(source)  # nothing may point back at the sources
    done = subprocess.run([str(python), "-c", CHECK, site], capture_output=True, text=True, env=env, cwd=elsewhere,
                          timeout=600)
    assert done.returncode == 0 and "INSTALLED-OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
