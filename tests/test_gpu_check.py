"""The prepared GPU check (``benchmarks/gpu_check.py``) in its CI-sized form: ``--device cpu --small``.
Whole model and layer by layer give identical checkpoints, one exported NVFP4 expert dequantizes
close to its source weight, and the real NVFP4 GEMM, which needs a Blackwell GPU, is reported as
skipped with the reason."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.arch("gemma4")]


def test_gpu_check_runs_on_cpu_in_ci_size(tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    argv = [
        "--device",
        "cpu",
        "--small",
        "--layers",
        "2",
        "--dir",
        str(tmp_path),
        "--calib-size",
        "4",
        "--seq-len",
        "32",
    ]
    assert gpu_check.main(argv) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["tiny"]["identical_tensors"] and results["tiny"]["tensors"] > 0
    whole, layerwise = results["tiny"]["runs"]
    assert whole["verify_ok"] and layerwise["verify_ok"]
    assert whole["layers"] == 0 and layerwise["layers"] == 4 and layerwise["s_per_layer"] > 0
    expert = results["expert"]
    assert expert["dequantized_ok"] and 0 < expert["dequantized_vs_source_rel_error"] < 0.15
    assert (
        expert["nvfp4_gemm"].startswith("skipped: modelopt's real NVFP4 GEMM")
        and "compute capability" in expert["nvfp4_gemm"]
    )
