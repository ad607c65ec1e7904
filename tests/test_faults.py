"""The fault suite: bad input as a careless or hostile user gives it, table by table, each case asserting its
outcome — a clear one-line error, a logged and counted skip, or the correct result — with the inputs unchanged.

Tables: the image reader (every PIL mode, broken files), the one reader in every consumer (16-bit images), vocabularies
(``set_class_names``, ``DearliConfig``), checkpoints (missing, unreadable, tampered and interrupted), the command lines
(predict, evaluate, evaluate_panoptic, push_to_hub, generate_sam_masks: overwriting, names, ranges, remote code, missing
paths, exit codes) and a training run with an unreadable image.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_dearli.image_reading import read_image, to_rgb
from training import cli

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
def tree_digest(*folders: Path) -> dict[str, str]:
    """Every file under `folders` -> sha256, to assert that inputs are unchanged."""
    digest = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a command as its ``__main__`` does (:func:`training.cli.run`): ``(exit code, stderr)``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run(main, argv)
    code = stop.value.code
    return (0 if code is None else code), capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> None:
    """The error is one line, the last one (progress bars may come before it), and there is no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


class Malicious:
    """Unpickling this object writes a marker file: what a tampered pickle could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


# --------------------------------------------------------------------------------------------------------------------
# 1. The image reader: one function, every mode (item 3)
# --------------------------------------------------------------------------------------------------------------------
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (6, 10), dtype=np.uint8)
GRAY16 = (np.arange(60, dtype=np.uint32).reshape(6, 10) * 1111).astype(np.uint16)  # 0 .. 65 549 -> spans 16 bits


def _palette_image(transparent: bool) -> tuple[Image.Image, np.ndarray]:
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (6, 10), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.flatten().tolist())
    if transparent:
        image.info["transparency"] = int(index[0, 0])
    return image, palette[index]


def _exif_rotated() -> tuple[Image.Image, np.ndarray, dict]:
    image = Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: the stored image must be rotated 90 degrees clockwise to be viewed
    return image, np.rot90(RGB, k=-1), {"exif": exif.tobytes()}


def _sixteen_bit() -> tuple[Image.Image, np.ndarray]:
    buffer = io.BytesIO()
    Image.fromarray(GRAY16).save(buffer, "PNG")  # a real 16-bit grayscale PNG
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode in ("I;16", "I;16B", "I")
    scaled = np.rint(GRAY16 / 257.0).astype(np.uint8)
    return image, np.repeat(scaled[..., None], 3, axis=2)


MODES = {  # name -> (PIL image, expected 8-bit RGB from read_image, save options)
    "rgb": lambda: (Image.fromarray(RGB), RGB),
    "exif_orientation": _exif_rotated,
    "palette": lambda: _palette_image(False),
    "palette_with_transparency": lambda: _palette_image(True),
    "grayscale": lambda: (Image.fromarray(GRAY), np.repeat(GRAY[..., None], 3, axis=2)),
    "bilevel": lambda: (Image.fromarray(GRAY > 127), np.repeat(((GRAY > 127) * 255).astype(np.uint8)[..., None], 3, 2)),
    "rgba_alpha_dropped": lambda: (Image.fromarray(np.dstack([RGB, GRAY])), RGB),
    "la_alpha_dropped": lambda: (Image.fromarray(np.dstack([GRAY, GRAY[::-1]]), "LA"),
                                 np.repeat(GRAY[..., None], 3, axis=2)),
    "16_bit_scaled_not_clipped": _sixteen_bit,
    "32_bit_integer_16_bit_values": lambda: (Image.fromarray(GRAY16.astype(np.int32), "I"),
                                             np.repeat(np.rint(GRAY16 / 257.0).astype(np.uint8)[..., None], 3, 2)),
    "float_in_0_1": lambda: (Image.fromarray(GRAY.astype(np.float32) / 255, "F"), np.repeat(GRAY[..., None], 3, 2)),
    "cmyk": lambda: (Image.fromarray(RGB).convert("CMYK"), np.asarray(Image.fromarray(RGB).convert("CMYK")
                                                                       .convert("RGB"))),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_reader_mode(mode, tmp_path):
    image, expected, *options = MODES[mode]()
    path = tmp_path / f"{mode}.{'tiff' if image.mode in ('F', 'I', 'CMYK') else 'png'}"
    image.save(path, **(options[0] if options else {}))
    before = tree_digest(tmp_path)
    for result in (read_image(path), read_image(path.read_bytes())):
        assert result.mode == "RGB" and np.array_equal(np.asarray(result), expected), mode
    if mode != "exif_orientation":  # a decoded image is converted as it is (orientation is the file reader's job)
        assert np.array_equal(np.asarray(to_rgb(Image.open(path))), expected)
    assert tree_digest(tmp_path) == before


def test_sixteen_bit_was_clipped_by_convert():
    """The failure the reader fixes: PIL's convert("RGB") saturates 16-bit images."""
    image, expected = _sixteen_bit()
    clipped = np.asarray(image.convert("RGB"))
    assert (clipped == 255).mean() > 0.9 and (expected == 255).mean() < 0.05


BROKEN = {  # name -> (file bytes, what the message says)
    "truncated_jpeg": (lambda: _jpeg_bytes()[:400], "cannot read image"),
    "not_an_image": (lambda: b"hello, I am a text file", "cannot identify"),
    "empty_file": (lambda: b"", "cannot identify"),
    "decompression_bomb": (lambda: _bomb_bytes(), "decompression bomb"),
}


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _bomb_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, "PNG")  # 400 M pixels in a few kB: PIL refuses to decode it
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_reader_broken_file_names_it(case, tmp_path):
    data, fragment = BROKEN[case]
    path = tmp_path / f"{case}.jpg"
    path.write_bytes(data())
    with pytest.raises(OSError, match="cannot read image") as error:
        read_image(path)
    assert str(path) in str(error.value) and fragment.lower() in str(error.value).lower()


