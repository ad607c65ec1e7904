"""`pipeline("image-segmentation")` on saved tiny DEARLi models: the processor's segments with its own defaults, as
the installed package and as remote code, in a fresh process; output format of the three subtasks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_dearli import DearliImageSegmentationPipeline
from training.data.package_data import COCO_PANOPTIC_SAMPLE

SAMPLE_IMAGE = COCO_PANOPTIC_SAMPLE.images / "000000142238.jpg"

# Run in a fresh process: `pipeline()` on a saved folder, each subtask with default arguments and with an explicit
# threshold, against the processor's own post-processing of the same model outputs.
FRESH_PROCESS_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from PIL import Image
    folder, image_path, mode = sys.argv[1:]
    if mode == "remote_code":
        sys.modules["modeling_dearli"] = None  # as on a machine that only has the saved folder
        kwargs = {"trust_remote_code": True}
    else:
        import modeling_dearli  # noqa: F401  (the installed package: registered model, processor and pipeline)
        kwargs = {}
    from transformers import pipeline

    pipe = pipeline("image-segmentation", model=folder, **kwargs)
    image = Image.open(image_path)
    with torch.no_grad():
        outputs = pipe.model(**pipe.image_processor(image, return_tensors="pt"))
    processor, id2label, size = pipe.image_processor, pipe.model.config.id2label, [image.size[::-1]]

    def expected(subtask, **thresholds):
        if subtask == "semantic":
            seg = processor.post_process_semantic_segmentation(outputs, target_sizes=size)[0]
            return [(id2label[c], None, seg == c) for c in seg.unique().tolist()]
        if subtask == "instance":
            r = processor.post_process_instance_segmentation(outputs, target_sizes=size, return_binary_maps=True,
                                                             **thresholds)[0]
            return [(id2label[s["label_id"]], s["score"], m) for s, m in zip(r["segments_info"], r["segmentation"])]
        r = processor.post_process_panoptic_segmentation(outputs, target_sizes=size, **thresholds)[0]
        return [(id2label[s["label_id"]], s["score"], r["segmentation"] == s["id"]) for s in r["segments_info"]]

    def same(got, want):
        return len(got) == len(want) and all(
            g["label"] == l and g["score"] == s and np.array_equal(np.asarray(g["mask"]) > 0, m.numpy())
            for g, (l, s, m) in zip(got, want))

    report = {"class": type(pipe).__module__ + "." + type(pipe).__name__}
    for subtask in ("panoptic", "semantic", "instance"):
        got = pipe(image, subtask=subtask)
        report[subtask] = {"n": len(got), "same": same(got, expected(subtask))}
    report["no_subtask_same_as_panoptic"] = same(pipe(image), expected("panoptic"))
    high = pipe(image, subtask="instance", threshold=0.9)
    report["explicit_threshold"] = {"n": len(high), "same": same(high, expected("instance", threshold=0.9))}
    print("REPORT " + json.dumps(report))
    """
)


@pytest.mark.parametrize("mode", ["installed", pytest.param("remote_code", marks=pytest.mark.slow)])
def test_pipeline_returns_the_processors_segments_with_its_defaults(trained_tiny_model_dir, mode):
    """`pipeline("image-segmentation", model=folder)` (installed package, no trust_remote_code) and
    `pipeline(..., trust_remote_code=True)` where only the folder exists: every subtask returns exactly the segments of
    `post_process_*` with the processor's defaults, an explicit `threshold=` still applies, and transformers neither
    says the model is "not supported" nor falls back to another image-processor backend."""
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK, str(trained_tiny_model_dir), str(SAMPLE_IMAGE),
                           mode], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))[7:])
    expected_module = "transformers_modules." if mode == "remote_code" else "modeling_dearli."
    assert report["class"].startswith(expected_module) and report["class"].endswith("DearliImageSegmentationPipeline")
    for subtask in ("panoptic", "semantic", "instance"):
        assert report[subtask]["same"] and report[subtask]["n"] > 0, (subtask, report)
    assert report["no_subtask_same_as_panoptic"], report
    # An explicit threshold (transformers' default, 0.9) keeps fewer instances: the processor's default (none) applied.
    assert report["explicit_threshold"]["same"] and report["explicit_threshold"]["n"] < report["instance"]["n"], report
    for noise in ("is not supported", "Falling back to", "Do you wish to run the custom code"):
        assert noise not in done.stderr, done.stderr[-3000:]


@pytest.fixture(scope="module")
def segmenter(tiny_model_with_processor_dir):
    return pipeline("image-segmentation", model=str(tiny_model_with_processor_dir))


@pytest.mark.parametrize("subtask", ["panoptic", "semantic", "instance"])
def test_pipeline_subtasks(segmenter, tiny_model, subtask):
    assert isinstance(segmenter, DearliImageSegmentationPipeline)
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


def test_pipeline_passes_instance_options(segmenter):
    """`top_k`, `min_area` and `mask_iou_threshold` reach the processor's instance post-processing (and only it)."""
    image = Image.open(SAMPLE_IMAGE)
    with torch.no_grad():
        outputs = segmenter.model(**segmenter.image_processor(image, return_tensors="pt"))
    options = {"top_k": 20, "min_area": 50, "mask_iou_threshold": 0.5}
    want = segmenter.image_processor.post_process_instance_segmentation(
        outputs, target_sizes=[image.size[::-1]], return_binary_maps=True, **options)[0]
    got = segmenter(image, subtask="instance", **options)
    assert [(r["label"], r["score"]) for r in got] == [
        (segmenter.model.config.id2label[s["label_id"]], s["score"]) for s in want["segments_info"]]
    for r, mask in zip(got, want["segmentation"], strict=True):
        assert np.array_equal(np.asarray(r["mask"]) > 0, mask.numpy())
    assert len(got) < len(segmenter(image, subtask="instance"))
    with pytest.raises(ValueError, match="instance"):
        segmenter(image, subtask="panoptic", min_area=5)


def test_pipeline_batch(segmenter):
    image = Image.open(SAMPLE_IMAGE)
    results = segmenter([image, image.convert("L")], subtask="panoptic")
    assert len(results) == 2 and all(isinstance(r, list) for r in results)
    with pytest.raises(ValueError, match="subtask"):
        segmenter(image, subtask="depth")


def test_other_models_keep_transformers_pipeline():
    """Routing the task to DEARLi's pipeline leaves every other model with transformers' own class."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from transformers.pipelines import ImageSegmentationPipeline

    config = Mask2FormerConfig(backbone_config={"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1],
                                                "num_heads": [1, 1, 1, 1], "out_features": ["stage1", "stage2",
                                                                                            "stage3", "stage4"]},
                               hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_layers=1,
                               decoder_layers=1, num_queries=4, dim_feedforward=16, encoder_feedforward_dim=16)
    pipe = pipeline("image-segmentation", model=Mask2FormerForUniversalSegmentation(config),
                    image_processor=Mask2FormerImageProcessor())
    assert type(pipe) is ImageSegmentationPipeline
