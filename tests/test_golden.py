"""The golden test, for every spec: the unfused module against the real transformers module.

Exactness (``torch.equal``) is required against the eager forward in fp32 and bf16, and through
``register`` + ``mtq.quantize`` with quantizers off; grouped_mm / batched_mm are compared with
``allclose`` at ``golden.IMPL_TOLERANCE`` (they reorder reductions; see that constant for why).

A declared ``golden.implementations`` entry is a promise: when the installed class no longer
dispatches (or a dispatching class is not declared), the test fails instead of skipping.
"""

from __future__ import annotations

import types

import pytest
import torch
from helpers import installed_spec, spec_names, spec_raw

import moe_unfuse
from moe_unfuse.tools import golden


@pytest.fixture
def spec(request: pytest.FixtureRequest) -> moe_unfuse.Spec:
    """The spec named by the parameter, loaded here (not at import); skipped when its class is not installed."""
    return installed_spec(request.param)


def per_spec(*, needs_model: bool = False):
    """Parametrize ``spec`` over every built-in arch (names read from the spec folder, the spec
    loaded by the fixture); with ``needs_model`` only those whose ``golden`` has a whole ``model``."""
    params = [
        pytest.param(arch, id=arch, marks=pytest.mark.arch(arch))
        for arch in spec_names()
        if not needs_model or (spec_raw(arch).get("golden") or {}).get("model")
    ]
    return pytest.mark.parametrize("spec", params, indirect=True)


def assert_all(results: list[golden.CheckResult]) -> None:
    failed = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    assert not failed, "; ".join(failed)


def _nested_codes(code: types.CodeType) -> set[types.CodeType]:
    found = set()
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= {const, *_nested_codes(const)}
    return found


def dispatches(cls: type) -> bool:
    """Whether ``cls.forward`` is the forward transformers' ``use_experts_implementation`` installs
    (the one that picks eager, grouped_mm or batched_mm from ``config._experts_implementation``)."""
    from transformers.integrations.moe import use_experts_implementation

    code = getattr(cls.forward, "__code__", None)
    return code is not None and code in _nested_codes(use_experts_implementation.__code__)


def declared_implementations(spec: moe_unfuse.Spec) -> list[str]:
    """``golden.implementations``, after checking it agrees with the installed class: a declared
    entry whose class lost its dispatch fails (it would otherwise compare nothing), and so does a
    dispatching class whose spec declares none."""
    impls = list((spec.golden or {}).get("implementations", []))
    cls = spec.resolve_class()
    if impls and not dispatches(cls):
        pytest.fail(
            f"{spec.arch}: golden.implementations declares {', '.join(impls)}, but the installed {spec.class_name}.forward "
            f"does not dispatch through transformers' use_experts_implementation; fix: remove golden.implementations "
            f"from {spec.source} (the class lost its grouped_mm/batched_mm dispatch) or point the spec at the class that has it",
            pytrace=False,
        )
    if not impls and dispatches(cls):
        pytest.fail(
            f"{spec.arch}: {spec.class_name} dispatches through use_experts_implementation, but golden.implementations "
            f"is not declared; fix: add `implementations: [grouped_mm, batched_mm]` to golden in {spec.source}",
            pytrace=False,
        )
    return impls


@per_spec()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unfused_equals_eager_exactly(spec, dtype):
    assert_all([golden.check_exact(spec, dtype)])


@per_spec()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unfused_close_to_grouped_and_batched(spec, dtype):
    impls = declared_implementations(spec)
    if not impls:
        pytest.skip(
            f"{spec.class_name} has no grouped_mm/batched_mm dispatch (not decorated with use_experts_implementation)"
        )
    results = golden.check_implementations(spec, dtype)
    compared = [r.name.rsplit("-", 1)[0] for r in results]
    assert compared == impls, f"declared {impls}, but golden.check_implementations compared {compared or 'nothing'}"
    assert_all(results)


@pytest.mark.parametrize(
    ("arch", "edit", "message"),
    [
        pytest.param(
            "llama4",
            lambda r: r["golden"].update(implementations=["grouped_mm"]),
            "does not dispatch through transformers' use_experts_implementation",
            id="declared-undecorated-llama4",
            marks=pytest.mark.arch("llama4"),
        ),
        pytest.param(
            "gemma4",
            lambda r: r["golden"].pop("implementations"),
            "golden.implementations is not declared",
            id="undeclared-decorated-gemma4",
            marks=pytest.mark.arch("gemma4"),
        ),
    ],
)
def test_implementations_that_disagree_with_the_class_fail_not_skip(mutated_spec, arch, edit, message):
    """Llama4TextExperts is undecorated: a spec that declares grouped_mm for it must fail the
    implementations test (before, check_implementations returned nothing and the test skipped)."""
    spec = mutated_spec.parse(arch, edit)
    try:
        test_unfused_close_to_grouped_and_batched(spec, torch.float32)
    except pytest.fail.Exception as exc:
        assert message in str(exc) and spec.class_name in str(exc), str(exc)
    except pytest.skip.Exception as exc:
        pytest.fail(f"skipped instead of failing: {exc}")
    else:
        pytest.fail("passed although the declaration disagrees with the class")


@per_spec()
def test_refuse_restores_bit_exact(spec):
    assert_all(golden.check_fuse(spec))


@per_spec()
def test_modelopt_quantizers_off_exact_and_fp8_calibrates_every_expert(spec):
    assert_all(golden.check_modelopt(spec))


@per_spec(needs_model=True)
def test_whole_model_logits_unchanged(spec):
    assert_all(golden.check_whole_model(spec))
