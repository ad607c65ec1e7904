"""Publishing DEARLi models on the Hugging Face Hub: the repository folder (weights, config with ``auto_map``,
remote code, image processor config, model card) and its upload.

The model card is rendered from ``model_cards/dearli_model_card.md.j2`` with `huggingface_hub.ModelCard.from_template`
and validated offline with huggingface_hub's own metadata parsing (`ModelCardData` parses and validates
``model-index``; we check that it round-trips through `eval_results_to_model_index`). `ModelCard.validate` needs the
network and is only used right before an upload.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO_ROOT / "model_cards" / "dearli_model_card.md.j2"

DEARLI_CITATION = """@article{martinovic2025dearli,
  title={DEARLi: Decoupled Enhancement of Recognition and Localization for Semi-Supervised Panoptic Segmentation},
  author={Martinovi{\\'c}, Ivan and {\\v{S}}ari{\\'c}, Josip and Or{\\v{s}}i{\\'c}, Marin and Kristan, Matej and {\\v{S}}egvi{\\'c}, Sini{\\v{s}}a},
  journal={arXiv preprint arXiv:2507.10118},
  year={2025}
}"""
PAPER_URL = "https://arxiv.org/abs/2507.10118"
REFERENCE_CODE_URL = "https://github.com/helen1c/DEARLi"


@dataclass(frozen=True)
class DatasetInfo:
    """How a training/evaluation dataset is named in the card and its model-index."""

    key: str
    display_name: str
    model_index_type: str
    eval_split: str
    num_classes: int
    labeled_images: Mapping[str, int] = field(default_factory=dict)  # partition -> number of labeled images


DATASETS: dict[str, DatasetInfo] = {
    "ade20k": DatasetInfo(
        "ade20k", "ADE20K panoptic (150 classes)", "ade20k_panoptic", "validation", 150,
        {"1/128": 158, "1/64": 316, "1/32": 632, "1/16": 1263, "1/8": 2526},
    ),
    "coco_panoptic": DatasetInfo(
        "coco_panoptic", "COCO panoptic (133 classes)", "coco_panoptic", "val2017", 133,
        {"1/512": 232, "1/256": 463, "1/128": 925, "1/64": 1849, "1/32": 3697},
    ),
    "coco_objects": DatasetInfo(
        "coco_objects", "COCO-Objects (80 things + background)", "coco_objects", "val2017", 81,
        {"1/512": 232, "1/256": 463, "1/128": 925, "1/64": 1849, "1/32": 3697},
    ),
}  # fmt: skip
DATASET_ALIASES = {"ade": "ade20k", "coco": "coco_panoptic", "coco-pan": "coco_panoptic", "coco-obj": "coco_objects"}


def normalize_dataset(name: str | None) -> str | None:
    """Canonical dataset key (``ade20k``, ``coco_panoptic``, ``coco_objects``) or None."""
    if name is None:
        return None
    key = name.strip().lower().replace("-", "_")
    key = DATASET_ALIASES.get(name.strip().lower(), DATASET_ALIASES.get(key, key))
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return key


def normalize_partition(partition: str | None) -> str | None:
    """``1_128`` / ``1/128`` / ``128`` -> ``1/128``; ``full`` stays."""
    if partition is None:
        return None
    value = partition.strip().replace("_", "/")
    if value.isdigit():
        value = f"1/{value}"
    return value


# ----------------------------------------------------------------------------------------------- evaluation report
def load_eval_report(path: str | Path) -> dict[str, Any]:
    """Read an evaluation report (JSON written by the evaluation tools: ``All``/``Things``/``Stuff`` with
    ``pq, sq, rq, n``, ``per_class``, optional ``mIoU``/``miou``; optional ``dataset``/``partition`` metadata)."""
    try:
        report = json.loads(Path(path).read_text())
    except ValueError as error:
        raise ValueError(f"evaluation report {path} is not valid JSON: {error}") from None
    if not isinstance(report, dict):
        raise ValueError(f"evaluation report {path} must be a JSON object")  # noqa: TRY004 - a file's content
    for group in ("All", "Things", "Stuff"):
        if group not in report or not {"pq", "sq", "rq"} <= set(report[group]):
            raise ValueError(f"{path}: evaluation report needs '{group}' with pq, sq and rq")
    return report


def _percent(value: float) -> float:
    """A report value (a fraction, as PanopticQuality.compute writes it) in percent; anything outside [0, 1] is
    refused."""
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"metric value {value} is not a fraction in [0, 1]")
    return round(value * 100.0, 2)


def model_fingerprint(model: Any) -> str:
    """``sha256:<hex>`` of a model's weights (every state-dict tensor's name, dtype, shape and bytes, in name order):
    the evaluation tools write it into their reports and :func:`check_report_belongs_to_model` compares it, so a
    report cannot be published with another model. Independent of the folder's path and of the file layout."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return f"sha256:{digest.hexdigest()}"


