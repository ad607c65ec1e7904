"""`pipeline("image-segmentation")` on a saved tiny DEARLi with its processor: panoptic, semantic, instance."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_panoptic_sample"
SAMPLE_IMAGE = SAMPLE / "images" / "000000142238.jpg"


@pytest.fixture(scope="module")
def segmenter(tiny_model_with_processor_dir):
    return pipeline("image-segmentation", model=str(tiny_model_with_processor_dir), trust_remote_code=True)


@pytest.mark.parametrize("subtask", ["panoptic", "semantic", "instance"])
def test_pipeline_subtasks(segmenter, tiny_model, subtask):
    image = Image.open(SAMPLE_IMAGE)
    results = segmenter(image, subtask=subtask, threshold=0.0, overlap_mask_area_threshold=0.0)
    assert results, f"no {subtask} segments"
    labels = set(tiny_model.config.id2label.values())
    for r in results:
        assert set(r) == {"score", "label", "mask"}
        assert r["label"] in labels
        assert r["mask"].size == image.size and r["mask"].mode == "L"
        assert (r["score"] is None) == (subtask == "semantic")
    masks = np.stack([np.asarray(r["mask"]) > 0 for r in results])
    if subtask != "instance":  # panoptic segments and semantic classes do not overlap
        assert masks.sum(0).max() == 1
    if subtask == "semantic":  # and semantic classes cover every pixel
        assert masks.sum(0).min() == 1


def test_pipeline_batch_and_default_thresholds(segmenter):
    image = Image.open(SAMPLE_IMAGE)
    results = segmenter([image, image.convert("L")], subtask="panoptic")
    assert len(results) == 2 and all(isinstance(r, list) for r in results)


@pytest.mark.slow
def test_pipeline_with_remote_code_only(tiny_model_with_processor_dir):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_dearli"] = None  # as on a machine that only has the saved folder
        from PIL import Image
        from transformers import pipeline
        pipe = pipeline("image-segmentation", model={str(tiny_model_with_processor_dir)!r}, trust_remote_code=True)
        assert type(pipe.model).__module__.startswith("transformers_modules"), type(pipe.model).__module__
        assert type(pipe.image_processor).__module__.startswith("transformers_modules")
        image = Image.open({str(SAMPLE_IMAGE)!r})
        for subtask in ("panoptic", "semantic", "instance"):
            out = pipe(image, subtask=subtask, threshold=0.0, overlap_mask_area_threshold=0.0)
            assert out and out[0]["mask"].size == image.size, subtask
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=500)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
