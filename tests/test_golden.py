"""The golden test, for every spec: the unfused module against the real transformers module.

Exactness (``torch.equal``) is required against the eager forward in fp32 and bf16, and through
``register`` + ``mtq.quantize`` with quantizers off; grouped_mm / batched_mm are compared with
``allclose`` at ``golden.IMPL_TOLERANCE`` (they reorder reductions; see that constant for why).
"""

from __future__ import annotations

import pytest
import torch

import moe_unfuse
from moe_unfuse import golden

SPECS = moe_unfuse.list_specs()


def per_spec(*, needs_model: bool = False):
    params = []
    for arch, spec in SPECS.items():
        if spec.resolve_class() is None:
            params.append(pytest.param(spec, id=arch, marks=[pytest.mark.arch(arch), pytest.mark.skip(reason=f"{spec.target_class} not in installed transformers")]))
        elif needs_model and not (spec.golden or {}).get("model"):
            continue
        else:
            params.append(pytest.param(spec, id=arch, marks=pytest.mark.arch(arch)))
    return pytest.mark.parametrize("spec", params)


def assert_all(results: list[golden.CheckResult]) -> None:
    failed = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    assert not failed, "; ".join(failed)


@per_spec()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unfused_equals_eager_exactly(spec, dtype):
    assert_all([golden.check_exact(spec, dtype)])


@per_spec()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unfused_close_to_grouped_and_batched(spec, dtype):
    results = golden.check_implementations(spec, dtype)
    if not results:
        pytest.skip("the class has no grouped_mm/batched_mm dispatch")
    assert_all(results)


@per_spec()
def test_refuse_restores_bit_exact(spec):
    assert_all(golden.check_refuse(spec))


@per_spec()
def test_modelopt_quantizers_off_exact_and_fp8_calibrates_every_expert(spec):
    assert_all(golden.check_modelopt(spec))


@per_spec(needs_model=True)
def test_whole_model_logits_unchanged(spec):
    assert_all(golden.check_whole_model(spec))