# --------------------------------------------------------------------------------------------------------------------
# 2. Every consumer reads through the one reader: a 16-bit image gives what its 8-bit version gives (item 3)
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sixteen_bit_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 16-bit grayscale PNG (48 x 64, smooth ramp) and the 8-bit RGB PNG of the same picture."""
    folder = tmp_path_factory.mktemp("sixteen_bit")
    ramp = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "deep.png")
    eight = np.repeat(np.rint(ramp / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    (folder / "eight").mkdir()
    Image.fromarray(eight).save(folder / "eight" / "deep.png")
    return folder / "deep.png", folder / "eight" / "deep.png"


def _consumer_training_dataset(path: Path) -> torch.Tensor:
    from training.data.train_datasets import UnlabeledTrainDataset

    return UnlabeledTrainDataset([{"image": str(path), "image_id": 0}], None)[0]["pixel_values"]


def _consumer_sam_masks(path: Path) -> torch.Tensor:
    from training.data.mask_generation import list_image_items

    (item,) = list_image_items([path])
    return torch.from_numpy(np.asarray(item.load()).copy())


def _consumer_evaluation_row(path: Path) -> torch.Tensor:
    import datasets

    from training.data.train_datasets import row_image, without_image_decoding

    rows = datasets.Dataset.from_dict({"image": [str(path)]}, features=datasets.Features({"image": datasets.Image()}))
    return torch.from_numpy(np.asarray(row_image(without_image_decoding(rows)[0])).copy())


def _consumer_processor(path: Path) -> torch.Tensor:
    from modeling_dearli import DearliImageProcessor

    return DearliImageProcessor(do_resize=False)(Image.open(path))["pixel_values"]


CONSUMERS = {"training_dataset": _consumer_training_dataset, "sam_masks": _consumer_sam_masks,
             "evaluation_rows": _consumer_evaluation_row, "image_processor": _consumer_processor}


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_sixteen_bit_image_in_every_consumer(consumer, sixteen_bit_pair):
    deep, eight = sixteen_bit_pair
    got, want = CONSUMERS[consumer](deep), CONSUMERS[consumer](eight)
    assert torch.equal(got, want), consumer
    assert float(got.float().std()) > 0  # not a saturated, uniform picture


def test_sixteen_bit_image_in_predict(sixteen_bit_pair, load_script, tiny_model_with_processor_dir, tmp_path):
    deep, eight = sixteen_bit_pair
    predict = load_script("predict")
    for source, out in ((deep, tmp_path / "deep"), (eight, tmp_path / "eight")):
        assert predict.main([str(source), "--model_name_or_path", str(tiny_model_with_processor_dir), "--output_dir",
                             str(out), "--device", "cpu", "--num_workers", "0"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "deep" / "deep.png")),
                          np.asarray(Image.open(tmp_path / "eight" / "deep.png")))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "deep" / "deep_overlay.png")),
                          np.asarray(Image.open(tmp_path / "eight" / "deep_overlay.png")))


# --------------------------------------------------------------------------------------------------------------------
# 3. Vocabularies are validated before anything changes (item 5)
# --------------------------------------------------------------------------------------------------------------------
BAD_VOCABULARIES = {  # name -> (class_names, thing_ids, message)
    "empty": ([], None, "empty"),
    "duplicate_class": (["cat", "dog", "cat"], None, "share the name 'cat'"),
    "synonym_of_another_class": (["person,man", "woman,man"], None, "share the name 'man'"),
    "same_name_other_case": (["Cat", "cat"], None, "share the name 'cat'"),
    "thing_id_out_of_range": (["a", "b", "c"], [3], r"\[3\] are not class indices"),
    "negative_thing_id": (["a", "b"], [-1], r"\[-1\] are not class indices"),
    "repeated_thing_id": (["a", "b"], [0, 0], "repeated"),
    "bool_thing_id": (["a", "b"], [True], "integer class indices"),
    "float_thing_id": (["a", "b"], [0.5], "integer class indices"),
    "a_string_not_a_list": ("cat,dog", None, "list of class names"),
}


@pytest.mark.parametrize("case", sorted(BAD_VOCABULARIES))
def test_bad_vocabulary_is_refused_and_changes_nothing(case, tiny_model):
    import copy

    from modeling_dearli import DearliConfig

    names, things, message = BAD_VOCABULARIES[case]
    with pytest.raises((ValueError, TypeError), match=message):
        DearliConfig(class_names=names, thing_ids=things, clip_model_config=tiny_model.config.clip_model_config)
    model = copy.deepcopy(tiny_model)
    model.text_encoder = model.text_encoder or _tiny_text_encoder()
    before = (model.config.to_json_string(), model.text_embeddings.clone(), model.text_class_index.clone())
    with pytest.raises((ValueError, TypeError), match=message):
        model.set_class_names(names, things)
    assert model.config.to_json_string() == before[0]
    assert torch.equal(model.text_embeddings, before[1]) and torch.equal(model.text_class_index, before[2])
    with torch.no_grad():  # the model still works with its old classes
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.class_queries_logits.shape[-1] == len(model.config.class_names) + 1


def _tiny_text_encoder():
    from modeling_dearli import tiny_model

    return tiny_model(class_names=["x"], keep_text_tower=True, seed=0).text_encoder


def test_repeated_synonym_within_one_class_is_accepted():
    """ADE20K's own list repeats "kitchen range" inside the stove class: harmless (max over synonyms), accepted."""
    from modeling_dearli import DearliConfig
    from modeling_dearli.presets import TINY_CLIP_MODEL_CONFIG

    config = DearliConfig(class_names=["stove,kitchen range,kitchen range", "wall"], thing_ids=[0],
                          clip_model_config=TINY_CLIP_MODEL_CONFIG)
    assert config.label2id == {"stove": 0, "wall": 1}


