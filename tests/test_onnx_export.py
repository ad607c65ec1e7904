"""ONNX export (training/deployment): the traced forward equals the model's, and the exported graph in onnxruntime
gives PyTorch's outputs and segments at other batch and image sizes than the tracing example's, in
scripts/predict.py --onnx and in the web demo's Segmenter and app.py --onnx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.package_data import COCO_PANOPTIC_SAMPLE
from training.deployment.onnx_export import METADATA_FILE, exportable

SAMPLE = COCO_PANOPTIC_SAMPLE.root
OUTPUTS = ("class_queries_logits", "masks_queries_logits", "clip_class_logits")


def test_exported_forward_equals_the_model_and_leaves_it_unchanged(tiny_model):
    """The module handed to torch.onnx.export (transformers' decoder forwards, reference points from arange) gives
    the default forward's outputs at several sizes; the model is restored afterwards."""
    before = tiny_model.config.decoder_implementation
    with torch.no_grad():
        for shape in [(2, 3, 64, 96), (1, 3, 128, 64)]:
            pixel_values = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[2]))
            expected = tiny_model(pixel_values=pixel_values, output_clip_logits=True)
            with exportable(tiny_model) as module:
                assert tiny_model.config.decoder_implementation == "transformers"
                got = module(pixel_values)
            for name, value in zip(OUTPUTS, got, strict=True):
                torch.testing.assert_close(value, getattr(expected, name), atol=1e-5, rtol=1e-5)
    assert tiny_model.config.decoder_implementation == before and not tiny_model.training
    assert "get_reference_points" not in vars(tiny_model.pixel_decoder.encoder)


def test_runtime_refuses_other_folders_and_vocabularies(tiny_model, tmp_path):
    from training.deployment.onnx_runtime import DearliOnnxModel

    with pytest.raises(FileNotFoundError, match=METADATA_FILE):
        DearliOnnxModel(tmp_path, tiny_model.config)
    (tmp_path / METADATA_FILE).write_text('{"class_names": [')
    with pytest.raises(ValueError, match=f"{tmp_path / METADATA_FILE} is not valid JSON"):
        DearliOnnxModel(tmp_path, tiny_model.config)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"class_names": ["cat", "dog", "sky"], "thing_ids": [0, 1]}))
    with pytest.raises(ValueError, match="export again"):
        DearliOnnxModel(tmp_path, tiny_model.config)


@pytest.fixture(scope="module")
def exported(tiny_model_with_processor_dir, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from transformers import AutoModelForUniversalSegmentation

    from training.deployment.onnx_export import export_onnx

    model = AutoModelForUniversalSegmentation.from_pretrained(tiny_model_with_processor_dir).eval()
    folder = tmp_path_factory.mktemp("onnx")
    export_onnx(model, folder, example_size=(96, 128))
    return folder


@pytest.mark.slow
def test_onnx_outputs_and_segments_equal_pytorch(exported, tiny_model_with_processor_dir):
    """Batch 2 of two images of different sizes (padding, another padded size than the tracing example's): outputs
    within 1e-3, and the same panoptic segments."""
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    from training.deployment.onnx_runtime import DearliOnnxModel

    model = AutoModelForUniversalSegmentation.from_pretrained(tiny_model_with_processor_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_model_with_processor_dir)
    runtime = DearliOnnxModel(exported, model.config)
    images = [Image.open(p).convert("RGB") for p in sorted((SAMPLE / "images").glob("*.jpg"))]
    inputs = processor(images, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) != (96, 128)
    with torch.no_grad():
        expected = model(**inputs)
    got = runtime(**inputs)
    for name in OUTPUTS:
        assert (getattr(got, name) - getattr(expected, name)).abs().max() < 1e-3, name
    assert torch.equal(got.unpadded_sizes, expected.unpadded_sizes)
    sizes = [im.size[::-1] for im in images]
    want = processor.post_process_panoptic_segmentation(expected, target_sizes=sizes)
    have = processor.post_process_panoptic_segmentation(got, target_sizes=sizes)
    for w, h in zip(want, have, strict=True):
        assert torch.equal(w["segmentation"], h["segmentation"])
        assert [s["label_id"] for s in w["segments_info"]] == [s["label_id"] for s in h["segments_info"]]


@pytest.mark.slow
def test_predict_and_segmenter_run_the_export(exported, tiny_model_with_processor_dir, load_script, tmp_path):
    """predict.py --onnx writes the PNGs that predict.py writes with the PyTorch model; the web demo's Segmenter
    runs on the graph (a fixed vocabulary)."""
    from training.deployment.onnx_runtime import load_onnx_segmenter

    predict = load_script("predict")
    common = [str(SAMPLE / "images"), "--model_name_or_path", str(tiny_model_with_processor_dir), "--no_overlay",
              "--num_workers", "0", "--batch_size", "2"]
    assert predict.main([*common, "--output_dir", str(tmp_path / "torch"), "--device", "cpu"]) == 0
    assert predict.main([*common, "--output_dir", str(tmp_path / "onnx"), "--onnx", str(exported)]) == 0
    for png in sorted((tmp_path / "torch").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "onnx" / png.name)))
    segmenter = load_onnx_segmenter(exported, tiny_model_with_processor_dir)
    assert not segmenter.can_change_vocabulary
    image = Image.open(next((SAMPLE / "images").glob("*.jpg")))
    predictions = segmenter.predict(image, "panoptic", [1.0, 0.6])
    assert len(predictions) == 2 and predictions[0].picture.size[0] == image.width


