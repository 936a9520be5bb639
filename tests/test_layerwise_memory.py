"""Layer by layer, peak memory stays far below the model's bytes: a 12-layer Gemma 4 checkpoint of
2.5 GB (written one layer at a time, so this test never holds it either) quantizes to FP8 and
verifies in a subprocess whose peak resident memory stays under 1.5 GB (0.6 of the checkpoint), where
the whole-model path needs more than the checkpoint just to hold the weights (measured 2.13x).
About 0.6 GB of that is the interpreter with torch, transformers and modelopt imported; one layer's
weights (0.2 GB), its export and one 256 MB shard buffer are the rest. The bound is checked on the
child's own high-water mark (``VmHWM``, reported by the child at exit), not on the test process."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_unfuse.base.memory import run_with_peak_rss
from moe_unfuse.hub.tiny import write_gemma4_checkpoint

BOUND = 1.5e9


@pytest.mark.arch("gemma4")
def test_layerwise_peak_memory_stays_far_below_the_checkpoint(tmp_path: Path) -> None:
    model = tmp_path / "model"
    size = write_gemma4_checkpoint(
        model,
        12,
        hidden_size=1024,
        intermediate_size=1024,
        num_experts=64,
        moe_intermediate_size=512,
        hidden_size_per_layer_input=0,
    )
    assert size > 2.4e9
    args = ["quantize", str(model), "--qformat", "fp8", "--layerwise", "--out", str(tmp_path / "out"),
            "--calib-size", "4", "--seq-len", "64", "--no-progress"]  # fmt: skip
    log, errs = tmp_path / "stdout", tmp_path / "stderr"
    code, peak = run_with_peak_rss("moe_unfuse", args, log, errs)
    assert code == 0, errs.read_text()[-2000:]
    assert "verify     ok" in log.read_text()
    assert peak < BOUND < 0.61 * size, f"peak {peak / 1e9:.2f} GB for a {size / 1e9:.2f} GB checkpoint"


def test_child_peak_is_its_own_not_the_parents(tmp_path: Path) -> None:
    """rusage's ru_maxrss also counts the parent pages a child holds between fork and exec (a large
    pytest process once doubled the figure above); the probe reports the child's own high-water mark."""
    import torch

    held = torch.ones(1 << 28)  # the parent holds 1 GiB
    code, peak = run_with_peak_rss("json.tool", ["--help"], tmp_path / "out", tmp_path / "err")
    assert code == 0 and 0 < peak < 200e6 and held.numel()
