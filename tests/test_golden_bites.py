"""The golden test can fail: deliberately broken Gemma 4 specs must not pass it, and each must fail
the way its fault predicts (which check, and why), not with just any error."""

from __future__ import annotations

import math
import re

import pytest
import torch

import moe_unfuse
from moe_unfuse.tools import golden

pytestmark = pytest.mark.arch("gemma4")

EXACT_DETAIL = re.compile(r"^(\d+) of (\d+) calls differ; ")
MAX_DIFF = re.compile(r"max\|diff\| ([0-9.e+-]+|inf)")


def max_diffs(detail: str) -> list[float]:
    """Every ``max|diff| X`` a check reports in its detail."""
    return [float(x) for x in MAX_DIFF.findall(detail)]


def assert_exact_mismatch(result: golden.CheckResult, dtype: torch.dtype) -> None:
    """The exactness check for ``dtype`` ran every call and found the outputs different (same shape,
    finite non-zero max|diff|), rather than failing for another reason."""
    assert result.name == f"exact-{str(dtype).removeprefix('torch.')}", result
    assert not result.ok, result.detail
    found = EXACT_DETAIL.match(result.detail)
    assert found and int(found[1]) > 0, result.detail
    diffs = max_diffs(result.detail)
    assert diffs and all(0 < d < math.inf for d in diffs), result.detail


def assert_implementations_mismatch(results: list[golden.CheckResult], dtype: torch.dtype) -> None:
    """grouped_mm and batched_mm were both compared and both differ by more than the tolerance."""
    tol = golden.IMPL_TOLERANCE[dtype]
    assert [r.name for r in results] == [
        f"{impl}-{str(dtype).removeprefix('torch.')}" for impl in ("grouped_mm", "batched_mm")
    ], results
    for r in results:
        assert not r.ok, r
        (diff,) = max_diffs(r.detail)
        assert diff > tol["atol"], r.detail


def test_swapped_gate_and_up_fails_exactness(mutated_spec):
    spec = mutated_spec.load("gemma4", lambda r: r["params"]["gate_up_proj"].update(into=["up_proj", "gate_proj"]))
    for dtype in (torch.float32, torch.bfloat16):
        assert_exact_mismatch(golden.check_exact(spec, dtype), dtype)
    assert_implementations_mismatch(golden.check_implementations(spec, torch.float32), torch.float32)


def test_interleaved_instead_of_concatenated_fails(mutated_spec):
    spec = mutated_spec.load("gemma4", lambda r: r["params"]["gate_up_proj"].update(packing="interleaved"))
    assert_exact_mismatch(golden.check_exact(spec, torch.float32), torch.float32)


def test_wrong_orientation_fails(mutated_spec):
    # Transposed axes with no shape to catch it early: the views get the wrong shapes and the
    # unfused forward cannot even run on inputs the original accepts: a SpecError on ``params``
    # naming the shape error, not a bare torch RuntimeError.
    def edit(r):
        for p in r["params"].values():
            p["axes"] = ["expert", "in", "out"]
            p.pop("shape")

    spec = mutated_spec.load("gemma4", edit)
    with pytest.raises(moe_unfuse.SpecError) as err:
        golden.check_exact(spec, torch.float32)
    msg = str(err.value)
    assert err.value.field == "params" and msg.startswith(spec.source), msg
    assert "the unfused forward fails (k=1 positional) on inputs the original accepts" in msg, msg
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in msg and "is the layout transposed?" in msg, msg


def test_wrong_activation_fails(mutated_spec):
    spec = mutated_spec.load("gemma4", lambda r: r.update(activation={"name": "silu"}))
    assert_exact_mismatch(golden.check_exact(spec, torch.float32), torch.float32)


def test_correct_spec_passes_every_check(gemma4_spec):
    results = golden.run_golden(gemma4_spec, modelopt=False)
    assert results and all(r.ok for r in results), [(r.name, r.detail) for r in results if not r.ok]
