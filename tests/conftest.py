"""Shared fixtures: the shipped data folder and tiny DEARLi models (built once per session)."""

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
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the repository (the shipped COCO sample, class names, partitions)."""
    if not SHARED_DIR.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def coco_sample_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "coco_panoptic_sample"


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


@pytest.fixture(scope="session")
def tiny_model_with_processor_dir(tiny_model, tmp_path_factory) -> Path:
    """The session's tiny model saved with a small-resolution image processor (shortest edge 96, longest 160)."""
    from modeling_dearli import DearliImageProcessor

    path = tmp_path_factory.mktemp("tiny_dearli_with_processor")
    tiny_model.save_pretrained(path)
    size = {"shortest_edge": 96, "longest_edge": 160}
    DearliImageProcessor.from_model_config(tiny_model.config, size=size).save_pretrained(path)
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