@pytest.mark.slow
def test_app_onnx_segments_as_the_pytorch_app(exported, tiny_model_with_processor_dir):
    """app.py --onnx: the page's segmenter runs the graph and gives the PyTorch page's segments on one image, for the
    decoder-only and an ensembled result (the same segments in the same order; outputs within 1e-5 may flip a pixel
    where two masks tie: measured 1 of 270,000); its vocabulary is fixed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dearli_app", Path(__file__).resolve().parents[1] / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    model = str(tiny_model_with_processor_dir)
    torch_page = app.load_app_segmenter(model, app.parse_args(["--model", model, "--device", "cpu"]))
    onnx_page = app.load_app_segmenter(model, app.parse_args(["--model", model, "--onnx", str(exported)]))
    assert not onnx_page.can_change_vocabulary and onnx_page.vocabulary_text == torch_page.vocabulary_text
    image = SAMPLE / "images" / sorted(p.name for p in (SAMPLE / "images").glob("*.jpg"))[0]
    for want, have in zip(torch_page.predict(image, "panoptic", [1.0, 0.6]),
                          onnx_page.predict(image, "panoptic", [1.0, 0.6]), strict=True):
        assert want.result.segments and [s.label for s in want.result.segments] == [s.label for s in
                                                                                     have.result.segments]
        assert (want.result.id_map != have.result.id_map).mean() < 1e-4
        assert want.picture.size == have.picture.size
    with pytest.raises(ValueError, match="CPU"):
        app.load_app_segmenter(model, app.parse_args(["--model", model, "--onnx", str(exported), "--device", "cuda"]))


@pytest.mark.parametrize("opset_version", [5, 17, "newest + 1"])
def test_export_refuses_an_opset_it_cannot_write_before_loading_the_model(
    opset_version, tiny_model_with_processor_dir, tmp_path, load_script, capsys, monkeypatch
):
    """An opset below torch.onnx's (written as 18 after a failed conversion) or newer than onnx / onnxruntime know is
    one line naming the supported range, before the model loads; ``--help`` states the range."""
    pytest.importorskip("onnx")
    from training import cli
    from training.deployment.onnx_export import MIN_OPSET_VERSION, max_opset_version

    newest = max_opset_version()
    if opset_version == "newest + 1":
        opset_version = newest + 1
    export = load_script("export_onnx")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(export, "load_model_and_processor", no_model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run(export.main, ["--model_name_or_path", str(tiny_model_with_processor_dir), "--output_dir",
                              str(tmp_path / "out"), "--opset_version", str(opset_version)])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"opset {opset_version} cannot be exported" in err and f"{MIN_OPSET_VERSION} to {newest}" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        export.parse_args(["--help"])
    assert f"from {MIN_OPSET_VERSION}" in " ".join(capsys.readouterr().out.split())


def test_minimum_opset_is_the_one_torch_onnx_translates_to():
    """MIN_OPSET_VERSION restates torch.onnx's translation opset (no public name): it must follow torch."""
    constants = pytest.importorskip("torch.onnx._internal.exporter._constants")
    from training.deployment.onnx_export import MIN_OPSET_VERSION

    assert constants.TORCHLIB_OPSET == MIN_OPSET_VERSION


def test_newest_opset_runs_in_onnxruntime_and_the_next_does_not():
    pytest.importorskip("onnxruntime")
    import onnx

    from training.deployment.onnx_export import _onnxruntime_runs_opset, max_opset_version

    newest = max_opset_version()
    assert newest <= onnx.defs.onnx_opset_version()
    assert _onnxruntime_runs_opset(newest) and not _onnxruntime_runs_opset(newest + 1)


def test_export_refuses_a_graph_written_at_another_opset_than_asked(tiny_model, tmp_path, monkeypatch):
    """Where torch.onnx writes another opset than asked (its conversion failed), nothing is saved."""
    from types import SimpleNamespace

    from training.deployment.onnx_export import MIN_OPSET_VERSION, export_onnx

    saved = []
    program = SimpleNamespace(model=SimpleNamespace(opset_imports={"": MIN_OPSET_VERSION}), save=saved.append)
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: program)
    with pytest.raises(RuntimeError, match=f"wrote opset {MIN_OPSET_VERSION} instead of the requested"):
        export_onnx(tiny_model, tmp_path, opset_version=MIN_OPSET_VERSION + 2)
    assert not saved and not list(tmp_path.iterdir())
