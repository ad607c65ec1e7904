"""DEARLi web demo: a Gradio app in the form of a Hugging Face Space.

    python app.py                                   # the miniature world's trained model (README command 1)
    python app.py --model path/or/hub-id [--revision <commit>] [--trust_remote_code]
    python app.py --export_space space/             # app + model + examples + code + requirements: a Space folder

Upload an image or pick an example, choose panoptic / semantic / instance, set ``ensemble_alpha`` (Eq. 6: 1.0 = decoder
only, 0.0 = CLIP only) and edit the vocabulary (one class per line, synonyms comma-separated, ``[stuff]`` at the end
of a stuff class's line). The decoder-only (α = 1) and the ensembled result of the image appear side by side, with the
ensembled segments in a table. The inference lives in ``training/evaluation/segmenter.py``; this file is the layout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from training.evaluation.segmenter import DEFAULT_EXAMPLES_DIR, DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--server_name", default=None,
                        help="Address to serve on (default: Gradio's, 127.0.0.1, or $GRADIO_SERVER_NAME).")
    parser.add_argument("--server_port", type=int, default=None,
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


def build_demo(segmenter: Any, examples: list[Path], model_name: str) -> Any:
    """The Gradio Blocks of the demo around a :class:`~training.evaluation.segmenter.Segmenter`."""
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

    def segment(image, task, ensemble_alpha, vocabulary):
        if image is None:
            raise gr.Error("Upload an image or pick an example first.")
        try:
            decoder_only, ensembled = segmenter.predict(image, task, [1.0, float(ensemble_alpha)],
                                                        vocabulary=vocabulary if editable else None)
        except VocabularyError as error:
            raise gr.Error(str(error)) from None
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
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="input-image")
                if examples:
                    gr.Examples(examples=[[str(p)] for p in examples], inputs=image, label="Examples")
                task = gr.Radio(list(TASKS), value="panoptic", label="Task", elem_id="task")
                ensemble_alpha = gr.Slider(0.0, 1.0, value=float(segmenter.processor.ensemble_alpha), step=0.05,
                                           label="ensemble_alpha", elem_id="ensemble-alpha",
                                           info="Eq. 6 weight: 1.0 = decoder only (M2F-Lang), 0.0 = CLIP only")
                vocabulary = gr.Textbox(value=segmenter.vocabulary_text, lines=8, max_lines=40, label="Vocabulary",
                                        info=vocabulary_info, interactive=editable, elem_id="vocabulary")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=2):
                with gr.Row():
                    decoder_only = gr.Image(label="Decoder only (ensemble_alpha = 1)", type="pil", format="png",
                                            interactive=False, buttons=["download", "fullscreen"],
                                            elem_id="decoder-only")
                    ensembled = gr.Image(label="Ensembled (ensemble_alpha from the slider)", type="pil", format="png",
                                         interactive=False, buttons=["download", "fullscreen"], elem_id="ensembled")
                status = gr.Markdown(elem_id="status")
                table = gr.Dataframe(headers=["label", "score", "area (px)"], datatype=["str", "number", "number"],
                                     label="Segments (ensembled)", interactive=False, elem_id="segments")
        inputs = [image, task, ensemble_alpha, vocabulary]
        outputs = [decoder_only, ensembled, table, status]
        run.click(segment, inputs, outputs)
        task.change(refresh, inputs, outputs)
        ensemble_alpha.release(refresh, inputs, outputs)
    return demo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from training.evaluation.segmenter import (
        DEFAULT_MODEL_COMMAND,
        find_example_images,
        load_segmenter,
    )

    default_model, default_examples = default_locations()
    model = args.model or str(default_model)
    examples_dir = Path(args.examples) if args.examples else default_examples
    if args.model is None and not default_model.is_dir():
        print(f"app.py: no model at {default_model}; create it with `{DEFAULT_MODEL_COMMAND}` (README command 1), or "
              "pass --model with any saved model folder or Hub id.", file=sys.stderr)
        return 2
    if args.export_space:
        from training.publishing.space import export_space

        folder = export_space(args.export_space, Path(__file__), model, examples_dir, revision=args.revision)
        print(f"Space written to {folder}; upload it with `hf upload <user>/<space> {folder} . --repo-type space`")
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        segmenter = load_segmenter(model, revision=args.revision, trust_remote_code=args.trust_remote_code,
                                   device=device)
    except (FileNotFoundError, ValueError) as error:
        print(f"app.py: {error}", file=sys.stderr)
        return 2
    examples = find_example_images(examples_dir)
    demo = build_demo(segmenter, examples, args.model or os.path.relpath(default_model, APP_DIR))
    demo.queue().launch(server_name=args.server_name, server_port=args.server_port,
                        allowed_paths=[str(examples_dir)] if examples else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
