"""Convert a released checkpoint of the reference implementation (GitHub helen1c/DEARLi, detectron2 ``.pth``) into a
Hugging Face DEARLi folder (``save_pretrained``: safetensors weights, config with ``auto_map``, remote code, image
processor config).

    python scripts/convert_reference_checkpoint.py \\
        --checkpoint checkpoints/coco-panoptic_weights/DEAR_coco_pan_1_128.pth \\
        --dataset coco_panoptic --output_dir converted/dear-coco-panoptic-1-128
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_dearli import DearliConfig
from training import cli
from training.publishing.reference_conversion import (
    KEY_GROUPS,
    REFERENCE_DATASETS,
    REFERENCE_TEST_SIZES,
    ReferenceCheckpointError,
    convert_reference_state_dict,
    dataset_vocabulary,
    load_reference_state_dict,
    reference_config,
    verify_converted_model,
)

logger = logging.getLogger("convert_reference_checkpoint")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path, help="Reference .pth checkpoint (detectron2 format).")
    parser.add_argument(
        "--dataset",
        required=True,
        choices=REFERENCE_DATASETS,
        help="Dataset the checkpoint was trained on (vocabulary).",
    )
    parser.add_argument("--output_dir", required=True, type=Path, help="Output folder for save_pretrained.")
    parser.add_hidden_alias("--output", "--output_dir")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="Optional DearliConfig (config.json or its folder) whose architecture to use; default: the full paper "
        "configuration (OpenCLIP convnext_base_w_320, 200 queries).",
    )
    parser.add_argument(
        "--data_dir",
        type=Path,
        default=None,
        help="Folder holding class_names/ of your own (default: the data that ships in training/data/assets).",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Device for text encoding and the verification forward pass (CPU: ~15 CPU-minutes for COCO's 254 "
        "synonyms x 14 templates with ConvNeXt-B's text tower; a GPU takes seconds).",
    )
    parser.add_argument(
        "--verify_size",
        type=cli.positive_int,
        default=128,
        help="Side of the random image used to verify output shapes.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty output folder.")
    parser.add_argument(
        "--log_level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="Logging level.",
    )
    return parser.parse_args(argv)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_base_config(path: Path | None) -> DearliConfig | None:
    if path is None:
        return None
    return DearliConfig.from_pretrained(path.parent if path.is_file() else path)


def save_image_processor(output: Path, dataset: str, config: DearliConfig) -> bool:
    """Save the DEARLi image processor with the reference's test resolution (skipped if it is unavailable)."""
    try:
        from modeling_dearli.image_processing_dearli import DearliImageProcessor
    except ImportError as error:  # pragma: no cover - only while the processor is not part of the package
        logger.warning("DearliImageProcessor unavailable (%s): no preprocessor_config.json written", error)
        return False
    processor = DearliImageProcessor.from_model_config(config, size=dict(REFERENCE_TEST_SIZES[dataset]))
    DearliImageProcessor.register_for_auto_class("AutoImageProcessor")
    processor.save_pretrained(output)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.output_dir.is_dir() and any(args.output_dir.iterdir()) and not args.overwrite:
        logger.error("%s is not empty (pass --overwrite)", args.output_dir)
        return 2
    cli.prepare_output_dir(args.output_dir, create=False)  # before the checkpoint is read and converted

    steps = tqdm(total=6, desc="convert", unit="step")

    def progress(message: str) -> None:
        steps.set_postfix_str(message)
        steps.update(1)

    try:
        progress("reading the checkpoint")
        state_dict = load_reference_state_dict(args.checkpoint)
        class_names, thing_ids = dataset_vocabulary(args.dataset, args.data_dir)
        config = reference_config(class_names, thing_ids, base_config=load_base_config(args.config))
        progress("mapping the weights")
        result = convert_reference_state_dict(state_dict, config, device=args.device, progress=progress)
        model = result.model.to(args.device)
        progress("verifying output shapes")
        shapes = verify_converted_model(model, image_size=args.verify_size)
    except (ReferenceCheckpointError, FileNotFoundError) as error:
        steps.close()
        logger.error("Conversion failed: %s", error)
        return 1
    steps.close()

    model.to("cpu").save_pretrained(args.output_dir)
    has_processor = save_image_processor(args.output_dir, args.dataset, model.config)
    info = {
        "source_checkpoint": args.checkpoint.name,
        "source_sha256": sha256(args.checkpoint),
        "dataset": args.dataset,
        "num_classes": config.num_classes,
        "class_agnostic_warm_up": result.class_agnostic,
        "text_embeddings": result.text_embeddings_source,
        "reference_tensors_converted": result.converted_keys,
        "verified_output_shapes": {k: list(v) for k, v in shapes.items()},
        "image_processor": has_processor,
        "key_groups": [{"reference": ref, "ours": ours} for ref, ours in KEY_GROUPS],
    }
    (args.output_dir / "conversion_info.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("Saved the converted model to %s (%s)", args.output_dir, result.text_embeddings_source)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli.run(main)
