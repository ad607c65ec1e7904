"""The web demo without a browser: vocabulary text, the Segmenter (one forward pass, several ensemble_alpha values),
model loading, app.py's missing-model message and the Space export."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.evaluation import segmenter as segmenter_module
from training.evaluation.segmenter import (
    VocabularyError,
    format_vocabulary,
    load_segmenter,
    parse_vocabulary,
)
from training.evaluation.visualization import from_panoptic

REPO = Path(__file__).resolve().parents[1]


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((120, 160, 3), dtype=np.uint8)
    pixels[:60] = (110, 170, 230)
    pixels[60:] = (60, 140, 60)
    pixels[40:100, 60:90] = (200, 40, 40)
    return Image.fromarray((pixels + rng.integers(0, 20, pixels.shape)).clip(0, 255).astype(np.uint8))


def test_vocabulary_text():
    text = "person, man ,woman\n\n# a comment\nsky [stuff]\ngrass,lawn [STUFF]\ncar [thing]\n"
    names, things = parse_vocabulary(text)
    assert names == ["person,man,woman", "sky", "grass,lawn", "car"] and things == [0, 3]
    assert len(parse_vocabulary("\n".join(f"class {i}" for i in range(1000)))[0]) == 1000
    assert parse_vocabulary(format_vocabulary(names, things)) == (names, things)
    assert format_vocabulary(names, things).splitlines()[1] == "sky [stuff]"
    for bad, message in [("", "empty"), ("# only a comment", "empty"), ("sky [amorphous]", "unknown tag"),
                         (" , [stuff]", "no class name"), ("x" * 200_000, "line 1 has 200000 characters"),
                         ("\n".join(f"class {i}" for i in range(1001)), "more than 1000 classes")]:
        with pytest.raises(VocabularyError, match=message):
            parse_vocabulary(bad)


def test_decoder_only_and_ensembled_from_one_forward_pass(tiny_model_with_text_tower_dir):
    segmenter = load_segmenter(tiny_model_with_text_tower_dir)
    calls = []
    segmenter.model.register_forward_hook(lambda *args: calls.append(1))
    image = _image()
    decoder_only, ensembled = segmenter.predict(image, "panoptic", [1.0, 0.3])
    assert len(calls) == 1
    # The same as running the model and the processor by hand.
    processor, model = segmenter.processor, segmenter.model
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    for prediction, alpha in ((decoder_only, 1.0), (ensembled, 0.3)):
        reference = from_panoptic(processor.post_process_panoptic_segmentation(
            outputs, target_sizes=[(120, 160)], ensemble_alpha=alpha)[0], id2label, model.config.thing_ids)
        assert prediction.ensemble_alpha == alpha
        assert np.array_equal(prediction.result.id_map, reference.id_map)
        expected = sorted(reference.segments, key=lambda s: (-s.area, s.id))
        assert [(s.label, round(s.score, 3), s.area) for s in expected] == [tuple(row) for row in prediction.rows]
        assert prediction.picture.width == 160 and prediction.picture.height > 120  # overlay + legend
    # Another task or weight on the same image re-uses the forward pass.
    calls.clear()
    (semantic,) = segmenter.predict(image, "semantic", [None])
    assert not calls and semantic.ensemble_alpha == pytest.approx(model.config.ensemble_alpha)
    assert sum(row[2] for row in semantic.rows) == 120 * 160 and all(row[1] is None for row in semantic.rows)
    segmenter.predict(_image(seed=1), "instance", [0.6])
    assert len(calls) == 1


def test_vocabulary_change(tiny_model_with_text_tower_dir):
    segmenter = load_segmenter(tiny_model_with_text_tower_dir)
    assert segmenter.can_change_vocabulary
    assert segmenter.set_vocabulary(segmenter.vocabulary_text) is False  # unchanged text: nothing to do
    assert segmenter.set_vocabulary("cat, kitten\ndog\nsnow [stuff]\nroad [stuff]") is True
    config = segmenter.model.config
    assert config.id2label == {0: "cat", 1: "dog", 2: "snow", 3: "road"} and config.thing_ids == [0, 1]
    assert segmenter.processor.num_labels == 4 and segmenter.processor.label_ids_to_fuse == [2, 3]
    (prediction,) = segmenter.predict(_image(), "semantic", [0.5])
    assert {row[0] for row in prediction.rows} <= {"cat", "dog", "snow", "road"}
    # A vocabulary given with the request is applied first (and the forward pass re-run).
    (prediction,) = segmenter.predict(_image(), "semantic", [0.5], vocabulary="tree [stuff]\nbird")
    assert {row[0] for row in prediction.rows} <= {"tree", "bird"} and config.thing_ids == [1]
    with pytest.raises(VocabularyError, match="unknown tag"):
        segmenter.set_vocabulary("tree [plant]")


def test_model_without_text_tower_keeps_its_vocabulary(tiny_model_dir):
    segmenter = load_segmenter(tiny_model_dir)  # no preprocessor_config.json: the processor of its config
    assert not segmenter.can_change_vocabulary
    assert segmenter.processor.label_ids_to_fuse == [1, 2]
    assert segmenter.set_vocabulary(segmenter.vocabulary_text) is False
    with pytest.raises(VocabularyError, match="keep_text_tower"):
        segmenter.set_vocabulary("cat\ndog")
    assert segmenter.class_names == ["person,man,woman", "sky", "grass,lawn"]


def test_load_segmenter_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_segmenter(tmp_path / "runs" / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_segmenter(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mask2former"}))
    with pytest.raises(ValueError, match="not DEARLi"):
        load_segmenter(other)


def _load_app():
    spec = importlib.util.spec_from_file_location("dearli_app", REPO / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_app_without_its_default_model_says_which_command_creates_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(segmenter_module, "DEFAULT_MODEL_DIR", tmp_path / "outputs" / "demo" / "dearli")
    assert _load_app().main([]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert segmenter_module.DEFAULT_MODEL_COMMAND in error and "--model" in error and "dearli" in error


def test_export_space(tiny_model_with_text_tower_dir, tmp_path):
    pytest.importorskip("gradio")
    from huggingface_hub import SpaceCard

    from training.publishing.space import export_space

    examples = tmp_path / "examples"
    examples.mkdir()
    _image().save(examples / "scene.png")
    (examples / "notes.txt").write_text("not an image")
    space = export_space(tmp_path / "space", REPO / "app.py", tiny_model_with_text_tower_dir, examples)
    assert (space / "app.py").read_text() == (REPO / "app.py").read_text()
    assert {p.name for p in (space / "model").iterdir()} >= {"config.json", "model.safetensors",
                                                              "preprocessor_config.json"}
    assert [p.name for p in (space / "examples").iterdir()] == ["scene.png"]
    for module in ("modeling_dearli/modeling_dearli.py", "training/evaluation/segmenter.py",
                   "training/evaluation/visualization.py"):
        assert (space / module).read_text() == (REPO / module).read_text()
    assert not list(space.rglob("__pycache__"))
    requirements = (space / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("gradio") for r in requirements) and any(r.startswith("torch") for r in requirements)
    card = SpaceCard.load(space / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    with pytest.raises(FileExistsError):
        export_space(space, REPO / "app.py", tiny_model_with_text_tower_dir, examples)
