"""Publish a DEARLi model on the Hugging Face Hub.

Writes the complete repository folder (safetensors weights, config with ``auto_map``, remote-code modules, image
processor config, README model card filled from the config and an optional evaluation report) and uploads it with
``huggingface_hub``. With ``--local_dir`` and no token (neither ``--token``, ``HF_TOKEN`` nor a cached login) it only
writes the folder.

    python scripts/push_to_hub.py --model_name_or_path outputs/dearli-ade20k-1_128 --repo_id me/dearli-ade20k-1-128 \\
        --eval_report outputs/dearli-ade20k-1_128/eval_report.json --dataset ade20k --partition 1_128

A dataset whose number of classes differs from the model's is refused (the card would describe another model), and so
is an evaluation report made for another model (its weights' fingerprint, location or classes differ) or holding
impossible values (a metric outside [0, 1]). Code in the model folder runs only with ``--trust_remote_code``.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import json
import logging
import tempfile
from pathlib import Path

from training import cli
from training.pretrained import add_model_arguments, load_model_and_processor
from training.publishing.hub import (
    DATASETS,
    CardContext,
    check_report_belongs_to_model,
    count_parameters,
    load_eval_report,
    model_fingerprint,
    normalize_dataset,
    normalize_partition,
    render_model_card,
    report_metrics,
    upload_repo_folder,
    write_repo_folder,
)

logger = logging.getLogger("push_to_hub")


def hub_repo_id(text: str) -> str:
    """An argparse type: `text` if the Hub accepts it as a repository id (``name`` or ``namespace/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise argparse.ArgumentTypeError(" ".join(str(error).split())) from None
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--repo_id", required=True, type=hub_repo_id,
                        help="Target Hub repository, e.g. 'user/dearli-ade20k-1-128'.")
    parser.add_argument(
        "--eval_report", type=Path, default=None, help="Evaluation report JSON (All/Things/Stuff, mIoU)."
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help=f"Training/evaluation dataset for the card ({', '.join(DATASETS)}); default: from the report or the "
        "conversion info. Must have the model's number of classes.",
    )
    parser.add_argument("--partition", default=None, help="Labeled partition, e.g. 1_128 or 1/128.")
    parser.add_argument("--method", default=None, help="Method name shown in the card (DEARLi or DEAR).")
    parser.add_argument("--results_source", default=None, help="Where the reported numbers come from (card text).")
    parser.add_argument("--hub_datasets", nargs="*", default=[], help="Hub dataset ids for the card's 'datasets'.")
    parser.add_argument("--license", default="mit", help="Licence id of the card metadata (default: mit).")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--local_dir", type=Path, default=None, help="Write the repository folder here (kept).")
    parser.add_argument("--overwrite", action="store_true", help="Write into a --local_dir that is not empty.")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
    parser.add_argument("--revision", default=None, help="Branch to push to (created if missing).")
    parser.add_argument("--commit_message", default=None, help="Commit message of the upload.")
    parser.add_argument("--no_upload", action="store_true", help="Only write the folder (needs --local_dir).")
    parser.add_argument(
        "--skip_online_card_check", action="store_true", help="Do not validate the card with the Hub API before upload."
    )
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
                        help="Logging level.")
    return parser.parse_args(argv)


def resolve_token(token: str | None) -> str | None:
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def build_context(args: argparse.Namespace, model_path: Path | None) -> CardContext:
    conversion = None
    if model_path is not None and (model_path / "conversion_info.json").is_file():
        conversion = json.loads((model_path / "conversion_info.json").read_text())
    report = load_eval_report(args.eval_report) if args.eval_report else None
    dataset = args.dataset or (report or {}).get("dataset") or (conversion or {}).get("dataset")
    partition = args.partition or (report or {}).get("partition")
    method = args.method
    if method is None and conversion:
        method = "DEAR" if conversion.get("source_checkpoint", "").upper().startswith("DEAR_") else "DEARLi"
    return CardContext(
        repo_id=args.repo_id,
        dataset=normalize_dataset(dataset),
        partition=normalize_partition(partition),
        method=method or "DEARLi",
        metrics=report_metrics(report) if report else None,
        results_source=args.results_source or (f"evaluation report `{args.eval_report.name}`" if report else None),
        conversion=conversion,
        hub_datasets=list(args.hub_datasets),
        license=args.license,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = None if args.no_upload else resolve_token(args.token)
    upload = not args.no_upload and (token is not None or args.local_dir is None)
    if args.no_upload and args.local_dir is None:
        raise cli.CliError("--no_upload needs --local_dir")
    if upload and token is None:
        raise cli.CliError("no Hub token (pass --token, set HF_TOKEN or run `hf auth login`), or use --local_dir")
    if args.local_dir is not None:
        if args.local_dir.is_dir() and any(args.local_dir.iterdir()) and not args.overwrite:
            raise cli.CliError(f"{args.local_dir} is not empty (pass --overwrite to write into it)")
        cli.prepare_output_dir(args.local_dir)  # before the model is loaded

    model, processor = load_model_and_processor(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    model_path = Path(args.model_name_or_path) if Path(args.model_name_or_path).is_dir() else None
    if args.eval_report:
        check_report_belongs_to_model(load_eval_report(args.eval_report), model.config, model_fingerprint(model),
                                      args.model_name_or_path, args.eval_report)
    context = build_context(args, model_path)
    card = render_model_card(model.config, context, count_parameters(model))
    extra = {}
    if model_path is not None and (model_path / "conversion_info.json").is_file():
        extra["conversion_info.json"] = (model_path / "conversion_info.json").read_text()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.local_dir or Path(tmp) / "repo"
        files = write_repo_folder(model, processor, folder, card, extra_files=extra)
        logger.info("Wrote %s: %s", folder, ", ".join(files))
        if not upload:
            logger.info("No token or --no_upload: the folder was written but not uploaded")
            return 0
        url = upload_repo_folder(
            folder,
            args.repo_id,
            token=token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            validate_card_online=not args.skip_online_card_check,
            files=files,
        )
    logger.info("Uploaded to %s", url)
    return 0


if __name__ == "__main__":
    cli.run(main)
