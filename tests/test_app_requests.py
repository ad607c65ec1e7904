"""The web demo's requests without a browser: the app served on the loopback address by Gradio and called through
`gradio_client`, as a Space's visitors' browsers call it. Uploads are read by the project's one image reader (a bad
upload is answered with the reader's one line, a 16-bit image segmented as predict.py reads it), an example click
segments, void is "unlabeled" in the legend, and a broken model folder stops app.py with one line."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from modeling_dearli.image_reading import read_image
from training import cli

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")


def _scene() -> Image.Image:
    image = Image.new("RGB", (80, 60), (120, 180, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 38, 80, 60), fill=(60, 150, 60))
    draw.rectangle((35, 15, 45, 48), fill=(200, 40, 40))
    return image


def _sixteen_bit_png() -> bytes:
    ramp = (np.linspace(0, 65535, 60 * 80).reshape(60, 80)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    _scene().save(buffer, "JPEG")
    return buffer.getvalue()


def _bomb_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, "PNG")  # 400 M pixels in a few kB: refused, never decoded
    return buffer.getvalue()


BAD_UPLOADS = {  # file name -> (bytes, words of the one-line answer after "cannot read image <name>: ")
    "empty.jpg": (lambda: b"", "cannot identify image file"),
    "text.jpg": (lambda: b"hello, I am a text file", "cannot identify image file"),
    "truncated.jpg": (lambda: _jpeg_bytes()[:300], "truncated"),
    "bomb.png": (_bomb_bytes, "decompression bomb"),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """``(client, segmenter, examples folder, demo)``: the demo of the tiny model on 127.0.0.1."""
    from gradio_client import Client

    from modeling_dearli import DearliImageProcessor
    from training.evaluation.segmenter import Segmenter

    sys.path.insert(0, str(REPO))
    import app

    folder = tmp_path_factory.mktemp("app_requests")
    (folder / "examples").mkdir()
    _scene().save(folder / "examples" / "scene.png")
    processor = DearliImageProcessor.from_model_config(tiny_model.config,
                                                       size={"shortest_edge": 96, "longest_edge": 160})
    segmenter = Segmenter(tiny_model, processor)
    demo = app.build_demo(segmenter, [folder / "examples" / "scene.png"], "tiny")
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(folder / "examples")])
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), segmenter, folder, demo
    finally:
        demo.close()


def _segment(client, path: Path, segmenter, task: str = "panoptic", alpha: float = 0.6):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), task, alpha, segmenter.vocabulary_text, api_name="/segment")


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_bad_upload_is_answered_with_one_line(name, served, tmp_path, caplog, capfd):
    from gradio_client.exceptions import AppError

    client, segmenter, _, _ = served
    data, words = BAD_UPLOADS[name]
    path = tmp_path / name
    path.write_bytes(data())
    with pytest.raises(OSError) as reader_error:  # the same words predict.py prints for the file
        read_image(path)
    with caplog.at_level(logging.WARNING, logger="app"), pytest.raises(AppError) as answer:
        _segment(client, path, segmenter)
    message = str(answer.value)
    assert message.startswith(f"cannot read image {name}: ") and words in message and "\n" not in message, message
    assert message == str(reader_error.value).replace(str(path), name)
    assert f"request refused: {message}" in caplog.text
    assert "Traceback" not in capfd.readouterr().err
    # The app still answers good requests afterwards.
    assert _segment(client, served[2] / "examples" / "scene.png", segmenter)[2]["data"]


def test_sixteen_bit_upload_is_read_as_predict_reads_it(served, tmp_path):
    client, segmenter, _, _ = served
    path = tmp_path / "gray16.png"
    path.write_bytes(_sixteen_bit_png())
    read = read_image(path)
    clipped = Image.open(path).convert("RGB")
    assert not np.array_equal(np.asarray(read), np.asarray(clipped))  # the two readings differ
    expected = segmenter.predict(read, "semantic", [1.0, 0.6])
    wrong = segmenter.predict(clipped, "semantic", [1.0, 0.6])
    _, ensembled, table, _ = _segment(client, path, segmenter, task="semantic")
    assert table["data"] == [list(row) for row in expected[1].rows]
    assert np.array_equal(np.asarray(Image.open(ensembled).convert("RGB")), np.asarray(expected[1].picture))
    assert not np.array_equal(np.asarray(wrong[1].picture), np.asarray(expected[1].picture))


def test_result_files_are_never_rewritten_in_place(served):
    """Two requests with the same result share one file in Gradio's cache; a download of it may be under way when the
    second request's result is stored, so that file is only ever replaced by a rename (a reader keeps the complete
    bytes it opened), never truncated and written again. Every result picture is served complete."""
    import os

    _, segmenter, folder, demo = served
    picture = segmenter.predict(read_image(folder / "examples" / "scene.png"), "panoptic", [1.0, 0.6])[1].picture
    for elem_id in ("decoder-only", "ensembled"):
        output = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)
        path = Path(output.postprocess(picture).path)
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(picture))

        def written_in_place(store) -> bool:
            os.utime(path, ns=(0, 0))
            before = os.stat(path)
            store()
            after = os.stat(path)
            return after.st_ino == before.st_ino and after.st_mtime_ns != before.st_mtime_ns

        assert written_in_place(lambda: path.write_bytes(path.read_bytes()))  # the check sees an in-place write
        with open(path, "rb") as download:  # under way while an equal result is stored
            again = Path(output.postprocess(picture.copy()).path)
            assert again == path and not written_in_place(lambda: output.postprocess(picture.copy()))
            assert download.read() == path.read_bytes()
        assert not list(path.parent.glob(".*")), "a staging file was left behind"


def test_example_click_segments(served):
    """Clicking an example loads it and runs the segmentation (the same handler as the Segment button)."""
    _, _, _, demo = served
    functions = list(demo.fns.values())
    button = next(f for f in functions if f.api_name == "segment")
    loads = [f for f in functions if f.name == "load_example"]
    assert len(loads) == 1
    after_load = [f for f in functions if f.trigger_after == loads[0]._id]
    assert [f.fn for f in after_load] == [button.fn]
    assert after_load[0].concurrency_id == button.concurrency_id and after_load[0].concurrency_limit == 1


def test_void_is_unlabeled_in_the_legend():
    from training.evaluation.segmenter import picture_with_unlabeled
    from training.evaluation.visualization import Segment, SegmentationResult

    image = Image.fromarray(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    id_map = np.zeros((40, 60), dtype=np.int64)
    id_map[:, 30:] = 1
    segment = Segment(id=1, label_id=2, label="grass", score=0.9, isthing=False, area=1200)
    with_void = picture_with_unlabeled(image, SegmentationResult(id_map, [segment]), font_size=11)
    without_void = picture_with_unlabeled(image, SegmentationResult(np.ones_like(id_map), [segment]), font_size=11)
    grey = np.array([128, 128, 128])

    def legend_has_grey(picture: Image.Image) -> bool:
        panel = np.asarray(picture)[40:]
        return bool((panel == grey).all(axis=-1).sum() >= 16)  # a swatch, not a stray pixel

    assert legend_has_grey(with_void) and not legend_has_grey(without_void)
    # Void pixels are dimmed towards the swatch's grey as segments are towards theirs (rows away from the segment's
    # label, whose box reaches into the void half).
    rows = np.r_[0:8, 32:40]
    dimmed = np.asarray(with_void)[rows, 3:27].astype(float)
    original = np.asarray(image)[rows, 3:27].astype(float)
    assert np.allclose(dimmed, 0.45 * original + 0.55 * 128, atol=1)


BROKEN_MODELS = {  # name -> what is done to a copy of a saved model folder
    "truncated_weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]),
    "malformed_config": lambda d: (d / "config.json").write_text('{"model_type": "dearli", '),
    "no_weights": lambda d: (d / "model.safetensors").unlink(),
    "not_dearli": lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert"})),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MODELS))
def test_broken_model_folder_stops_the_app_with_one_line(case, tiny_model_with_processor_dir, tmp_path, capsys):
    import shutil

    sys.path.insert(0, str(REPO))
    import app

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_with_processor_dir, folder)
    BROKEN_MODELS[case](folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run(app.main, ["--model", str(folder), "--server_name", "127.0.0.1"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert stop.value.code == 1 and "Traceback" not in err, err
    assert lines[-1].startswith(f"app.py: error: cannot load the model {folder}: ") or \
        lines[-1].startswith(f"{Path(sys.argv[0]).name}: error: cannot load the model {folder}: "), err
    assert sum("error:" in line for line in lines) == 1, err
