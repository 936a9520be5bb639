"""The public API on Gemma 4: unfuse/refuse semantics, the unfused module's shape, register."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_unfuse
from moe_unfuse import UncoveredExpertsError, unfuse
from moe_unfuse.core.experts import ExpertMLP
from moe_unfuse.tools import golden

pytestmark = pytest.mark.arch("gemma4")


@pytest.fixture
def spec(gemma4_spec: moe_unfuse.Spec) -> moe_unfuse.Spec:
    """The Gemma 4 spec every test here runs on (loaded per test, not at import)."""
    return gemma4_spec


class TwoLayers(nn.Module):
    def __init__(self, spec: moe_unfuse.Spec):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"experts": golden.build_experts(spec, seed=i)}) for i in range(2))


def test_unfused_module_layout_and_zero_copy(spec):
    module = golden.build_experts(spec)
    fused = module.gate_up_proj.detach()
    report = unfuse(module)
    assert [m.status for m in report.modules] == ["unfused"] and report.num_linears == 12
    assert isinstance(module, spec.resolve_class())
    assert len(module) == 4 and all(isinstance(e, ExpertMLP) for e in module)
    assert module[1] is module._modules["1"] and module[-1] is module[3] and module[torch.tensor(2)] is module[2]
    with pytest.raises(IndexError):
        module[4]
    keys = list(module.state_dict())
    assert keys[:3] == ["0.gate_proj.weight", "0.up_proj.weight", "0.down_proj.weight"]
    assert not any("gate_up_proj" in k for k in keys) and len(keys) == 12
    gate = module[2].gate_proj.weight
    assert gate.shape == (40, 64) and gate.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(gate, fused[2, :40]) and torch.equal(module[2].up_proj.weight, fused[2, 40:])
    assert isinstance(module[0].down_proj, nn.Linear) and module[0].down_proj.in_features == 40


def test_unfuse_is_idempotent_and_refuse_is_bit_exact(spec):
    model = TwoLayers(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = unfuse(model)
    second = unfuse(model)
    assert [m.status for m in first.modules] == ["unfused"] * 2
    assert [m.status for m in second.modules] == ["already unfused"] * 2 and not second.changed
    report = moe_unfuse.fuse(model)
    assert [m.status for m in report.modules] == ["fused"] * 2
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert type(model.layers[0]["experts"]) is spec.resolve_class()


def test_refuse_after_dtype_change_rebuilds_from_experts(spec):
    module = golden.build_experts(spec)
    reference = module.gate_up_proj.detach().to(torch.bfloat16)
    unfuse(module)
    module.to(torch.bfloat16)  # every per-expert tensor becomes its own copy
    moe_unfuse.fuse(module)
    assert module.gate_up_proj.dtype == torch.bfloat16 and torch.equal(module.gate_up_proj, reference)


def test_unfuse_is_atomic_when_a_later_module_fails(monkeypatch, spec):
    model = TwoLayers(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    import importlib

    unfuse_mod = importlib.import_module("moe_unfuse.core.unfusing")

    real = unfuse_mod.apply_plan
    calls = []

    def flaky(plan, swap_class=True):
        calls.append(plan.path)
        if len(calls) == 2:
            raise RuntimeError("simulated failure on the second module")
        real(plan, swap_class)

    monkeypatch.setattr(unfuse_mod, "apply_plan", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        unfuse(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(type(layer["experts"]) is spec.resolve_class() for layer in model.layers)


def test_unfuse_plans_everything_before_mutating(spec):
    model = TwoLayers(spec)
    second = model.layers[1]["experts"]
    second.down_proj = nn.Parameter(torch.zeros(4, 64, 41))  # wrong shape: planning fails on layer 1
    with pytest.raises(moe_unfuse.SpecError, match="down_proj"):
        unfuse(model)
    assert (
        type(model.layers[0]["experts"]) is spec.resolve_class()
        and "gate_up_proj" in model.layers[0]["experts"]._parameters
    )


class StrangeExperts(nn.Module):
    """A fused experts class no spec covers."""

    def __init__(self):
        super().__init__()
        self.num_experts = 2
        self.w_in = nn.Parameter(torch.zeros(2, 8, 4))


def test_uncovered_fused_experts_fail_loudly(spec):
    model = nn.ModuleDict({"covered": golden.build_experts(spec), "strange": StrangeExperts()})
    with pytest.raises(UncoveredExpertsError, match="strange.w_in") as info:
        unfuse(model)
    assert "\n" not in str(info.value) and "fix:" in str(info.value)
    assert "gate_up_proj" in model["covered"]._parameters  # untouched
    report = unfuse(model, allow_uncovered=True)
    assert [m.path for m in report.changed] == ["covered"]


def test_unfuse_with_arch_that_matches_nothing():
    with pytest.raises(moe_unfuse.MoeUnfuseError, match="no Gemma4TextExperts"):
        unfuse(nn.Sequential(nn.Linear(2, 2)), "gemma4")


def test_register_twice_is_harmless_and_replaces_foreign_registration(spec):
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    cls = spec.resolve_class()
    first = moe_unfuse.register("gemma4")
    assert moe_unfuse.register("gemma4") is first
    QuantModuleRegistry.unregister(cls)
    QuantModuleRegistry.register({cls: "someone.else"})(type("ForeignQuant", (nn.Module,), {}))
    replaced = moe_unfuse.register("gemma4")
    assert QuantModuleRegistry._registry[cls] is replaced


def test_unfused_forward_with_keyword_arguments_and_sentinel_experts(spec):
    module = golden.build_experts(spec)
    (hidden, index, weights), _ = golden.make_inputs(module, spec)
    index = index.clone()
    index[0, 0] = 4  # expert-parallel sentinel: skipped by the original too
    with torch.no_grad():
        expected = module(hidden, top_k_index=index, top_k_weights=weights)
        unfuse(module)
        got = module(hidden, top_k_index=index, top_k_weights=weights)
    assert torch.equal(got, expected)


def test_plain_linears_take_the_fused_gemm_and_observed_ones_the_split_path(spec):
    module = golden.build_experts(spec)
    (hidden, index, weights), _ = golden.make_inputs(module, spec)
    with torch.no_grad():
        expected = module(hidden, index, weights)
    unfuse(module)
    expert = module[0]
    with torch.no_grad():
        assert expert._packed_gate_up() is not None  # plain, unobserved: one GEMM on the fused block
    seen = []
    handle = expert.gate_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        assert expert._packed_gate_up() is None
        observed = module(hidden, index, weights)
    handle.remove()
    assert seen and torch.equal(observed, expected)  # the hook saw gate_proj run, output unchanged
    with torch.enable_grad():
        assert expert._packed_gate_up() is None  # training: gradients must reach the per-expert weights
        out = module(hidden, index, weights)
        out.sum().backward()
    assert expert.gate_proj.weight.grad is not None and torch.equal(out.detach(), expected)
    module.to(torch.bfloat16)  # the weights no longer view the fused block
    with torch.no_grad():
        assert expert._packed_gate_up() is None