def _report_problems_in_range(report: Mapping[str, Any]) -> list[str]:
    problems = []
    for group in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq"):
            value = report[group].get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or not 0.0 <= value <= 1.0:
                problems.append(f"{group} {key} = {value!r} is not a fraction in [0, 1]")
    for key in ("mIoU", "miou"):
        value = report.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or not 0.0 <= value <= 1.0):
            problems.append(f"{key} = {value!r} is not a fraction in [0, 1]")
    for cid, row in (report.get("per_class") or {}).items():
        for key in ("pq", "sq", "rq"):
            value = row.get(key) if isinstance(row, Mapping) else None
            if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
                problems.append(f"per_class {cid} {key} = {value!r} is not a fraction in [0, 1]")
                break
    return problems


def _first_synonym(name: str) -> str:
    return str(name).split(",")[0].strip().lower()


def check_report_belongs_to_model(report: Mapping[str, Any], config: Any, fingerprint: str | None = None,
                                  model_location: str | None = None, report_path: str | Path = "the report") -> None:
    """Refuse (``ValueError`` naming both sides) an evaluation report that was not made for this model, or whose
    metrics are impossible:

    - every headline metric (All / Things / Stuff ``pq, sq, rq``, ``mIoU``) and per-class value a fraction in [0, 1];
    - ``model_fingerprint`` (written by ``scripts/evaluate.py``, see :func:`model_fingerprint`) equal to the model's;
      without one, the report's ``model`` location, when given, must be the model's;
    - the label space: ``num_classes`` and ``class_names`` when the report has them, else its ``per_class`` rows (one
      per class, named by the class's first synonym, in the model's order); a report with none of these says nothing
      about the model it describes and is refused.
    """
    problems = _report_problems_in_range(report)
    if problems:
        raise ValueError(f"{report_path} holds impossible values: {'; '.join(problems[:3])}")
    names = list(config.class_names)
    report_fingerprint = report.get("model_fingerprint")
    if report_fingerprint is not None and fingerprint is not None and report_fingerprint != fingerprint:
        raise ValueError(f"{report_path} was made for another model: its weights' fingerprint is {report_fingerprint} "
                         f"({report.get('model', 'location not recorded')}), this model's is {fingerprint} "
                         f"({model_location})")
    if report_fingerprint is None and report.get("model") and model_location:
        theirs, ours = Path(str(report["model"])), Path(str(model_location))
        same = theirs.resolve() == ours.resolve() if theirs.exists() and ours.exists() else str(theirs) == str(ours)
        if not same:
            raise ValueError(f"{report_path} was made for the model {report['model']}, not {model_location} (and "
                             "records no weights fingerprint to tell whether they are the same): evaluate this model "
                             "with scripts/evaluate.py")
    count = report.get("num_classes")
    if count is not None and count != len(names):
        raise ValueError(f"{report_path} was made for a model of {count} classes, this model has {len(names)}")
    if report.get("class_names") is not None:
        theirs = [_first_synonym(n) for n in report["class_names"]]
        ours = [_first_synonym(n) for n in names]
    elif report.get("per_class"):
        rows = list(report["per_class"].values())
        theirs = [_first_synonym(row.get("name", "?")) if isinstance(row, Mapping) else "?" for row in rows]
        ours = [_first_synonym(n) for n in names]
    else:
        if report_fingerprint is not None:
            return
        raise ValueError(f"{report_path} records neither the model's fingerprint nor its classes (class_names or "
                         "per_class): it cannot be checked against this model; evaluate it with scripts/evaluate.py")
    if len(theirs) != len(ours):
        raise ValueError(f"{report_path} covers {len(theirs)} classes, this model has {len(ours)}")
    differing = [f"{i}: report {a!r}, model {b!r}" for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
    if differing:
        raise ValueError(f"{report_path} names other classes than the model ({len(differing)} differ; "
                         f"{'; '.join(differing[:3])})")


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Headline metrics in percent: PQ, SQ, RQ (All), PQ of things and stuff, and mIoU when present."""
    metrics = {
        "PQ": _percent(report["All"]["pq"]),
        "SQ": _percent(report["All"]["sq"]),
        "RQ": _percent(report["All"]["rq"]),
        "PQ_th": _percent(report["Things"]["pq"]),
        "PQ_st": _percent(report["Stuff"]["pq"]),
    }
    miou = report.get("mIoU", report.get("miou"))
    if miou is not None:
        metrics["mIoU"] = _percent(miou)
    return metrics


METRIC_TYPES = {  # our name -> (model-index metric type, display name)
    "PQ": ("pq", "PQ"),
    "SQ": ("sq", "SQ"),
    "RQ": ("rq", "RQ"),
    "PQ_th": ("pq_things", "PQ (things)"),
    "PQ_st": ("pq_stuff", "PQ (stuff)"),
    "mIoU": ("mean_iou", "mIoU"),
}


def eval_results(
    metrics: Mapping[str, float], dataset: str, partition: str | None, source_name: str | None = None,
    source_url: str | None = None,
) -> list[EvalResult]:  # fmt: skip
    """huggingface_hub `EvalResult`s (one per metric) for a dataset / labeled partition."""
    info = DATASETS[dataset]
    name = info.display_name + (f", {partition} labeled" if partition else "")
    results = []
    for key, value in metrics.items():
        metric_type, metric_name = METRIC_TYPES[key]
        results.append(
            EvalResult(
                task_type="image-segmentation",
                task_name="Panoptic Segmentation",
                dataset_type=info.model_index_type,
                dataset_name=name,
                dataset_config=partition.replace("/", "_") if partition else None,
                dataset_split=info.eval_split,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=value,
                source_name=source_name,
                source_url=source_url,
            )
        )
    return results


# ----------------------------------------------------------------------------------------------- model card
@dataclass
class CardContext:
    """What the model card says beyond the config: provenance, training data, results."""

    repo_id: str
    dataset: str | None = None
    partition: str | None = None
    method: str = "DEARLi"
    metrics: dict[str, float] | None = None
    results_source: str | None = None  # e.g. "evaluation report" / "paper" (card text)
    results_source_url: str | None = None  # with results_source: the model-index `source` (needs both)
    conversion: dict[str, Any] | None = None  # conversion_info.json of a converted reference checkpoint
    license: str = "mit"
    extra_tags: list[str] = field(default_factory=list)
    hub_datasets: list[str] = field(default_factory=list)


def clip_hub_id(config: Any) -> str | None:
    """The Hub id of the OpenCLIP weights the backbone came from (``base_model``), if OpenCLIP knows it."""
    try:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(config.clip_model_name, config.clip_pretrained or "")
    except Exception:  # unknown model name / tag, or a local file
        return None
    hub = (cfg or {}).get("hf_hub")
    return hub.rstrip("/") if hub else None


def build_card_data(config: Any, context: CardContext) -> ModelCardData:
    """The card's YAML metadata (license, pipeline tag, tags, base model, model-index)."""
    tags = ["dearli", "panoptic-segmentation", "semi-supervised", "mask2former", "clip", "vision", "custom_code"]
    tags += [t for t in context.extra_tags if t not in tags]
    results = None
    if context.metrics and context.dataset:
        with_source = bool(context.results_source and context.results_source_url)
        results = eval_results(
            context.metrics,
            context.dataset,
            context.partition,
            source_name=context.results_source if with_source else None,
            source_url=context.results_source_url if with_source else None,
        )
    kwargs: dict[str, Any] = {}
    base_model = clip_hub_id(config)
    if base_model:
        kwargs["base_model"] = base_model
    if context.hub_datasets:
        kwargs["datasets"] = list(context.hub_datasets)
    return ModelCardData(
        license=context.license,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=tags,
        model_name=context.repo_id.split("/")[-1],
        eval_results=results,
        **kwargs,
    )


def card_template_kwargs(
    config: Any, context: CardContext, num_parameters: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Variables of the Jinja template, from the model config and the card context."""
    info = DATASETS.get(context.dataset) if context.dataset else None
    things = list(config.thing_ids)
    names = [config.id2label[i] for i in range(config.num_classes)]
    labeled = info.labeled_images.get(context.partition) if info and context.partition else None
    return {
        "repo_id": context.repo_id,
        "model_name": context.repo_id.split("/")[-1],
        "method": context.method,
        "dataset_name": info.display_name if info else None,
        "dataset_key": context.dataset,
        "eval_split": info.eval_split if info else None,
        "partition": context.partition,
        "labeled_images": labeled,
        "metrics": context.metrics,
        "results_source": context.results_source,
        "num_classes": config.num_classes,
        "num_things": len(things),
        "num_stuff": config.num_classes - len(things),
        "class_preview": ", ".join(names[:12]) + (", ..." if len(names) > 12 else ""),
        "clip_model_name": config.clip_model_name,
        "clip_pretrained": config.clip_pretrained,
        "base_model": clip_hub_id(config),
        "num_queries": config.num_queries,
        "ensemble_alpha": config.ensemble_alpha,
        "localization_only": bool(getattr(config, "localization_only", False)),
        "trainable_parameters": (num_parameters or {}).get("trainable"),
        "frozen_parameters": (num_parameters or {}).get("frozen"),
        "conversion": context.conversion,
        "paper_url": PAPER_URL,
        "reference_code_url": REFERENCE_CODE_URL,
        "citation": DEARLI_CITATION,
        "license": context.license,
    }


def render_model_card(
    config: Any,
    context: CardContext,
    num_parameters: Mapping[str, int] | None = None,
    template_path: str | Path = DEFAULT_TEMPLATE,
) -> ModelCard:
    """Render the DEARLi model card (metadata + Markdown) and validate its metadata offline. A dataset whose number of
    classes differs from the model's is refused (the card would describe another model)."""
    info = DATASETS.get(context.dataset) if context.dataset else None
    if info is not None and info.num_classes != config.num_classes:
        raise ValueError(f"the model has {config.num_classes} classes but {info.display_name} has {info.num_classes}: "
                         "the card's dataset (--dataset, the evaluation report's or the conversion's) does not "
                         "describe this model")
    card = ModelCard.from_template(
        build_card_data(config, context),
        template_path=str(template_path),
        **card_template_kwargs(config, context, num_parameters),
    )
    validate_model_card(card)
    return card


def validate_model_card(card: ModelCard | str) -> ModelCardData:
    """Offline metadata check with huggingface_hub's own parsers; raises ValueError on any problem.

    Parses the card (YAML front matter -> `ModelCardData`, which validates ``model-index`` into `EvalResult`s and
    fails on malformed entries), then checks that the parsed results serialise back to the same ``model-index``.
    """
    text = str(card)
    parsed = ModelCard(text, ignore_metadata_errors=False)
    data = parsed.data
    metadata = data.to_dict()
    problems = []
    for key in ("license", "library_name", "pipeline_tag"):
        if not metadata.get(key):
            problems.append(f"missing '{key}'")
    if metadata.get("pipeline_tag") not in (None, "image-segmentation"):
        problems.append(f"unexpected pipeline_tag {metadata.get('pipeline_tag')!r}")
    if data.eval_results:
        round_trip = eval_results_to_model_index(data.model_name, data.eval_results)
        if round_trip != metadata.get("model-index"):
            problems.append("model-index does not round-trip through huggingface_hub's EvalResult parsing")
        for result in data.eval_results:
            if not isinstance(result.metric_value, (int, float)) or not math.isfinite(result.metric_value):
                problems.append(f"non-numeric metric value {result.metric_value!r} ({result.metric_type})")
    if not parsed.text.strip():
        problems.append("empty card text")
    if problems:
        raise ValueError("Invalid model card metadata: " + "; ".join(problems))
    return data


# ----------------------------------------------------------------------------------------------- repository folder
def count_parameters(model: Any) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def write_repo_folder(
    model: Any,
    image_processor: Any,
    local_dir: str | Path,
    card: ModelCard,
    extra_files: Mapping[str, str] | None = None,
) -> list[str]:
    """Write the complete Hub repository folder and return its file names.

    ``model.safetensors`` + ``config.json`` (with ``auto_map``) + the remote-code modules (``save_pretrained`` copies
    them because the classes are registered for the Auto classes), ``preprocessor_config.json`` (+ the processor's
    module, registered for ``AutoImageProcessor``) and ``README.md``.
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    type(image_processor).register_for_auto_class("AutoImageProcessor")
    model.save_pretrained(local_dir, safe_serialization=True)
    image_processor.save_pretrained(local_dir)
    card.save(local_dir / "README.md")
    for name, content in (extra_files or {}).items():
        (local_dir / name).write_text(content)
    check_repo_folder(local_dir)
    return sorted(p.name for p in local_dir.iterdir() if p.is_file())


def check_repo_folder(local_dir: str | Path) -> None:
    """Fail if the folder lacks anything `from_pretrained(..., trust_remote_code=True)` or the pipeline needs."""
    local_dir = Path(local_dir)
    problems = []
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        if not (local_dir / name).is_file():
            problems.append(f"missing {name}")
    if not problems:
        config = json.loads((local_dir / "config.json").read_text())
        auto_map = config.get("auto_map", {})
        for auto in ("AutoConfig", "AutoModelForUniversalSegmentation", "AutoModelForImageSegmentation"):
            if auto not in auto_map:
                problems.append(f"config.json auto_map lacks {auto}")
        processor = json.loads((local_dir / "preprocessor_config.json").read_text())
        if "AutoImageProcessor" not in processor.get("auto_map", {}):
            problems.append("preprocessor_config.json auto_map lacks AutoImageProcessor")
        if "image-segmentation" not in config.get("custom_pipelines", {}):
            problems.append("config.json custom_pipelines lacks image-segmentation")
        pipelines = [entry["impl"] for entry in config.get("custom_pipelines", {}).values()]
        modules = {
            str(v).split("--")[-1].split(".")[0]
            for v in [*auto_map.values(), *processor.get("auto_map", {}).values(), *pipelines]
        }
        for module in modules:
            if not (local_dir / f"{module}.py").is_file():
                problems.append(f"missing remote-code module {module}.py")
    if problems:
        raise RuntimeError(f"Incomplete repository folder {local_dir}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------- upload
def upload_repo_folder(
    local_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    validate_card_online: bool = True,
    files: list[str] | None = None,
) -> str:
    """Create the model repository if needed (and the branch `revision`) and upload the folder (only `files`, e.g.
    those `write_repo_folder` wrote, when given: stale files of an earlier run stay local); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    if validate_card_online:
        ModelCard.load(Path(local_dir) / "README.md").validate(repo_type="model")
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(local_dir),
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload DEARLi model",
        allow_patterns=list(files) if files else None,
    )
    return str(getattr(commit, "commit_url", commit))
