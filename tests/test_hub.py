"""Hub publishing: the repository folder loads in a fresh process without the project (Auto classes, pipeline, the
card's own snippets) and reproduces the source model; the card renders and its metadata validates offline; the upload
uses huggingface_hub as expected (mocked, no network)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from modeling_dearli.image_processing_dearli import DearliImageProcessor
from training.publishing.hub import (
    CardContext,
    count_parameters,
    load_eval_report,
    render_model_card,
    report_metrics,
    validate_model_card,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "someone/dearli-tiny-ade20k-1-128"
REPORT = {
    "All": {"pq": 0.31123, "sq": 0.7504, "rq": 0.4, "n": 3},
    "Things": {"pq": 0.2, "sq": 0.7, "rq": 0.3, "n": 1},
    "Stuff": {"pq": 0.36, "sq": 0.8, "rq": 0.45, "n": 2},
    "mIoU": 0.42,
    "per_class": {"1": {"pq": 0.2, "sq": 0.7, "rq": 0.3, "tp": 1, "fp": 1, "fn": 2, "name": "person", "isthing": True}},
    "num_images": 2,
}
CONVERSION_INFO = {
    "source_checkpoint": "DEARLi_ade20k_1_128.pth",
    "source_sha256": "ab" * 32,
    "dataset": "ade20k",
    "class_agnostic_warm_up": False,
    "text_embeddings": "re-encoded with the checkpoint's CLIP text tower",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A trained-model folder as the training scripts leave it (a tiny model with ADE20K's 150 classes, as the card's
    dataset requires): weights, a small-resolution processor, provenance."""
    from modeling_dearli import tiny_model
    from training.data.class_names import load_class_names

    path = tmp_path_factory.mktemp("model") / "dearli"
    ade20k = load_class_names("ade20k")
    model = tiny_model(class_names=list(ade20k.names), thing_ids=ade20k.thing_ids, seed=0)
    model.save_pretrained(path)
    DearliImageProcessor.from_model_config(
        model.config, size={"shortest_edge": 64, "longest_edge": 128}
    ).save_pretrained(path)
    (path / "conversion_info.json").write_text(json.dumps(CONVERSION_INFO))
    return path


@pytest.fixture(scope="module")
def repo_dir(model_dir, tmp_path_factory, load_script) -> Path:
    """The push_to_hub CLI with --local-dir and no token: writes the folder, uploads nothing."""
    tmp = tmp_path_factory.mktemp("push")
    report = tmp / "report.json"
    class_names = json.loads((model_dir / "config.json").read_text())["class_names"]  # the report is the model's
    report.write_text(json.dumps({**REPORT, "dataset": "ade20k", "partition": "1_128", "class_names": class_names}))
    local_dir = tmp / "repo"
    cli = load_script("push_to_hub")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr("huggingface_hub.get_token", lambda: None)  # no HF_TOKEN, no cached login

        def no_upload(*args, **kwargs):
            raise AssertionError("must not upload without a token")

        mp.setattr(cli, "upload_repo_folder", no_upload)
        status = cli.main(["--model_name_or_path", str(model_dir), "--repo_id", REPO_ID, "--eval_report", str(report),
                           "--local_dir", str(local_dir)])  # fmt: skip
    finally:
        mp.undo()
    assert status == 0
    return local_dir


