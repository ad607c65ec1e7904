"""bf16 on a CPU: detected from the CPU's instructions, refused clearly without them, and a training step and an
inference forward that run under torch's CPU autocast with float32 outputs and loss."""

from __future__ import annotations

import pytest
import torch

from modeling_dearli import precision, tiny_model
from training.loop import resolve_mixed_precision

needs_bf16 = pytest.mark.skipif(not precision.bf16_supported("cpu"), reason="this CPU lacks native bf16")


def test_bf16_is_refused_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="--mixed_precision bf16 on this CPU.*avx512_bf16"):
        resolve_mixed_precision("bf16")
    with pytest.raises(ValueError, match="avx512_bf16"):
        precision.autocast("cpu", bf16=True)
    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("auto") == "no"


def test_cpu_flags_decide_without_torch_probes(monkeypatch, tmp_path):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "Path", lambda _: cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512bw\n")
    assert not precision.bf16_supported("cpu")
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    assert precision.bf16_supported("cpu")


@needs_bf16
def test_training_step_under_accelerate_bf16_on_cpu(fresh_accelerate_state):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)  # an earlier test's float32 Accelerator in this process
    GradientState._reset_state()
    PartialState._reset_state()
    assert resolve_mixed_precision("bf16") == "bf16"
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = tiny_model(class_names=["person", "sky", "grass"], thing_ids=[0], seed=0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    masks = torch.zeros(2, 2, 64, 64)
    masks[:, 0, :32], masks[:, 1, 32:] = 1, 1
    outputs = model(torch.randn(2, 3, 64, 64), mask_labels=list(masks), class_labels=[torch.tensor([0, 2])] * 2)
    assert outputs.loss.dtype == torch.float32 and outputs.masks_queries_logits.dtype == torch.float32
    accelerator.backward(outputs.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@needs_bf16
def test_bf16_inference_is_close_to_float32():
    """The backbone's features under bf16 autocast within 2% (relative L2) of float32's (measured 0.3-0.6% on this
    random tiny model; its decoder outputs then move by about 10%, most of it attention-mask decisions near the
    threshold at random weights: the accuracy of a trained model is measured in PQ, see README); outputs float32."""
    model = tiny_model(class_names=["person", "sky", "grass"], thing_ids=[0], seed=0).eval()
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.backbone(pixel_values)
        with precision.autocast("cpu", bf16=True):
            actual = model.backbone(pixel_values)
            outputs = model(pixel_values)
    for i, (a, e) in enumerate(zip(actual, expected)):
        error = (a.float() - e).norm() / e.norm()
        assert 0 < error <= 0.02, f"stage {i}: relative error {error:.3f}"  # > 0: bf16 did run
    for name in ("class_queries_logits", "masks_queries_logits", "clip_class_logits"):
        assert outputs[name].dtype == torch.float32 and torch.isfinite(outputs[name]).all(), name


def test_predict_bf16_switch(load_script, tiny_model_with_processor_dir, tmp_path, monkeypatch):
    import json

    from training import cli
    from training.data.package_data import COCO_PANOPTIC_SAMPLE

    predict = load_script("predict")
    image = COCO_PANOPTIC_SAMPLE.root / "images" / "000000439180.jpg"
    argv = [str(image), "--model_name_or_path", str(tiny_model_with_processor_dir), "--threshold", "0.0",
            "--no_overlay", "--device", "cpu", "--bf16"]
    if precision.bf16_supported("cpu"):
        assert predict.main([*argv, "--output_dir", str(tmp_path / "bf16")]) == 0
        assert json.loads((tmp_path / "bf16" / "000000439180.json").read_text())["segments_info"]
    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: False)
    with pytest.raises(cli.CliError, match="--bf16: bf16 on this CPU"):
        predict.main([*argv, "--output_dir", str(tmp_path / "refused")])
