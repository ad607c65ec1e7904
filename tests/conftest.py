"""Shared fixtures: the shipped COCO sample and tiny DEARLi models (built once per session)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# One intra-op thread per process: the suite runs subprocesses (accelerate launch with 2 processes, CLIs) beside the
# pytest process on 2 cores, and oversubscribed OpenMP threads make CPU convolutions 10x slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def coco_sample_dir() -> Path:
    """The two-image COCO panoptic sample that ships in the package (``training/data/assets/coco_panoptic_sample``)."""
    from training.data.package_data import COCO_PANOPTIC_SAMPLE

    return COCO_PANOPTIC_SAMPLE.root


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny DEARLi (3 classes, 1 thing) in eval mode; do not modify it in tests (copy it instead)."""
    from modeling_dearli import tiny_model as build_tiny_model

    model = build_tiny_model(class_names=["person,man,woman", "sky", "grass,lawn"], thing_ids=[0], seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    """The session's tiny model saved with `save_pretrained`."""
    path = tmp_path_factory.mktemp("tiny_dearli")
    tiny_model.save_pretrained(path)
    return path


def _save_with_small_processor(model, path: Path) -> Path:
    """Save `model` into `path` with its image processor at a small test resolution (shortest edge 96, longest 160)."""
    from modeling_dearli import DearliImageProcessor

    model.save_pretrained(path)
    size = {"shortest_edge": 96, "longest_edge": 160}
    DearliImageProcessor.from_model_config(model.config, size=size).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_with_processor_dir(tiny_model, tmp_path_factory) -> Path:
    """The session's tiny model saved with a small-resolution image processor (shortest edge 96, longest 160)."""
    return _save_with_small_processor(tiny_model, tmp_path_factory.mktemp("tiny_dearli_with_processor"))


@pytest.fixture(scope="session")
def tiny_model_with_text_tower_dir(tmp_path_factory) -> Path:
    """A tiny DEARLi that kept its CLIP text tower (it can switch vocabularies), saved with a small-resolution image
    processor (shortest edge 96, longest 160). Load it, do not modify the folder."""
    from modeling_dearli import tiny_model as build_tiny_model

    model = build_tiny_model(class_names=["person,man,woman", "sky", "grass,lawn"], thing_ids=[0], seed=0,
                             keep_text_tower=True)
    return _save_with_small_processor(model, tmp_path_factory.mktemp("tiny_dearli_with_text_tower"))


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised test-size SAM saved as a checkpoint file; ``--model_type vit_tiny`` (registered here)
    builds its architecture."""
    from tiny_sam import build_sam_vit_tiny, register

    register()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(build_sam_vit_tiny().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def trained_tiny_model_dir(coco_sample_dir, tmp_path_factory) -> Path:
    """A tiny model trained for 150 steps on the first shipped image (its 8 present COCO classes), saved with its image
    processor (96-160 px) and ``ensemble_alpha=1.0`` (its CLIP is random): confident like a trained model, so that
    every subtask has segments under the processor's default thresholds (measured: 8 panoptic segments, 10
    instances with score >= 0.5; about 20 s on one thread)."""
    from modeling_dearli import DearliImageProcessor
    from modeling_dearli import tiny_model as build_tiny_model
    from training.data.class_names import load_class_names
    from training.data.panoptic_datasets import load_coco_panoptic, restrict_to_present_classes
    from training.data.panoptic_targets import panoptic_target_from_row

    sample = coco_sample_dir
    rows = load_coco_panoptic(sample / "images", sample / "panoptic", sample / "panoptic_annotations.json",
                              class_names=load_class_names("coco_panoptic"))
    rows, names, _ = restrict_to_present_classes(rows, load_class_names("coco_panoptic"))
    model = build_tiny_model(class_names=list(names.names), thing_ids=names.thing_ids, ensemble_alpha=1.0, seed=0)
    processor = DearliImageProcessor.from_model_config(model.config, size={"shortest_edge": 96, "longest_edge": 160})
    target = panoptic_target_from_row(rows[0])
    batch = processor(rows[0]["image"], segmentation_maps=[target.id_map],
                      instance_id_to_semantic_id=target.instance_id_to_semantic_id(), return_tensors="pt")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    model.train()
    for _ in range(150):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 0.01)
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("trained_tiny_dearli")
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def load_script():
    """``load_script("predict")`` imports ``scripts/predict.py`` as a module (``scripts/`` is not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"dearli_script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture()
def fresh_accelerate_state():
    """Reset Accelerate's process-wide singletons after a test that ran a training loop in this process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="session")
def check_saved_processor():
    """``check_saved_processor(folder, size)``: the image processor a training loop saved in ``folder`` equals the one
    built from the saved model config at ``size`` (the dataset's test size), and its panoptic post-processing fuses
    two segments of one stuff class into one (when the model has stuff classes)."""

    def check(folder: Path, size: dict[str, int]) -> None:
        from modeling_dearli import DearliConfig, DearliImageProcessor
        from modeling_dearli.modeling_dearli import DearliPanopticOutput

        saved = DearliImageProcessor.from_pretrained(folder)
        config = DearliConfig.from_pretrained(folder)
        settings = {k: v for k, v in saved.to_dict().items() if k != "auto_map"}  # auto_map: written on save
        assert settings == DearliImageProcessor.from_model_config(config, size=size).to_dict()
        assert saved.size == size and saved.num_labels == config.num_classes
        if not config.stuff_ids:
            return
        stuff, classes = config.stuff_ids[0], config.num_classes
        logits = torch.full((1, 2, classes + 1), -20.0)
        logits[0, :, stuff] = 20.0
        masks = torch.full((1, 2, 8, 8), -20.0)
        masks[0, 0, :, :4] = 20.0
        masks[0, 1, :, 4:] = 20.0
        outputs = DearliPanopticOutput(class_queries_logits=logits, masks_queries_logits=masks)
        (result,) = saved.post_process_panoptic_segmentation(outputs, target_sizes=[(32, 32)], ensemble_alpha=1.0)
        assert [(s["label_id"], s["was_fused"]) for s in result["segments_info"]] == [(stuff, True)]
        assert int((result["segmentation"] == result["segments_info"][0]["id"]).sum()) == 32 * 32

    return check
