"""`scripts/benchmarks/gpu_check.py` runs end to end with tiny sizes on a CPU (on a GPU it runs at the paper's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_with_tiny_sizes_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu_check.json"
    results = module.main(["--device", "cpu", "--model", "tiny", "--image_size", "64", "--batch_size", "2",
                           "--dewa_batch_size", "2", "--repeats", "1", "--output_json", str(out)])
    assert out.is_file()
    assert results["forward"]["fp32"]["images_per_second"] > 0
    assert results["ssl_step"]["seconds_per_step"] > 0 and results["dewa_step"]["batch_size"] == 2
    # the same device: the same numbers
    assert all(v == 0.0 for v in results["cpu_equality"].values())
