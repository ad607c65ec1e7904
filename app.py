"""DEARLi web demo: a Gradio app in the form of a Hugging Face Space.

    python app.py                                   # the miniature world's trained model (README command 1)
    python app.py --model path/or/hub-id [--revision <commit>] [--trust_remote_code]
    python app.py --model M --onnx exported/        # the graph of scripts/export_onnx.py in onnxruntime (CPU)
    python app.py --export_space space/             # app + model + examples + code + requirements: a Space folder

Upload an image or pick an example, choose panoptic / semantic / instance, set ``ensemble_alpha`` (Eq. 6: 1.0 = decoder
only, 0.0 = CLIP only) and edit the vocabulary (one class per line, synonyms comma-separated, ``[stuff]`` at the end
of a stuff class's line). The decoder-only (α = 1) and the ensembled result of the image appear side by side, with the
ensembled segments in a table. Clicking an example segments it. The inference lives in
``training/evaluation/segmenter.py``; this file is the layout.

Uploads reach the model as the files that were uploaded, read by the project's one image reader
(``modeling_dearli.image_reading.read_image``, as ``predict.py`` reads them): an image that cannot be read is answered
in the page with one line naming it, and every other error too; the console shows one line per refused request, and a
model folder that cannot be loaded stops the app with one line (``--debug`` shows tracebacks instead).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent
logger = logging.getLogger("app")

# Requests run one at a time (the model and its cached forward pass are shared; Segmenter holds a lock anyway), in
# Gradio's queue: a limit of 1 for every event that runs the model (one concurrency group) keeps one decoded image
# and one forward pass in memory instead of a thread per waiting request, and the queue answers the others in turn.
# MAX_QUEUED bounds the waiting requests (a client beyond it is told the queue is full instead of growing memory).
CONCURRENCY_GROUP = "segmenter"
MAX_QUEUED = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from training import cli
    from training.evaluation.segmenter import DEFAULT_EXAMPLES_DIR, DEFAULT_MODEL_DIR

    parser = cli.ArgumentParser(description=__doc__)  # also --debug
    parser.add_argument("--model", default=None,
                        help=f"Saved model folder or Hub id (default: model/ beside app.py in an exported Space, else "
                             f"{DEFAULT_MODEL_DIR}, the miniature world's trained model).")
    parser.add_argument("--revision", default=None, help="Hub revision (commit sha, branch or tag) to pin --model to.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Run the code saved with the model (review it first, and pin --revision). Off by default: "
                             "DEARLi checkpoints run the installed modeling_dearli code.")
    parser.add_argument("--examples", default=None,
                        help=f"Folder of example images (default: examples/ beside app.py in an exported Space, else "
                             f"{DEFAULT_EXAMPLES_DIR}).")
    parser.add_argument("--onnx", default=None, metavar="DIR",
                        help="Folder written by scripts/export_onnx.py: run that graph in onnxruntime (CPU) instead of "
                             "the PyTorch model, as predict.py --onnx; --model still gives the image processor and the "
                             "class names. The vocabulary is the exported one (fixed in the page).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--server_name", default=None,
                        help="Address to serve on (default: Gradio's, 127.0.0.1, or $GRADIO_SERVER_NAME).")
    parser.add_argument("--server_port", type=cli.port, default=None,
                        help="Port to serve on (default: Gradio's, 7860, or $GRADIO_SERVER_PORT).")
    parser.add_argument("--export_space", default=None, metavar="DIR",
                        help="Write a Hugging Face Space folder (this app, the model, the examples, the dearli code, "
                             "requirements.txt, README.md) into DIR, which must not exist or be empty, and exit.")
    return parser.parse_args(argv)


def default_locations() -> tuple[Path, Path]:
    """``(model, examples)``: an exported Space's own folders when present, else the repository's demo outputs."""
    from training.evaluation.segmenter import (
        DEFAULT_EXAMPLES_DIR,
        DEFAULT_MODEL_DIR,
        SPACE_EXAMPLES_DIR,
        SPACE_MODEL_DIR,
    )

    if (APP_DIR / SPACE_MODEL_DIR).is_dir():
        return APP_DIR / SPACE_MODEL_DIR, APP_DIR / SPACE_EXAMPLES_DIR
    return APP_DIR / DEFAULT_MODEL_DIR, APP_DIR / DEFAULT_EXAMPLES_DIR


def load_app_segmenter(model: str, args: argparse.Namespace) -> Any:
    """The :class:`~training.evaluation.segmenter.Segmenter` the page runs: the PyTorch model `model` (folder or Hub
    id) on ``--device``, or with ``--onnx`` its exported graph in onnxruntime."""
    if args.onnx is not None:
        from training.deployment.onnx_runtime import load_onnx_segmenter

        if args.device not in (None, "cpu"):
            raise ValueError("--onnx runs on the CPU: leave --device out")
        return load_onnx_segmenter(args.onnx, model)
    import torch

    from training.evaluation.segmenter import load_segmenter

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_segmenter(model, revision=args.revision, trust_remote_code=args.trust_remote_code, device=device)


def read_uploads_as_files(image: Any) -> Any:
    """Make the ``gr.Image`` `image` hand its value to event handlers as the path of the file that was uploaded, not
    decoded by Gradio (which would open it with PIL first, read 16-bit images its own way and fail with a traceback on
    a broken file): the handler reads it with the project's image reader. (Set on the instance: a subclass of a Gradio
    component would make Gradio write a type stub beside this file.)"""
    decode = image.preprocess

    def preprocess(payload: Any) -> str | None:
        if payload is None:
            return None
        if getattr(payload, "path", None) is None:  # an image given as a data: URL (pasted)
            return decode(payload)
        return str(payload.path)

    image.preprocess = preprocess
    return image


def write_results_by_rename(image: Any) -> Any:
    """Make the output ``gr.Image`` `image` store each result picture in Gradio's cache under a name made from its
    bytes, written to a temporary file and renamed into place, and never write a file of that name again. (Gradio
    itself rewrites such a file in place whenever another request yields the same picture, so a download of it that
    is under way reads a shortened file: its client sees the connection close before the declared Content-Length.)
    Set on the instance, like :func:`read_uploads_as_files`."""
    import hashlib
    import tempfile

    from gradio.processing_utils import encode_pil_to_bytes
    from PIL import Image

    encode = image.postprocess

    def store(picture: Image.Image) -> str:
        data = encode_pil_to_bytes(picture, image.format)
        folder = Path(image.GRADIO_CACHE) / hashlib.sha256(data).hexdigest()
        path = folder / f"image.{image.format}"
        if path.is_file():  # the same bytes, complete: only a rename puts a file under this name
            return str(path)
        folder.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=".image.")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(staging, path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        return str(path)

    def postprocess(value: Any) -> Any:
        return encode(store(value) if isinstance(value, Image.Image) else value)

    image.postprocess = postprocess
    return image


def build_demo(segmenter: Any, examples: list[Path], model_name: str, debug: bool = False) -> Any:
    """The Gradio Blocks of the demo around a :class:`~training.evaluation.segmenter.Segmenter` (``debug``: errors
    other than unreadable images and vocabularies propagate, with their traceback)."""
    import gradio as gr

    from training.evaluation.segmenter import TASKS, VocabularyError

    editable = segmenter.can_change_vocabulary
    vocabulary_info = (
        "One class per line, synonyms comma-separated; end a stuff class's line with [stuff] (every other line is a "
        "thing class). Applied when you press Segment."
        if editable else
        "Fixed: this model was saved without its CLIP text tower (config.keep_text_tower=False), so it cannot encode "
        "new class names."
    )

    def refuse(message: str) -> Any:
        message = " ".join(message.split())
        logger.warning("request refused: %s", message)
        return gr.Error(message, print_exception=False)

    def segment(image, task, ensemble_alpha, vocabulary):
        if image is None:
            raise refuse("Upload an image or pick an example first.")
        try:
            decoder_only, ensembled = segmenter.predict(image, task, [1.0, float(ensemble_alpha)],
                                                        vocabulary=vocabulary if editable else None)
        except VocabularyError as error:
            raise refuse(str(error)) from None
        except OSError as error:  # the image reader's one line, naming the file as it was uploaded
            raise refuse(str(error).replace(str(image), Path(str(image)).name)) from None
        except Exception as error:
            if debug:
                raise
            raise refuse(f"segmentation failed: {type(error).__name__}: {error}") from None
        status = (f"**{task}**, ensemble_alpha = {ensembled.ensemble_alpha:.2f}: {len(ensembled.result.segments)} "
                  f"segments (decoder only: {len(decoder_only.result.segments)}); vocabulary of "
                  f"{len(segmenter.class_names)} classes.")
        return decoder_only.picture, ensembled.picture, ensembled.rows, status

    def refresh(image, task, ensemble_alpha, vocabulary):
        """Re-run on a changed task or α once an image has been segmented (post-processing only: cached forward)."""
        if image is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return segment(image, task, ensemble_alpha, vocabulary)

    with gr.Blocks(title="DEARLi panoptic segmentation", analytics_enabled=False) as demo:
        gr.Markdown(
            "# DEARLi: panoptic segmentation with CLIP-ensembled recognition\n"
            f"Model: `{model_name}` · {len(segmenter.class_names)} classes · the decoder's class posteriors are "
            "ensembled with zero-shot CLIP posteriors of each mask, P = P_decoder^α · P_CLIP^(1−α) (paper Eq. 6)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = read_uploads_as_files(gr.Image(type="filepath", image_mode=None, label="Image",
                                                       sources=["upload", "clipboard"], elem_id="input-image"))
                example_list = None
                if examples:
                    example_list = gr.Examples(examples=[[str(p)] for p in examples], inputs=image, label="Examples",
                                               cache_examples=False)
                task = gr.Radio(list(TASKS), value="panoptic", label="Task", elem_id="task")
                ensemble_alpha = gr.Slider(0.0, 1.0, value=float(segmenter.processor.ensemble_alpha), step=0.05,
                                           label="ensemble_alpha", elem_id="ensemble-alpha",
                                           info="Eq. 6 weight: 1.0 = decoder only (M2F-Lang), 0.0 = CLIP only")
                vocabulary = gr.Textbox(value=segmenter.vocabulary_text, lines=8, max_lines=40, label="Vocabulary",
                                        info=vocabulary_info, interactive=editable, elem_id="vocabulary")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=2):
                with gr.Row():
                    decoder_only = write_results_by_rename(gr.Image(
                        label="Decoder only (ensemble_alpha = 1)", type="pil", format="png", interactive=False,
                        buttons=["download", "fullscreen"], elem_id="decoder-only"))
                    ensembled = write_results_by_rename(gr.Image(
                        label="Ensembled (ensemble_alpha from the slider)", type="pil", format="png", interactive=False,
                        buttons=["download", "fullscreen"], elem_id="ensembled"))
                status = gr.Markdown(elem_id="status")
                table = gr.Dataframe(headers=["label", "score", "area (px)"], datatype=["str", "number", "number"],
                                     label="Segments (ensembled)", interactive=False, elem_id="segments")
        inputs = [image, task, ensemble_alpha, vocabulary]
        outputs = [decoder_only, ensembled, table, status]
        queued = {"concurrency_limit": 1, "concurrency_id": CONCURRENCY_GROUP}
        run.click(segment, inputs, outputs, api_name="segment", **queued)
        if example_list is not None:  # a click on an example loads it and segments it
            example_list.load_input_event.then(segment, inputs, outputs, api_visibility="undocumented", **queued)
        task.change(refresh, inputs, outputs, api_visibility="undocumented", **queued)
        ensemble_alpha.release(refresh, inputs, outputs, api_visibility="undocumented", **queued)
    return demo


def launch(demo: Any, **kwargs: Any) -> Any:
    """Serve `demo` through Gradio's queue (see :data:`CONCURRENCY_GROUP`, :data:`MAX_QUEUED`)."""
    return demo.queue(max_size=MAX_QUEUED, default_concurrency_limit=1).launch(**kwargs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from training import cli
    from training.evaluation.segmenter import DEFAULT_MODEL_COMMAND, find_example_images

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    default_model, default_examples = default_locations()
    model = args.model or str(default_model)
    examples_dir = Path(args.examples) if args.examples else default_examples
    if args.model is None and not default_model.is_dir():
        print(f"app.py: no model at {default_model}; create it with `{DEFAULT_MODEL_COMMAND}` (README command 1), or "
              "pass --model with any saved model folder or Hub id.", file=sys.stderr)
        return 2
    if args.examples is not None and not examples_dir.is_dir():
        raise cli.CliError(f"--examples {args.examples} is not a folder")
    if args.export_space:
        if args.onnx is not None:
            raise cli.CliError("--export_space writes the PyTorch model into the Space; leave --onnx out")
        from training.publishing.space import export_space

        folder = export_space(args.export_space, Path(__file__), model, examples_dir, revision=args.revision)
        print(f"Space written to {folder}; upload it with `hf upload <user>/<space> {folder} . --repo-type space`")
        return 0

    if args.onnx is not None and (args.revision or args.trust_remote_code):
        raise cli.CliError("--onnx reads the processor and class names of a model folder: --revision and "
                           "--trust_remote_code do not apply")
    try:
        segmenter = load_app_segmenter(model, args)
    except Exception as error:
        if args.debug:
            raise
        reason = " ".join(str(error).split()) or type(error).__name__
        raise cli.CliError(f"cannot load the model {model}: {reason}") from error
    examples = find_example_images(examples_dir)
    demo = build_demo(segmenter, examples, args.model or os.path.relpath(default_model, APP_DIR), debug=args.debug)
    launch(demo, server_name=args.server_name, server_port=args.server_port, show_error=True,
           allowed_paths=[str(examples_dir)] if examples else None)
    return 0


if __name__ == "__main__":
    from training.cli import run

    run(main)