# --------------------------------------------------------------------------------------------------------------------
# 4. Checkpoints: all or nothing, no pickled objects, exact random streams (items 2 and 6)
# --------------------------------------------------------------------------------------------------------------------
class Counter:
    """Extra checkpointed state of a loop (like the EMA teacher): tensors and JSON values."""

    def __init__(self) -> None:
        self.weights = {"w": torch.zeros(3)}
        self.step = 0

    def state_dict(self) -> dict:
        return {"weights": {k: v.clone() for k, v in self.weights.items()}, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.step = dict(state["weights"]), int(state["step"])


def _tiny_run(seed: int):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


@pytest.fixture()
def saved_run(tmp_path, fresh_accelerate_state):
    """A real checkpoint after two optimiser steps (model, optimizer, scheduler, RNG, progress, extra state) and the
    random numbers the saved run draws next."""
    from training.checkpointing import TrainingProgress, save_checkpoint

    accelerator, model, optimizer, scheduler = _tiny_run(0)
    for _ in range(2):
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    progress, counter = TrainingProgress(), Counter()
    progress.step, progress.skipped_samples = 2, ["bad.jpg"]
    counter.weights["w"] += 1.5
    counter.step = 2
    path = save_checkpoint(accelerator, model, progress, tmp_path / "run", states={"counter": counter})
    expected = {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "draw": (torch.rand(4), np.random.rand(3), __import__("random").random())}
    return path, expected


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


TAMPERINGS = {  # name -> (what is done to the checkpoint folder, the refusal's words; None = resumes exactly)
    "intact": (lambda c: None, None),
    "missing_rng_state": (lambda c: (c / "rng_state_0.json").unlink(), "rng_state_0.json is missing"),
    "missing_accelerate_random_states": (lambda c: (c / "random_states_0.pkl").unlink(),
                                         "random_states_0.pkl is missing"),
    "missing_model_weights": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "truncated_model_weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors cannot be read"),
    "truncated_optimizer": (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin cannot be read"),
    "corrupt_training_state": (lambda c: (c / "training_state.json").write_text("{"),
                               "training_state.json cannot be read"),
    "missing_extra_state": (lambda c: (c / "counter.safetensors").unlink(), "counter.safetensors is missing"),
    "interrupted_save": (lambda c: (c / "COMPLETE").unlink(), "COMPLETE is missing"),
    "pickled_custom_state": (lambda c: (c / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Malicious(
        c.parent.parent / "MARKER"))), "custom_checkpoint_0.pkl is a pickle"),
    "raw_pickle_as_random_states": (lambda c: (c / "random_states_0.pkl").write_bytes(pickle.dumps(Malicious(
        c.parent.parent / "MARKER"))), "random_states_0.pkl cannot be read (not a torch archive)"),
    # A well-formed torch archive holding a malicious object: accelerate loads it with weights_only=True, which
    # refuses it (and only logs that); our own rng_state_0.json restores the random streams exactly.
    "malicious_torch_archive_as_random_states": (lambda c: torch.save({"x": Malicious(c.parent.parent / "MARKER")},
                                                                      c / "random_states_0.pkl"), None),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_checkpoint_tampering(case, saved_run, fresh_accelerate_state):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from training.checkpointing import (
        CheckpointError,
        TrainingProgress,
        load_checkpoint,
        resolve_resume_path,
    )

    path, expected = saved_run
    tamper, refusal = TAMPERINGS[case]
    tamper(path)
    marker = path.parent.parent / "MARKER"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    accelerator, model, _, _ = _tiny_run(seed=1)  # other weights, other random state
    progress, counter = TrainingProgress(), Counter()
    if refusal is not None:
        with pytest.raises(CheckpointError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
            resolve_resume_path(str(path), None, 1, ("counter",), accelerator)
        with pytest.raises(CheckpointError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
            load_checkpoint(accelerator, path, progress, {"counter": counter})
        assert progress.step == 0 and counter.step == 0  # nothing was restored
    else:
        assert resolve_resume_path(str(path), None, 1, ("counter",), accelerator) == path
        assert load_checkpoint(accelerator, path, progress, {"counter": counter}) == 2
        assert progress.skipped_samples == ["bad.jpg"] and counter.step == 2
        assert torch.equal(counter.weights["w"], torch.full((3,), 1.5))
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected["weights"][key]), key
        draw = (torch.rand(4), np.random.rand(3), __import__("random").random())
        assert torch.equal(draw[0], expected["draw"][0]) and np.array_equal(draw[1], expected["draw"][1])
        assert draw[2] == expected["draw"][2]
    assert not marker.exists()


def test_latest_falls_back_to_the_newest_usable_checkpoint(saved_run, caplog):
    from training.checkpointing import CheckpointError, resolve_resume_path

    path, _ = saved_run
    run = path.parent.parent
    newer = path.parent / "step_00000004"
    shutil.copytree(path, newer)
    (newer / "optimizer.bin").unlink()
    with caplog.at_level(logging.WARNING, logger="training.checkpointing"):
        assert resolve_resume_path("latest", run, 1, ("counter",)) == path
    assert "step_00000004 passed over (optimizer.bin is missing)" in caplog.text
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        resolve_resume_path("latest", run, 1, ("counter",))


# --------------------------------------------------------------------------------------------------------------------
# 5. predict.py: nothing overwritten, names that never collide, ranges, exit codes, remote code (items 1, 2, 5, 7)
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def photos(coco_sample_dir, tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for source in sorted((coco_sample_dir / "images").glob("*.jpg")):
        shutil.copy(source, folder / source.name)
    return folder


@pytest.fixture(scope="module")
def tampered_model_dir(tiny_model_with_processor_dir, tmp_path_factory) -> Path:
    """Our saved model with Python added to its remote-code modules that writes a marker file when imported."""
    folder = tmp_path_factory.mktemp("tampered") / "model"
    shutil.copytree(tiny_model_with_processor_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    modules = {v.split(".")[0] for v in [*config["auto_map"].values(), *processor["auto_map"].values()]}
    assert "image_processing_dearli" in modules
    assert modules and all((folder / f"{m}.py").is_file() for m in modules)
    for module in modules:
        code = (folder / f"{module}.py").read_text()
        marker = str(folder.parent / "MARKER")
        (folder / f"{module}.py").write_text(f"{code}\nimport pathlib\n\npathlib.Path({marker!r})"
                                             ".write_text('model folder code ran')\n")
    return folder


def _predict_args(inputs: list[str], model: Path, out: Path, *extra: str) -> list[str]:
    return [*inputs, "--model_name_or_path", str(model), "--output_dir", str(out), "--device", "cpu",
            "--num_workers", "0", *extra]


PREDICT_ERRORS = {  # name -> (arguments after the inputs, exit code, words of the one-line error)
    "threshold_above_one": (["--threshold", "2"], 2, "outside [0, 1]"),
    "mask_threshold_nan": (["--mask_threshold", "nan"], 2, "not a finite number"),
    "overlap_threshold_negative": (["--overlap_threshold", "-0.1"], 2, "outside [0, 1]"),
    "batch_size_zero": (["--batch_size", "0"], 2, "outside [1, inf]"),
    "ensemble_alpha_above_one": (["--ensemble_alpha", "1.5"], 2, "outside [0, 1]"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_ERRORS))
def test_predict_range_errors(case, photos, tiny_model_with_processor_dir, tmp_path, load_script, capsys):
    extra, code, words = PREDICT_ERRORS[case]
    before = tree_digest(photos)
    got, err = run_cli(load_script("predict").main,
                       _predict_args([str(photos)], tiny_model_with_processor_dir, tmp_path / "out", *extra), capsys)
    assert got == code
    assert_one_line_error(err, words)
    assert not (tmp_path / "out").exists() and tree_digest(photos) == before


def test_predict_refuses_an_output_folder_holding_its_inputs(photos, tiny_model_with_processor_dir, load_script,
                                                             capsys):
    before = tree_digest(photos)
    code, err = run_cli(load_script("predict").main,
                        _predict_args([str(photos)], tiny_model_with_processor_dir, photos), capsys)
    assert code == 1
    assert_one_line_error(err, "holds the input")
    assert tree_digest(photos) == before  # nothing written over the inputs


def test_predict_names_never_collide(photos, tiny_model_with_processor_dir, tmp_path, load_script):
    image = Image.open(next(photos.glob("*.jpg"))).resize((64, 48))
    for name in ("predictions.jpg", "skipped.png", "cat.jpg", "cat.png", "cat_overlay.png", "cat_1.jpg"):
        image.save(photos / name)
    before = tree_digest(photos)
    out = tmp_path / "out"
    assert load_script("predict").main(_predict_args([str(photos)], tiny_model_with_processor_dir, out)) == 0
    entries = json.loads((out / "predictions.json").read_text())["annotations"]
    assert len(entries) == 8 and len({e["file_name"] for e in entries}) == 8
    for entry in entries:  # each input has its own three files, and each file names its own input
        name = entry["image_id"]
        assert json.loads((out / f"{name}.json").read_text())["image"] == entry["image"]
        assert (out / f"{name}.png").is_file() and (out / f"{name}_overlay.png").is_file()
    files = {p.name for p in out.iterdir()}
    assert len(files) == 3 * 8 + 2 and json.loads((out / "skipped.json").read_text()) == []
    assert tree_digest(photos) == before


def test_predict_refuses_to_replace_outputs_without_overwrite(photos, tiny_model_with_processor_dir, tmp_path,
                                                               load_script, capsys):
    predict = load_script("predict")
    out = tmp_path / "out"
    assert predict.main(_predict_args([str(photos)], tiny_model_with_processor_dir, out)) == 0
    finished = tree_digest(out)
    code, err = run_cli(predict.main, _predict_args([str(photos)], tiny_model_with_processor_dir, out), capsys)
    assert code == 1
    assert_one_line_error(err, "exist already", "--overwrite")
    assert tree_digest(out) == finished  # finished work kept
    assert predict.main(_predict_args([str(photos)], tiny_model_with_processor_dir, out, "--overwrite")) == 0


SKIPS = {  # name -> (extra inputs, expected skipped entries' words)
    "truncated_jpeg": (lambda d: [_write(d / "truncated.jpg", _jpeg_bytes()[:400])], ["cannot read image"]),
    "decompression_bomb": (lambda d: [_write(d / "bomb.png", _bomb_bytes())], ["decompression bomb"]),
    "missing_file": (lambda d: [str(d / "no_such.jpg")], ["not found"]),
    "glob_matching_nothing": (lambda d: [str(d / "*.tiff")], ["matched no file"]),
    "broken_link_in_a_folder": (lambda d: [_link(d / "moved.jpg", d / "gone" / "moved.jpg"), str(d)],
                                ["cannot read image", "moved.jpg"]),
}


def _link(path: Path, target: Path) -> None:
    os.symlink(target, path)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", sorted(SKIPS))
def test_predict_skips_are_named_and_fail_the_exit_code(case, photos, tiny_model_with_processor_dir, tmp_path,
                                                        load_script):
    bad = tmp_path / "bad"
    bad.mkdir()
    extra_inputs = [i for i in SKIPS[case][0](bad) if i is not None]
    predict = load_script("predict")
    before = tree_digest(photos, bad)
    out = tmp_path / "out"
    assert predict.main(_predict_args([str(photos), *extra_inputs], tiny_model_with_processor_dir, out)) == 1
    skipped = json.loads((out / "skipped.json").read_text())
    assert len(skipped) == 1 and all(w in skipped[0]["error"] for w in SKIPS[case][1])
    assert len(json.loads((out / "predictions.json").read_text())["annotations"]) == 2  # the others were segmented
    assert predict.main(_predict_args([str(photos), *extra_inputs], tiny_model_with_processor_dir, out, "--overwrite",
                                      "--allow_skips")) == 0
    assert tree_digest(photos, bad) == before


def test_sam_mask_images_name_a_broken_link(tmp_path):
    """A link to nothing named like an image is an image item whose reading fails naming it, as predict.py's inputs."""
    from training.data.mask_generation import list_image_items

    Image.fromarray(RGB).save(tmp_path / "a.png")
    _link(tmp_path / "b.jpg", tmp_path / "elsewhere" / "b.jpg")
    (tmp_path / "c.jpg").mkdir()
    items = list_image_items(tmp_path)
    assert [item.file_name for item in items] == ["a.png", "b.jpg"]
    with pytest.raises(OSError, match="cannot read image .*b.jpg"):
        items[1].load()


def test_predict_with_every_input_skipped_is_an_error(tiny_model_with_processor_dir, tmp_path, load_script, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad / "truncated.jpg", _jpeg_bytes()[:400])
    code, err = run_cli(load_script("predict").main,
                        _predict_args([str(bad), "--allow_skips"], tiny_model_with_processor_dir, tmp_path / "o"),
                        capsys)
    assert code == 1
    assert_one_line_error(err, "no image could be segmented")


@pytest.mark.parametrize("size", [(1, 1), (3, 1000), (1000, 2), (31, 33)])
def test_predict_tiny_and_thin_images(size, tiny_model_with_processor_dir, tmp_path, load_script):
    """Images smaller than the network's stride, or of extreme aspect ratio: a prediction of the image's size."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / "small.png")
    out = tmp_path / "out"
    assert load_script("predict").main(_predict_args([str(folder)], tiny_model_with_processor_dir, out)) == 0
    assert np.asarray(Image.open(out / "small.png")).shape[:2] == size


def test_predict_output_location_checked_before_the_model_loads(photos, tmp_path, load_script, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = run_cli(load_script("predict").main,
                        _predict_args([str(photos)], tmp_path / "no_model_here", blocker / "out"), capsys)
    assert code == 1
    assert_one_line_error(err, "cannot write to the output directory")  # not a model-loading error: checked first


def test_missing_local_model_is_reported_without_a_hub_attempt(photos, tmp_path, load_script, capsys, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be asked for a local path")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr("transformers.utils.hub.hf_hub_download", no_hub, raising=False)
    for missing in (tmp_path / "runs" / "model", "./model", tmp_path / "a" / "b" / "c"):
        (tmp_path / "runs").mkdir(exist_ok=True)
        code, err = run_cli(load_script("predict").main,
                            _predict_args([str(photos)], missing, tmp_path / "out"), capsys)
        assert code == 1
        assert_one_line_error(err, "does not exist", str(missing))


def test_model_folder_code_never_runs_unasked(photos, tampered_model_dir, tmp_path, load_script, capsys):
    marker = tampered_model_dir.parent / "MARKER"
    predict = load_script("predict")
    before = tree_digest(tampered_model_dir)
    # Our own model type: the installed package's code is used, even with --trust_remote_code (transformers prefers
    # explicitly registered classes).
    for extra in ([], ["--trust_remote_code"]):
        out = tmp_path / f"out{len(extra)}"
        assert predict.main(_predict_args([str(photos)], tampered_model_dir, out, *extra)) == 0
        assert not marker.exists()
    # A model type this package does not provide: refused unless --trust_remote_code, in one line.
    other = tmp_path / "other_model"
    shutil.copytree(tampered_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "dearli_fork"}))
    code, err = run_cli(predict.main, _predict_args([str(photos)], other, tmp_path / "out_other"), capsys)
    assert code == 1
    assert_one_line_error(err, "--trust_remote_code")
    assert not marker.exists() and tree_digest(tampered_model_dir) == before
    # Control, in a fresh process without this package (as on a machine where it is not installed): trusting the
    # folder does run its code, so the checks above are not vacuous.
    check = ("import sys; sys.modules['modeling_dearli'] = None\n"
             "from transformers import AutoModelForUniversalSegmentation\n"
             f"AutoModelForUniversalSegmentation.from_pretrained({str(tampered_model_dir)!r}, "
             "trust_remote_code=True)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.read_text() == "model folder code ran"


# --------------------------------------------------------------------------------------------------------------------
# 6. evaluate.py, evaluate_panoptic.py, push_to_hub.py, generate_sam_masks.py: one clear line (items 5, 7)
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_class_folder(tmp_path_factory) -> Path:
    """A COCO panoptic folder with two classes (sky, grass) and one 32 x 48 image."""
    from modeling_dearli.image_processing_dearli import id_to_rgb

    root = tmp_path_factory.mktemp("two_classes")
    (root / "images").mkdir()
    (root / "panoptic").mkdir()
    ids = np.full((32, 48), 1, np.int64)
    ids[16:] = 2
    Image.fromarray(RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(root / "images" / "1.jpg")
    Image.fromarray(id_to_rgb(ids)).save(root / "panoptic" / "1.png")
    data = {"images": [{"id": 1, "file_name": "1.jpg", "height": 32, "width": 48}],
            "annotations": [{"image_id": 1, "file_name": "1.png",
                             "segments_info": [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 768},
                                               {"id": 2, "category_id": 2, "iscrowd": 0, "area": 768}]}],
            "categories": [{"id": 1, "name": "sky", "isthing": 0}, {"id": 2, "name": "grass", "isthing": 0}]}
    (root / "panoptic.json").write_text(json.dumps(data))
    (root / "broken.json").write_text('{"images": [')
    return root


def _evaluate_args(folder: Path, model: Path, gt_json: str = "panoptic.json", output: Path | None = None) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset", "custom", "--images_dir", str(folder / "images"),
            "--gt_json", str(folder / gt_json), "--gt_folder", str(folder / "panoptic"), "--device", "cpu",
            "--no_progress", *(["--output", str(output)] if output else [])]


def _sam_args(image_dir: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--image_dir", str(image_dir), "--sam_checkpoint", str(checkpoint), "--output_dir", str(out),
            "--model_type", "vit_tiny", "--points_per_side", "2", "--pred_iou_thresh", "0",
            "--stability_score_thresh", "0", "--device", "cpu", "--no_progress", *extra]


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _pred_json_with_a_missing_png(folder: Path) -> Path:
    data = json.loads((folder / "panoptic.json").read_text())
    data["annotations"][0]["file_name"] = "missing.png"
    path = folder.parent / "pred_missing.json"
    path.write_text(json.dumps(data))
    return path


CLI_ERRORS = {  # name -> (script, arguments built from the fixtures, words of the one-line error)
    "evaluate_class_count_mismatch": ("evaluate", lambda f: _evaluate_args(f["two"], f["model"]),
                                      "the model has 3 classes, the dataset 2"),
    "evaluate_malformed_gt_json": ("evaluate", lambda f: _evaluate_args(f["two"], f["model"], "broken.json"),
                                   "broken.json is not valid JSON"),
    "evaluate_unwritable_output_before_loading": ("evaluate", lambda f: _evaluate_args(
        f["two"], f["tmp"] / "missing_model", output=f["blocker"] / "report.json"), "cannot write"),
    "evaluate_existing_report_without_overwrite": ("evaluate", lambda f: _evaluate_args(
        f["two"], f["model"], output=_write_text(f["tmp"] / "report.json", "{}")), "exists (pass --overwrite"),
    "evaluate_missing_local_model": ("evaluate", lambda f: _evaluate_args(f["two"], f["tmp"] / "runs" / "none"),
                                     "does not exist"),
    "evaluate_panoptic_malformed_json": ("evaluate_panoptic", lambda f: [
        "--gt_json", str(f["two"] / "panoptic.json"), "--gt_folder", str(f["two"] / "panoptic"),
        "--pred_json", str(f["two"] / "broken.json"), "--pred_folder", str(f["two"] / "panoptic"), "--no_progress"],
        "broken.json is not valid JSON"),
    "evaluate_panoptic_missing_png": ("evaluate_panoptic", lambda f: [
        "--gt_json", str(f["two"] / "panoptic.json"), "--gt_folder", str(f["two"] / "panoptic"),
        "--pred_json", str(_pred_json_with_a_missing_png(f["two"])), "--pred_folder", str(f["two"] / "panoptic"),
        "--no_progress", "--engine", "numpy"], "missing.png"),
    "push_to_hub_dataset_contradicts_the_model": ("push_to_hub", lambda f: [
        "--model_name_or_path", str(f["model"]), "--repo_id", "me/x", "--dataset", "coco_panoptic", "--local_dir",
        str(f["tmp"] / "repo"), "--no_upload"], "the model has 3 classes but COCO panoptic (133 classes) has 133"),
    "sam_wrong_model_type": ("generate_sam_masks", lambda f: [
        *_sam_args(f["two"] / "images", f["sam"], f["tmp"] / "sam"), "--model_type", "vit_b"],
        "does not fit --model_type vit_b"),
    "sam_empty_image_folder": ("generate_sam_masks", lambda f: _sam_args(f["tmp"], f["sam"], f["tmp"] / "sam2"),
                               "no images found"),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_errors_are_one_line(case, two_class_folder, tiny_model_with_processor_dir, tiny_sam_checkpoint, tmp_path,
                                 load_script, capsys):
    script, build, words = CLI_ERRORS[case]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    (tmp_path / "runs").mkdir()
    fixtures = {"two": two_class_folder, "model": tiny_model_with_processor_dir, "tmp": tmp_path,
                "blocker": blocker, "sam": tiny_sam_checkpoint}
    argv = build(fixtures)
    before = tree_digest(two_class_folder, tiny_model_with_processor_dir)
    code, err = run_cli(load_script(script).main, argv, capsys)
    assert code == 1
    assert_one_line_error(err, words)
    assert tree_digest(two_class_folder, tiny_model_with_processor_dir) == before
    assert not (tmp_path / "repo" / "README.md").exists()  # push_to_hub: no card that lies


def test_debug_shows_the_traceback(two_class_folder, tiny_model_with_processor_dir, load_script):
    with pytest.raises(ValueError, match="the model has 3 classes"):
        cli.run(load_script("evaluate").main, [*_evaluate_args(two_class_folder, tiny_model_with_processor_dir),
                                               "--debug"])


def test_dashed_spellings_are_hidden_aliases(two_class_folder, tiny_model_with_processor_dir, load_script, capsys):
    old_style = ["--model", str(tiny_model_with_processor_dir), "--dataset", "custom", "--images-dir",
                 str(two_class_folder / "images"), "--gt-json", str(two_class_folder / "panoptic.json"),
                 "--gt-folder", str(two_class_folder / "panoptic"), "--no-progress"]
    code, err = run_cli(load_script("evaluate").main, old_style, capsys)
    assert code == 1
    assert_one_line_error(err, "the model has 3 classes")  # parsed: it got as far as comparing the label spaces


def test_sam_failures_log_with_corrupt_lines(two_class_folder, tiny_sam_checkpoint, tmp_path, load_script, caplog):
    images = tmp_path / "images"
    shutil.copytree(two_class_folder / "images", images)
    Image.open(images / "1.jpg").save(images / "2.jpg")
    out = tmp_path / "sam"
    out.mkdir()
    log = out / "failures-r000.jsonl"  # an earlier run: image 1 failed, then a line was damaged, then one cut off
    log.write_text('{"image_id": "1", "file_name": "1.jpg", "error": "x"}\n\x00\x00garbage\n{"image_id": "2", "fi')
    script = load_script("generate_sam_masks")
    with caplog.at_level(logging.WARNING):  # exit code 1: image 1 is still recorded as unreadable, without masks
        assert script.main(_sam_args(images, tiny_sam_checkpoint, out)) == 1
    assert f"{log}:2: skipping a corrupt line" in caplog.text and f"{log}:3: skipping a corrupt line" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 1 and manifest["failed_image_ids"] == ["1"]  # image 2 was retried and done
    # A log that is mostly garbage is not read around: one clear error naming it.
    log.write_text("garbage\n" * 5)
    with pytest.raises(ValueError, match="5 of 5 lines are corrupt"):
        script.main(_sam_args(images, tiny_sam_checkpoint, out))


def test_sam_unreadable_image_fails_the_exit_code_unless_allowed(two_class_folder, tiny_sam_checkpoint, tmp_path,
                                                                 load_script):
    images = tmp_path / "images"
    shutil.copytree(two_class_folder / "images", images)
    (images / "truncated.jpg").write_bytes(_jpeg_bytes()[:400])
    before = tree_digest(images)
    script = load_script("generate_sam_masks")
    assert script.main(_sam_args(images, tiny_sam_checkpoint, tmp_path / "a")) == 1
    failures = [json.loads(line) for line in (tmp_path / "a" / "failures-r000.jsonl").read_text().splitlines()]
    assert [f["image_id"] for f in failures] == ["truncated"] and "truncated.jpg" in failures[0]["error"]
    assert script.main(_sam_args(images, tiny_sam_checkpoint, tmp_path / "b", "--allow_skips")) == 0
    assert tree_digest(images) == before


@pytest.mark.parametrize("kind", ["labeled", "unlabeled", "sam_masks"])
def test_training_datasets_replace_an_unreadable_example(kind, training_folder):
    """Each training dataset returns the next readable example in place of an unreadable one and reports it."""
    from training.data.panoptic_datasets import load_coco_panoptic
    from training.data.train_datasets import (
        MasksTrainDataset,
        PanopticTrainDataset,
        UnlabeledTrainDataset,
    )

    rows = load_coco_panoptic(training_folder / "images", training_folder / "panoptic",
                              training_folder / "annotations.json")
    bad_index = list(rows["file_name"]).index("000000000001.jpg")
    if kind == "sam_masks":
        records = [{"image_id": Path(name).stem, "file_name": name, "height": h, "width": w, "masks": []}
                   for name, (h, w) in zip(rows["file_name"], [(427, 640), (360, 640), (427, 640)])]
        dataset = MasksTrainDataset([(records, training_folder / "images")], None)
    else:
        dataset = (PanopticTrainDataset if kind == "labeled" else UnlabeledTrainDataset)(rows, None)
    item = dataset[(bad_index, 7)]
    assert item["skipped"][0]["source"] == str(training_folder / "images" / "000000000001.jpg")
    assert "cannot read image" in item["skipped"][0]["error"]
    replacement = dataset[((bad_index + 1) % len(dataset), 7)]
    assert torch.equal(item["pixel_values"], replacement["pixel_values"]) and "skipped" not in replacement


# --------------------------------------------------------------------------------------------------------------------
# 7. Training: an unreadable image is skipped, named and counted; too many stop the run; resume stays exact (4, 6)
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def training_folder(coco_sample_dir, tmp_path) -> Path:
    """The shipped COCO sample plus a third image whose JPEG is truncated (its annotation is intact)."""
    root = tmp_path / "coco"
    shutil.copytree(coco_sample_dir / "images", root / "images")
    shutil.copytree(coco_sample_dir / "panoptic", root / "panoptic")
    data = json.loads((coco_sample_dir / "panoptic_annotations.json").read_text())
    first_image, first_annotation = data["images"][0], data["annotations"][0]
    (root / "images" / "000000000001.jpg").write_bytes((root / "images" / first_image["file_name"]).read_bytes()[:3000])
    shutil.copy(root / "panoptic" / first_annotation["file_name"], root / "panoptic" / "000000000001.png")
    data["images"].append({**first_image, "id": 1, "file_name": "000000000001.jpg"})
    data["annotations"].append({**first_annotation, "image_id": 1, "file_name": "000000000001.png"})
    (root / "annotations.json").write_text(json.dumps(data))
    return root


def _supervised(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_preset", "tiny", "--mixed_precision", "no", "--num_workers", "0", "--seed", "0",
            "--dataset_name", "custom", "--restrict_to_present_classes", "--train_images_dir", str(folder / "images"),
            "--train_panoptic_dir", str(folder / "panoptic"), "--train_annotations", str(folder / "annotations.json"),
            "--train_batch_size", "3", "--crop_size", "48", "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "0", "--logging_steps", "1", "--output_dir", str(out), *extra]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_unreadable_training_image_is_skipped_named_counted_and_resumes_exactly(training_folder, tmp_path, caplog,
                                                                              capsys, fresh_accelerate_state):
    from safetensors.torch import load_file

    from training import supervised
    from training.checkpointing import CheckpointError
    from training.loop import TooManySkippedSamples

    bad = training_folder / "images" / "000000000001.jpg"
    before = tree_digest(training_folder)
    straight = tmp_path / "straight"
    with caplog.at_level(logging.WARNING, logger="training.loop"):
        result = supervised.main(_supervised(training_folder, straight, "--max_skipped_share", "0.5"))
    assert result.final_step == 2 and result.skipped_samples == 1
    assert f"skipped an unreadable training example: {bad}" in caplog.text
    state = json.loads((straight / "checkpoints" / "step_00000002" / "training_state.json").read_text())
    assert state["skipped_samples"] == [str(bad)]

    # Resumed from step 1 in another folder: the same final weights (the replacement example is a pure function of
    # the index), and the count carried over.
    _reset_accelerate()
    resumed = tmp_path / "resumed"
    checkpoint = straight / "checkpoints" / "step_00000001"
    result = supervised.main(_supervised(training_folder, resumed, "--max_skipped_share", "0.5",
                                         "--resume_from_checkpoint", str(checkpoint)))
    assert result.start_step == 1 and result.skipped_samples == 1
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A missing random state is an error naming the file, not an INFO line and another random stream.
    _reset_accelerate()
    (checkpoint / "rng_state_0.json").unlink()
    with pytest.raises(CheckpointError, match="rng_state_0.json is missing"):
        supervised.main(_supervised(training_folder, tmp_path / "again", "--resume_from_checkpoint", str(checkpoint)))

    # Past the stated share (default 1%: here 1 of 3): the run stops with one line naming the file.
    _reset_accelerate()
    with pytest.raises(TooManySkippedSamples, match="1 of 3 training examples"):
        supervised.main(_supervised(training_folder, tmp_path / "strict"))
    _reset_accelerate()
    code, err = run_cli(supervised.main, _supervised(training_folder, tmp_path / "strict_cli"), capsys)
    assert code == 1
    assert_one_line_error(err, str(bad), "--max_skipped_share 0.01")
    assert tree_digest(training_folder) == before


def test_our_models_load_without_remote_code_after_import(tampered_model_dir, tiny_model):
    """With the package imported, the Auto classes and the pipeline use its code for our model folders (item 2)."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForUniversalSegmentation,
        pipeline,
    )

    import modeling_dearli

    marker = tampered_model_dir.parent / "MARKER"
    marker.unlink(missing_ok=True)
    model = AutoModelForUniversalSegmentation.from_pretrained(tampered_model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tampered_model_dir)
    segmenter = pipeline("image-segmentation", model=str(tampered_model_dir), trust_remote_code=False)
    assert type(model) is modeling_dearli.DearliForPanopticSegmentation
    assert type(processor) is modeling_dearli.DearliImageProcessor and type(segmenter.model) is type(model)
    image = Image.fromarray(RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        ours, reference = model(**processor(image)), tiny_model(**processor(image))
    assert torch.equal(ours.class_queries_logits, reference.class_queries_logits)
    assert segmenter(image, subtask="semantic")
    assert not marker.exists()


def test_evaluate_and_push_to_hub_never_run_model_folder_code(tampered_model_dir, two_class_folder, tmp_path,
                                                               load_script):
    """evaluate.py used to fall back to trust_remote_code=True; both tools now load through training.pretrained."""
    marker = tampered_model_dir.parent / "MARKER"
    marker.unlink(missing_ok=True)
    with pytest.raises(ValueError, match="the model has 3 classes"):  # the model loaded, then the label spaces differ
        load_script("evaluate").main(_evaluate_args(two_class_folder, tampered_model_dir))
    assert load_script("push_to_hub").main(["--model_name_or_path", str(tampered_model_dir), "--repo_id", "me/x",
                                            "--local_dir", str(tmp_path / "repo"), "--no_upload"]) == 0
    assert (tmp_path / "repo" / "README.md").is_file() and not marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# 8. No finished work lost, no checkpoint that contradicts itself
# --------------------------------------------------------------------------------------------------------------------
def test_training_refuses_an_output_dir_holding_a_finished_run(training_folder, tmp_path, capsys,
                                                              fresh_accelerate_state):
    from training import supervised

    out = tmp_path / "run"
    supervised.main(_supervised(training_folder, out, "--max_skipped_share", "0.5"))
    finished = tree_digest(out)
    _reset_accelerate()
    code, err = run_cli(supervised.main, _supervised(training_folder, out, "--max_skipped_share", "0.5"), capsys)
    assert code == 1
    assert_one_line_error(err, f"--output_dir {out} already holds a finished run (config.json, model.safetensors",
                          "checkpoints (step_00000001, step_00000002)", "--resume_from_checkpoint latest",
                          "--overwrite_output_dir")
    assert tree_digest(out) == finished  # nothing touched
    # Resuming the finished run is allowed (nothing left to train); so is starting over when asked to.
    _reset_accelerate()
    assert supervised.main(_supervised(training_folder, out, "--max_skipped_share", "0.5", "--resume_from_checkpoint",
                                       "latest")).final_step == 2
    _reset_accelerate()
    result = supervised.main(_supervised(training_folder, out, "--max_skipped_share", "0.5", "--max_train_steps", "1",
                                         "--overwrite_output_dir"))
    assert result.start_step == 0 and result.final_step == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]  # the old run's are gone


@pytest.mark.parametrize("content", ["checkpoints_only", "model_only", "logs_only", "empty"])
def test_output_dir_check(content, tmp_path):
    from training.checkpointing import OutputDirError, check_output_dir

    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    if content == "checkpoints_only":
        (out / "checkpoints" / "step_00000005").mkdir(parents=True)
    elif content == "model_only":
        (out / "model.safetensors").write_bytes(b"x")
    if content in ("logs_only", "empty"):
        check_output_dir(out)  # nothing of a run: accepted
        return
    with pytest.raises(OutputDirError, match="already holds"):
        check_output_dir(out)
    check_output_dir(out, resume_from_checkpoint="latest")
    before = tree_digest(out)
    check_output_dir(out, overwrite=True, is_main_process=False)  # only the main process removes anything
    assert tree_digest(out) == before
    check_output_dir(out, overwrite=True)
    assert not list((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else True


@pytest.mark.parametrize("where", ["training_state_step_beyond", "training_state_step_behind", "complete_marker",
                                   "training_state_without_step"])
def test_checkpoint_that_contradicts_itself_is_refused(where, saved_run, fresh_accelerate_state):
    from training.checkpointing import CheckpointError, TrainingProgress, load_checkpoint, resolve_resume_path

    path, _ = saved_run
    state = json.loads((path / "training_state.json").read_text())
    if where == "complete_marker":
        (path / "COMPLETE").write_text("7\n")
        words = "training_state.json says step 2 but COMPLETE says 7"
    elif where == "training_state_without_step":
        del state["step"]
        words = "training_state.json holds no step count"
    else:
        state["step"] = 99 if where == "training_state_step_beyond" else 1
        words = f"training_state.json says step {state['step']} but the folder name step_00000002 says 2"
    (path / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=words):
        resolve_resume_path(str(path), None, 1, ("counter",))
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        resolve_resume_path("latest", path.parent.parent, 1, ("counter",))
    progress = TrainingProgress()
    accelerator, _, _, _ = _tiny_run(seed=1)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(accelerator, path, progress, {"counter": Counter()})
    assert progress.step == 0


def test_checkpoint_is_written_aside_and_renamed(saved_run, monkeypatch, fresh_accelerate_state):
    """A save that dies half-way leaves no step_* folder; the next save removes the leftover."""
    from training.checkpointing import TrainingProgress, list_checkpoints, save_checkpoint

    path, _ = saved_run
    run = path.parent.parent
    accelerator, model, _, _ = _tiny_run(seed=0)
    progress = TrainingProgress()
    progress.step = 3
    original = accelerator.save_state

    def dies_half_way(folder, *args, **kwargs):
        original(folder, *args, **kwargs)
        raise KeyboardInterrupt  # after the weights, before our own files and the marker

    monkeypatch.setattr(accelerator, "save_state", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, model, progress, run, states={"counter": Counter()})
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")] == [path.name]
    assert (run / "checkpoints" / ".partial-step_00000003").is_dir()
    monkeypatch.setattr(accelerator, "save_state", original)
    progress.step = 4
    save_checkpoint(accelerator, model, progress, run, total_limit=1, states={"counter": Counter()})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]
    assert list_checkpoints(run) == [run / "checkpoints" / "step_00000004"]


# --------------------------------------------------------------------------------------------------------------------
# 9. Nothing false published, no silent answers on odd input (evaluate, evaluate_panoptic, push_to_hub, SAM masks)
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_class_folders(two_class_folder, tmp_path_factory) -> dict[str, Path]:
    """The two-class folder with a third category, person (a thing without segments): ``model_order.json`` has the
    tiny model's classes in its order (person, sky, grass), ``other_order.json`` as sky, grass, person."""
    root = tmp_path_factory.mktemp("three_classes")
    shutil.copytree(two_class_folder / "images", root / "images")
    shutil.copytree(two_class_folder / "panoptic", root / "panoptic")
    data = json.loads((two_class_folder / "panoptic.json").read_text())  # sky = 1, grass = 2
    (root / "other_order.json").write_text(json.dumps(
        {**data, "categories": [*data["categories"], {"id": 3, "name": "person", "isthing": 1}]}))
    for segment in data["annotations"][0]["segments_info"]:  # classes ordered by category id: person first
        segment["category_id"] += 1
    data["categories"] = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0},
                          {"id": 3, "name": "grass", "isthing": 0}]
    (root / "model_order.json").write_text(json.dumps(data))
    return {"root": root}


def test_evaluate_compares_class_names_not_only_their_count(three_class_folders, tiny_model_with_processor_dir,
                                                            load_script, capsys):
    root = three_class_folders["root"]
    code, err = run_cli(load_script("evaluate").main,
                        _evaluate_args(root, tiny_model_with_processor_dir, "other_order.json"), capsys)
    assert code == 1
    assert_one_line_error(err, "the model's classes are not the dataset's (3 of 3 differ by name",
                          "class 0: model 'person,man,woman', dataset 'sky'")


@pytest.fixture(scope="module")
def evaluated(three_class_folders, tiny_model_with_processor_dir, tmp_path_factory, load_script) -> Path:
    """A report written by evaluate.py for the tiny model."""
    root = three_class_folders["root"]
    report = tmp_path_factory.mktemp("evaluated") / "report.json"
    assert load_script("evaluate").main(_evaluate_args(root, tiny_model_with_processor_dir, "model_order.json",
                                                       output=report)) == 0
    return report


def _push(model: Path, report: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(model), "--repo_id", "me/x", "--eval_report", str(report), "--local_dir",
            str(out), "--no_upload"]


def _edited(report: Path, tmp_path: Path, change) -> Path:
    data = json.loads(report.read_text())
    change(data)
    path = tmp_path / "edited_report.json"
    path.write_text(json.dumps(data))
    return path


def _without_identity(data: dict) -> None:
    for key in ("model_fingerprint", "class_names", "num_classes", "per_class", "model"):
        data.pop(key, None)


FALSE_REPORTS = {  # name -> (change to evaluate.py's report, words of the refusal)
    "pq_above_one": (lambda d: d["All"].update(pq=1.7), "All pq = 1.7 is not a fraction in [0, 1]"),
    "miou_in_hundreds": (lambda d: d.update(mIoU=250), "mIoU = 250 is not a fraction in [0, 1]"),
    "negative_pq": (lambda d: d["Things"].update(pq=-0.2), "Things pq = -0.2 is not a fraction"),
    "other_weights": (lambda d: d.update(model_fingerprint="sha256:" + "0" * 64),
                      "was made for another model: its weights' fingerprint is sha256:000"),
    "other_class_count": (lambda d: d.update(num_classes=150), "was made for a model of 150 classes, this model has 3"),
    "other_class_names": (lambda d: d.update(class_names=["cat", "sky", "grass"]),
                          "names other classes than the model (1 differ; 0: report 'cat', model 'person')"),
    "other_location_without_fingerprint": (lambda d: (d.pop("model_fingerprint"), d.update(model="runs/another")),
                                           "was made for the model runs/another"),
    "no_identity": (_without_identity, "records neither the model's fingerprint nor its classes"),
}


def test_evaluate_report_records_the_model(evaluated, tiny_model, tiny_model_with_processor_dir):
    from training.publishing.hub import model_fingerprint

    report = json.loads(evaluated.read_text())
    assert report["model_fingerprint"] == model_fingerprint(tiny_model)
    assert report["class_names"] == list(tiny_model.config.class_names) and report["num_classes"] == 3
    assert report["model"] == str(tiny_model_with_processor_dir)


def test_push_to_hub_publishes_a_report_of_the_model(evaluated, tiny_model_with_processor_dir, tmp_path, load_script):
    assert load_script("push_to_hub").main(_push(tiny_model_with_processor_dir, evaluated, tmp_path / "repo")) == 0
    card = (tmp_path / "repo" / "README.md").read_text()
    report = json.loads(evaluated.read_text())
    assert f"| {100 * report['All']['pq']:.1f} | {100 * report['All']['sq']:.1f} |" in card


@pytest.mark.parametrize("case", sorted(FALSE_REPORTS))
def test_push_to_hub_refuses_a_false_report(case, evaluated, tiny_model_with_processor_dir, tmp_path, load_script,
                                            capsys):
    change, words = FALSE_REPORTS[case]
    report = _edited(evaluated, tmp_path, change)
    code, err = run_cli(load_script("push_to_hub").main, _push(tiny_model_with_processor_dir, report, tmp_path / "r"),
                        capsys)
    assert code == 1
    assert_one_line_error(err, words)
    assert not (tmp_path / "r" / "README.md").exists()


APP_USAGE_ERRORS = {  # case -> (extra arguments, exit code, words of the one-line error)
    "examples_is_a_file": (["--examples", "{image}", "--export_space", "{tmp}/space"], 1,
                           "--examples {image} is not a folder"),
    "examples_missing": (["--examples", "{tmp}/nowhere", "--export_space", "{tmp}/space"], 1,
                         "--examples {tmp}/nowhere is not a folder"),
    "port_out_of_range": (["--server_port", "99999"], 2, "argument --server_port: 99999 is outside [0, 65535]"),
}


@pytest.mark.parametrize("case", sorted(APP_USAGE_ERRORS))
def test_app_refuses_bad_locations_before_loading_the_model(case, tiny_model_with_processor_dir, tmp_path, capsys,
                                                            monkeypatch):
    """An --examples that is no folder (a Space exported without the examples asked for) and a port no socket takes
    are refused in one line, before the model is loaded."""
    sys.path.insert(0, str(REPO))
    import app

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("training.evaluation.segmenter.load_segmenter", never)
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(image)
    extra, expected_code, words = APP_USAGE_ERRORS[case]
    fill = {"image": str(image), "tmp": str(tmp_path)}
    argv = ["--model", str(tiny_model_with_processor_dir), *(a.format(**fill) for a in extra)]
    code, err = run_cli(app.main, argv, capsys)
    assert code == expected_code
    assert_one_line_error(err, words.format(**fill))
    assert not (tmp_path / "space").exists()


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


NOT_REFERENCE_CHECKPOINTS = {  # file content -> words of the one-line error
    "text": (lambda: b"not a checkpoint", "is not a readable PyTorch checkpoint: Unsupported operand"),
    "empty": (lambda: b"", "is not a readable PyTorch checkpoint: the file is empty"),
    "truncated": (lambda: _torch_saved({"model": {"w": torch.zeros(4)}})[:300],
                  "is not a readable PyTorch checkpoint: PytorchStreamReader failed"),
    "python_objects": (lambda: _torch_saved({"model": {"w": torch.zeros(4)}, "args": Path("cfg")}),
                       "contains pickled Python objects beyond tensors (Unsupported global: GLOBAL pathlib."),
}


@pytest.mark.parametrize("case", sorted(NOT_REFERENCE_CHECKPOINTS))
def test_reference_checkpoint_that_cannot_be_read_safely_is_named_in_one_line(case, tmp_path):
    """Only a pickle that names Python objects gets the advice to re-save it by unpickling (if trusted); a file that
    is no checkpoint at all is called that."""
    from training.publishing.reference_conversion import ReferenceCheckpointError, load_reference_state_dict

    content, words = NOT_REFERENCE_CHECKPOINTS[case]
    path = tmp_path / "model_final.pth"
    path.write_bytes(content())
    with pytest.raises(ReferenceCheckpointError) as error:
        load_reference_state_dict(path)
    message = str(error.value)
    assert words in message and "\n" not in message, message
    assert ("weights_only=False" in message) == (case == "python_objects"), message


@pytest.mark.parametrize("repo_id", ["bad id!!", "a/b/c", "name-", ""])
def test_push_to_hub_refuses_a_repo_id_the_hub_refuses(repo_id, tiny_model_with_processor_dir, tmp_path, load_script,
                                                       capsys):
    """Checked before anything is written: a folder whose card names an impossible repository is never made."""
    code, err = run_cli(load_script("push_to_hub").main,
                        ["--model_name_or_path", str(tiny_model_with_processor_dir), "--repo_id", repo_id,
                         "--local_dir", str(tmp_path / "r"), "--no_upload"], capsys)
    assert code == 2
    assert_one_line_error(err, "argument --repo_id: ", "Repo id must")
    assert not (tmp_path / "r").exists()


def test_push_to_hub_refuses_the_report_of_another_model_with_the_same_classes(evaluated,
                                                                              tiny_model_with_text_tower_dir,
                                                                              tmp_path, load_script, capsys):
    code, err = run_cli(load_script("push_to_hub").main,
                        _push(tiny_model_with_text_tower_dir, evaluated, tmp_path / "r"), capsys)
    assert code == 1
    assert_one_line_error(err, "was made for another model", str(tiny_model_with_text_tower_dir))


def _panoptic_args(gt_json: Path, folder: Path, engine: str = "auto") -> list[str]:
    return ["--gt_json", str(gt_json), "--gt_folder", str(folder), "--pred_json", str(gt_json), "--pred_folder",
            str(folder), "--no_progress", "--engine", engine]


@pytest.mark.parametrize("engine", ["auto", "numpy", "hotcoco"])
@pytest.mark.parametrize("case", ["empty_set", "category_without_isthing"])
def test_evaluate_panoptic_odd_input_is_an_error(case, engine, two_class_folder, tmp_path, load_script, capsys):
    data = json.loads((two_class_folder / "panoptic.json").read_text())
    if case == "empty_set":
        data["images"], data["annotations"] = [], []
        words = "has no annotations: there is nothing to evaluate"
    else:
        del data["categories"][1]["isthing"]
        words = "1 categories do not say whether they are things (isthing 1) or stuff (isthing 0), e.g. ids 2"
    gt_json = _write_text(tmp_path / "gt.json", json.dumps(data))
    code, err = run_cli(load_script("evaluate_panoptic").main, _panoptic_args(gt_json, two_class_folder / "panoptic",
                                                                              engine), capsys)
    assert code == 1
    assert_one_line_error(err, words)


REPORT_ONTO_AN_INPUT = {  # case -> (command, the report's path in the copied folders, the flag named)
    "evaluate_gt_json": ("evaluate", "data/model_order.json", "--gt_json"),
    "evaluate_gt_png": ("evaluate", "data/panoptic/1.png", "--gt_folder data/panoptic"),
    "evaluate_model_config": ("evaluate", "model/config.json", "--model_name_or_path model"),
    "evaluate_image": ("evaluate", "data/images/1.jpg", "--images_dir data/images"),
    "panoptic_pred_json": ("evaluate_panoptic", "pred.json", "--pred_json"),
    "panoptic_default_gt_folder": ("evaluate_panoptic", "data/model_order/1.png", "--gt_folder data/model_order"),
}


@pytest.mark.parametrize("case", sorted(REPORT_ONTO_AN_INPUT))
def test_report_never_replaces_an_input(case, three_class_folders, tiny_model_with_processor_dir, tmp_path,
                                        load_script, capsys, monkeypatch):
    """--overwrite replaces an earlier report, never one of the command's inputs or a file inside an input folder."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(three_class_folders["root"], "data")
    shutil.copytree("data/panoptic", "data/model_order")  # evaluate_panoptic's default folder of data/model_order.json
    shutil.copytree(tiny_model_with_processor_dir, "model")
    shutil.copy("data/model_order.json", "pred.json")
    command, report, flag = REPORT_ONTO_AN_INPUT[case]
    if command == "evaluate":
        argv = _evaluate_args(Path("data"), Path("model"), gt_json="model_order.json")
    else:
        argv = ["--gt_json", "data/model_order.json", "--pred_json", "pred.json", "--pred_folder", "data/panoptic",
                "--no_progress"]
    before = tree_digest(tmp_path)
    code, err = run_cli(load_script(command).main, [*argv, "--output", report, "--overwrite"], capsys)
    assert code == 1
    assert_one_line_error(err, f"{report} is ", f"this command's input {flag}", "write the output to another file")
    assert tree_digest(tmp_path) == before
    # A report beside the inputs is written, and replaced with --overwrite.
    for _ in range(2):
        code, err = run_cli(load_script(command).main, [*argv, "--output", "report.json", "--overwrite"], capsys)
        assert code == 0 and json.loads(Path("report.json").read_text())["All"], err


def test_evaluate_panoptic_says_when_it_falls_back_to_numpy(two_class_folder, tmp_path, load_script, monkeypatch,
                                                             caplog, capsys):
    """An input hotcoco refuses: --engine hotcoco is an error, --engine auto says it used numpy instead."""
    pytest.importorskip("hotcoco")
    from training.evaluation import panoptic_quality

    class Refusing:
        class PanopticEval:
            def __init__(self, *args, **kwargs):
                pass

            def reference_deviations(self):
                return []

            def evaluate(self):
                raise ValueError("segment ids overflow")

    monkeypatch.setattr(panoptic_quality, "_import_hotcoco", lambda: Refusing)
    gt_json = two_class_folder / "panoptic.json"
    code, err = run_cli(load_script("evaluate_panoptic").main,
                        _panoptic_args(gt_json, two_class_folder / "panoptic", "hotcoco"), capsys)
    assert code == 1
    assert_one_line_error(err, "segment ids overflow")
    report = tmp_path / "report.json"
    with caplog.at_level(logging.WARNING):
        code, _ = run_cli(load_script("evaluate_panoptic").main,
                          [*_panoptic_args(gt_json, two_class_folder / "panoptic", "auto"), "--output", str(report)],
                          capsys)
    assert code == 0
    assert "hotcoco cannot read this input (segment ids overflow): using the numpy engine instead" in caplog.text
    assert json.loads(report.read_text())["engine"] == "numpy"


def test_sam_masks_refuse_a_foreign_manifest(two_class_folder, tiny_sam_checkpoint, tmp_path, load_script, capsys):
    out = tmp_path / "sam"
    out.mkdir()
    (out / "manifest.json").write_text('{"my": "own notes"}')
    before = tree_digest(out)
    code, err = run_cli(load_script("generate_sam_masks").main,
                        _sam_args(two_class_folder / "images", tiny_sam_checkpoint, out), capsys)
    assert code == 1
    assert_one_line_error(err, f"{out / 'manifest.json'} was not written by this tool")
    assert tree_digest(out) == before


def test_sam_masks_rerun_fails_while_images_lack_masks(two_class_folder, tiny_sam_checkpoint, tmp_path, load_script,
                                                       caplog):
    images = tmp_path / "images"
    shutil.copytree(two_class_folder / "images", images)
    (images / "truncated.jpg").write_bytes(_jpeg_bytes()[:400])
    script = load_script("generate_sam_masks")
    out = tmp_path / "sam"
    assert script.main(_sam_args(images, tiny_sam_checkpoint, out)) == 1
    with caplog.at_level(logging.ERROR):
        assert script.main(_sam_args(images, tiny_sam_checkpoint, out)) == 1  # nothing new failed: still 1
    assert "1 images could not be read and have no masks" in caplog.text and "truncated" in caplog.text
    assert script.main(_sam_args(images, tiny_sam_checkpoint, out, "--retry_failed")) == 1  # still unreadable
    assert script.main(_sam_args(images, tiny_sam_checkpoint, out, "--allow_skips")) == 0
    (images / "truncated.jpg").write_bytes(_jpeg_bytes())  # repaired: the retry gives it masks
    assert script.main(_sam_args(images, tiny_sam_checkpoint, out, "--retry_failed")) == 0
    assert json.loads((out / "manifest.json").read_text())["failed_image_ids"] == []


# --------------------------------------------------------------------------------------------------------------------
# 10. Damaged weights: a model holding NaN or inf is refused wherever it is loaded
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def non_finite_model_dir(tiny_model_with_processor_dir, tmp_path_factory) -> Path:
    """The tiny model with one NaN in a class-embedding bias (what a damaged file or a diverged run leaves)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("non_finite") / "model"
    shutil.copytree(tiny_model_with_processor_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["class_embed.0.0.bias"][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_model_with_non_finite_weights_is_refused(non_finite_model_dir, photos, tmp_path, load_script, capsys):
    """predict.py named no problem and wrote empty segmentations; push_to_hub.py would publish the model; an
    --init_from / --teacher_init model would train from it."""
    from types import SimpleNamespace

    from training.model_init import build_model

    code, err = run_cli(load_script("predict").main,
                        _predict_args([str(photos)], non_finite_model_dir, tmp_path / "out"), capsys)
    assert code == 1
    assert_one_line_error(err, f"the model in {non_finite_model_dir} holds non-finite values (NaN or inf) in "
                               "class_embed.0.0.bias")
    assert not list((tmp_path / "out").glob("*.png"))
    code, err = run_cli(load_script("push_to_hub").main,
                        ["--model_name_or_path", str(non_finite_model_dir), "--repo_id", "me/x", "--local_dir",
                         str(tmp_path / "repo"), "--no_upload"], capsys)
    assert code == 1 and not (tmp_path / "repo" / "model.safetensors").exists()
    assert_one_line_error(err, "non-finite values")
    with pytest.raises(ValueError, match="non-finite values .* in class_embed.0.0.bias"):
        build_model(SimpleNamespace(init_from=str(non_finite_model_dir)), ["person", "sky", "grass"], [0])


# --------------------------------------------------------------------------------------------------------------------
# 11. Label-space files: a malformed one is named with what is wrong
# --------------------------------------------------------------------------------------------------------------------
def test_malformed_categories_and_class_name_files_are_named(tmp_path):
    """A 🤗 dataset folder's categories.json that is not JSON said only 'Expecting value: line 1 column 17'; a
    class-name line with a non-numeric id said only "invalid literal for int()"."""
    import datasets

    from training.data.class_names import read_class_names
    from training.data.hub_datasets import load_dataset_splits

    folder = tmp_path / "dataset"  # the layout write_dataset_folder gives: parquet shards, a card naming them
    datasets.Dataset.from_dict({"image_id": [1]}).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: data/train-*\n---\n")
    (folder / "categories.json").write_text('{"categories": [')
    with pytest.raises(ValueError, match=f"{folder / 'categories.json'} is not valid JSON"):
        load_dataset_splits(str(folder), {"train": "train"})
    names = tmp_path / "names.txt"
    names.write_text("1:sky\n")
    with pytest.raises(ValueError, match=f"{folder / 'categories.json'} is not valid JSON"):
        read_class_names(names, categories_json=folder / "categories.json")
    names.write_text("1:sky\nx:grass\n")
    with pytest.raises(ValueError, match=f"{names}:2: expected 'id:name,...' with a whole-number id, got 'x:grass'"):
        read_class_names(names)


def _parquet_dataset_folder(folder: Path, file_names: list[str]) -> Path:
    """A folder in write_dataset_folder's layout (parquet shards, a card naming them by pattern) with `file_names`."""
    import datasets

    datasets.Dataset.from_dict({"file_name": file_names}).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: data/train-*\n---\n")
    return folder


def test_local_dataset_folders_of_one_name_never_share_cached_rows(tmp_path, monkeypatch):
    """datasets names the cache of such a folder after its name and card only: a second folder of the same name, or
    the first one with new data, read the first one's rows."""
    import datasets

    from training.data.hub_datasets import open_splits

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    first = _parquet_dataset_folder(tmp_path / "a" / "world", ["a0.jpg", "a1.jpg"])
    second = _parquet_dataset_folder(tmp_path / "b" / "world", ["b0.jpg", "b1.jpg", "b2.jpg"])
    assert open_splits(str(first), ["train"])[0]["train"]["file_name"] == ["a0.jpg", "a1.jpg"]
    assert open_splits(str(second), ["train"])[0]["train"]["file_name"] == ["b0.jpg", "b1.jpg", "b2.jpg"]
    _parquet_dataset_folder(first, ["c0.jpg"])  # the same folder with new data
    assert open_splits(str(first), ["train"])[0]["train"]["file_name"] == ["c0.jpg"]