def test_repo_folder_has_everything_remote_code_needs(repo_dir):
    names = {p.name for p in repo_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "conversion_info.json",
    } <= names
    assert {
        "modeling_dearli.py",
        "configuration_dearli.py",
        "clip_backbone.py",
        "image_processing_dearli.py",
        "pipeline_dearli.py",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    config = json.loads((repo_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForUniversalSegmentation"] == "modeling_dearli.DearliForPanopticSegmentation"
    assert config["auto_map"]["AutoModelForImageSegmentation"] == "modeling_dearli.DearliForPanopticSegmentation"
    assert config["custom_pipelines"]["image-segmentation"]["impl"] == "pipeline_dearli.DearliImageSegmentationPipeline"
    processor = json.loads((repo_dir / "preprocessor_config.json").read_text())
    assert processor["auto_map"]["AutoImageProcessor"] == "image_processing_dearli.DearliImageProcessor"
    assert processor["size"] == {"shortest_edge": 64, "longest_edge": 128}
    # Remote code must not reach into the project's training code.
    for module in repo_dir.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+(training|scripts)\b", module.read_text(), re.M), module.name


def test_card_metadata_and_text(repo_dir):
    card = ModelCard.load(repo_dir / "README.md")
    data = validate_model_card(card)
    assert data.license == "mit" and data.pipeline_tag == "image-segmentation" and data.library_name == "transformers"
    assert "custom_code" in data.tags
    values = {r.metric_type: r.metric_value for r in data.eval_results}
    assert values == {"pq": 31.12, "sq": 75.04, "rq": 40.0, "pq_things": 20.0, "pq_stuff": 36.0, "mean_iou": 42.0}
    assert {r.dataset_config for r in data.eval_results} == {"1_128"}
    assert {r.task_type for r in data.eval_results} == {"image-segmentation"}
    text = card.text
    assert "| 31.1 | 75.0 | 40.0 | 20.0 | 36.0 | 42.0 |" in text
    assert "158 labeled images" in text and "DEARLi_ade20k_1_128.pth" in text
    assert "Decoupled Enhancement of Recognition and Localization" in text and "@article{martinovic2025dearli" in text
    assert "HF_HUB_OFFLINE=1" in text and "revision=" in text and "MIT" in text and "Apache-2.0" in text
    assert "{{" not in text and "{%" not in text


def test_card_without_report_and_invalid_metadata(tiny_model):
    card = render_model_card(tiny_model.config, CardContext(repo_id="me/dearli"), count_parameters(tiny_model))
    data = validate_model_card(card)
    assert not data.eval_results and "No evaluation report" in card.text
    # huggingface_hub's own parser rejects a malformed model-index (results without metrics) ...
    broken = str(card).replace(
        "license: mit",
        "license: mit\nmodel-index:\n- name: x\n  results:\n  - task:\n      type: image-segmentation\n"
        "    dataset:\n      type: ade20k\n      name: ADE20K",
    )
    with pytest.raises(ValueError, match="model-index|model_index|eval_results"):
        validate_model_card(broken)
    # ... and our check rejects a card without a licence.
    with pytest.raises(ValueError, match="license"):
        validate_model_card(str(card).replace("license: mit\n", ""))


def test_report_metrics_percent_and_optional_miou(tmp_path):
    metrics = report_metrics(REPORT)
    assert metrics == {"PQ": 31.12, "SQ": 75.04, "RQ": 40.0, "PQ_th": 20.0, "PQ_st": 36.0, "mIoU": 42.0}
    no_miou = {k: v for k, v in REPORT.items() if k != "mIoU"}
    assert "mIoU" not in report_metrics(no_miou)
    assert report_metrics({**no_miou, "miou": 0.5})["mIoU"] == 50.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"All": REPORT["All"], "Stuff": REPORT["Stuff"]}))
    with pytest.raises(ValueError, match="Things"):
        load_eval_report(path)


def test_upload_creates_repo_branch_and_uploads_the_folder(model_dir, tmp_path, monkeypatch, load_script):
    calls = []
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw))
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("create_branch", repo_id, kw))
    )

    def upload_folder(self, **kw):
        calls.append(("upload_folder", kw["repo_id"], {**kw, "files": sorted(os.listdir(kw["folder_path"]))}))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{REPO_ID}/commit/1", commit_message="m", commit_description="", oid="1"
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.ModelCard, "validate", lambda self, repo_type=None: calls.append(("validate",)))
    cli = load_script("push_to_hub")
    status = cli.main(["--model_name_or_path", str(model_dir), "--repo_id", REPO_ID, "--token", "hf_test", "--private",
                       "--revision", "v1", "--commit_message", "DEARLi tiny"])  # fmt: skip
    assert status == 0
    names = [c[0] for c in calls]
    assert names == ["validate", "create_repo", "create_branch", "upload_folder"]
    assert calls[1][2]["exist_ok"] is True and calls[1][2]["private"] is True
    assert calls[2][2]["branch"] == "v1"
    upload = calls[3][2]
    assert upload["revision"] == "v1" and upload["commit_message"] == "DEARLi tiny" and upload["repo_type"] == "model"
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(upload["files"])
    assert set(upload["allow_patterns"]) == set(upload["files"])  # exactly what this run wrote
    # No token and no --local_dir: refuse instead of silently doing nothing.
    from training.cli import CliError

    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(CliError, match="no Hub token"):
        cli.main(["--model_name_or_path", str(model_dir), "--repo_id", REPO_ID])


@pytest.mark.slow
def test_repo_loads_in_a_fresh_process_without_the_project(repo_dir, model_dir, tmp_path):
    """Auto classes, the pipeline and the card's snippets, with `modeling_dearli` unimportable and the Hub offline;
    every output equals the source model's."""
    from modeling_dearli import DearliForPanopticSegmentation

    image = Image.fromarray((np.random.RandomState(0).rand(48, 80, 3) * 255).astype("uint8"))
    image.save(tmp_path / "image.jpg")
    image = Image.open(tmp_path / "image.jpg").convert("RGB")
    source = DearliForPanopticSegmentation.from_pretrained(model_dir).eval()
    processor = DearliImageProcessor.from_pretrained(model_dir)
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = source(**inputs)
    panoptic = processor.post_process_panoptic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
    assert panoptic["segments_info"], "the test needs at least one segment"
    torch.save(
        {
            "pixel_values": inputs["pixel_values"],
            "class_queries_logits": outputs.class_queries_logits,
            "masks_queries_logits": outputs.masks_queries_logits,
            "clip_class_logits": outputs.clip_class_logits,
            "segmentation": panoptic["segmentation"],
            "segments_info": panoptic["segments_info"],
            "labels": {s["id"]: source.config.id2label[s["label_id"]] for s in panoptic["segments_info"]},
        },
        tmp_path / "expected.pt",
    )
    card_code = "\n".join(re.findall(r"```python\n(.*?)```", (repo_dir / "README.md").read_text(), re.S))
    assert card_code.count("trust_remote_code=True") >= 4
    (tmp_path / "card_snippets.py").write_text(card_code.replace(REPO_ID, str(repo_dir)))
    check = textwrap.dedent(
        f"""
        import runpy, sys
        sys.modules["modeling_dearli"] = None  # the project package must not be importable
        import numpy as np
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, pipeline

        repo = {str(repo_dir)!r}
        expected = torch.load("expected.pt", weights_only=False)
        processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
        model = AutoModelForUniversalSegmentation.from_pretrained(repo, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__

        image = Image.open("image.jpg").convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
        with torch.no_grad():
            outputs = model(**inputs)
        for name in ("class_queries_logits", "masks_queries_logits", "clip_class_logits"):
            torch.testing.assert_close(getattr(outputs, name), expected[name], rtol=0, atol=1e-6)
        result = processor.post_process_panoptic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
        assert torch.equal(result["segmentation"], expected["segmentation"])
        assert [s["label_id"] for s in result["segments_info"]] == [s["label_id"] for s in expected["segments_info"]]

        segmenter = pipeline("image-segmentation", model=repo, trust_remote_code=True)  # AutoModelForImageSegmentation
        assert type(segmenter.model).__module__.startswith("transformers_modules")
        segments = segmenter(image, subtask="panoptic", threshold=0.0)
        assert len(segments) == len(expected["segments_info"]), (len(segments), expected["segments_info"])
        for segment, info in zip(segments, expected["segments_info"]):
            assert segment["label"] == expected["labels"][info["id"]]
            assert np.array_equal(np.array(segment["mask"]) > 0, (expected["segmentation"] == info["id"]).numpy())
        semantic = segmenter(image, subtask="semantic")
        assert semantic and all(s["mask"].size == image.size for s in semantic)

        runpy.run_path("card_snippets.py", run_name="__main__")  # the model card's usage code, as written
        print("FRESH-PROCESS-OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "FRESH-PROCESS-OK" in result.stdout, result.stderr[-4000:]
