"""The spec language's non-standard fields: each bad value is one line naming file, field and fix;
each declared gate kind reproduces a real class's own gate; forward and gate kinds are plugins;
the new layout pieces reverse exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from helpers import spec_names

import moe_unfuse
from moe_unfuse import SpecError, load_spec
from moe_unfuse.base.kinds import ForwardKind, GateKind
from moe_unfuse.base.layout import Narrow, Split, layout_for
from moe_unfuse.core.experts import LinearExact, linear_over
from moe_unfuse.default_plugins.clamped_gates import clamped_swiglu_alpha
from moe_unfuse.plugins.hookspecs import hookimpl
from moe_unfuse.tools import golden


def assert_one_line(err: SpecError, path: Path, field: str) -> None:
    msg = str(err)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert err.field == field, msg
    assert "fix: " in msg and err.fix


def case(arch: str, edit: Callable[[dict], Any], field: str, id: str) -> Any:
    return pytest.param(arch, edit, field, id=id, marks=pytest.mark.arch(arch))


LOAD_CASES = [
    case("gpt_oss", lambda r: r["forward"].update(accumulat="float32"), "forward.accumulat", "unknown forward option"),
    case("gpt_oss", lambda r: r["forward"].update(accumulate="float64"), "forward.accumulate", "bad accumulate value"),
    case("dbrx", lambda r: r["forward"].update(tokens="batch"), "forward.tokens", "bad tokens value"),
    case(
        "jetmoe",
        lambda r: r["forward"].update(args={"inputs": "hidden_states", "expert_size": "top_k_index"}),
        "forward.args.expert_size",
        "role not of the kind",
    ),
    case(
        "inkling_shared",
        lambda r: r["forward"].update(args={"hidden_states": "hidden_states"}),
        "forward.args",
        "role missing for the kind",
    ),
    case(
        "longcat_flash",
        lambda r: r["forward"].update(identity_experts="zeros"),
        "forward.identity_experts",
        "identity experts unknown dim",
    ),
    case(
        "longcat_flash",
        lambda r: r["params"]["gate_up_proj"].update(extra_experts="zeros"),
        "params.gate_up_proj.extra_experts",
        "extra experts unknown dim",
    ),
    case(
        "dbrx",
        lambda r: r["params"]["mlp.w1"].update(extra_experts=1),
        "params.mlp.w1.extra_experts",
        "extra experts on a flattened axis",
    ),
    case(
        "dbrx",
        lambda r: r["params"].update({"mlp..w3": r["params"].pop("mlp.w2")}),
        "params",
        "malformed dotted param name",
    ),
    case("gpt_oss", lambda r: r["gate"].update(beta=1.0), "gate.beta", "unknown gate parameter"),
    case("gpt_oss", lambda r: r["gate"].pop("limit"), "gate.limit", "missing gate parameter"),
    case("gpt_oss", lambda r: r["gate"].update(alpha={"attr": "alpha"}), "gate.alpha", "gate value of the wrong form"),
    case(
        "aria", lambda r: r.update(linear={"bias": "after_matmul"}), "linear.bias", "bias after matmul without a bias"
    ),
    case(
        "gpt_oss",
        lambda r: r["linear"].update(compute_dtype="float64"),
        "linear.compute_dtype",
        "unknown compute dtype",
    ),
    case(
        "aria",
        lambda r: r["params"]["down_proj"].update(into=["linear"]),
        "params.down_proj.into",
        "linear projection in a routed spec",
    ),
    case(
        "jetmoe",
        lambda r: r["params"]["weight"].update(into=["gate_proj", "up_proj"], packing="concatenated"),
        "params",
        "mlp projections in an expert bank",
    ),
    case(
        "muse_spark",
        lambda r: r.update(post_expert_norm={}),
        "post_expert_norm.attribute",
        "post-expert norm without attribute",
    ),
]


@pytest.mark.parametrize("arch, edit, field", LOAD_CASES)
def test_bad_value_is_one_line_error_at_load(mutated_spec, arch, edit, field):
    path = mutated_spec.path(arch, edit)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert_one_line(info.value, path, field)


UNFUSE_CASES = [
    case(
        "gpt_oss",
        lambda r: r["gate"].update(alpha={"attribute": "swiglu_alpha"}),
        "gate",
        "gate attribute missing on the module",
    ),
    case("gpt_oss", lambda r: r["gate"].update(alpha="fast"), "gate", "gate parameter not a number"),
    case(
        "muse_spark",
        lambda r: r["post_expert_norm"].update(attribute="post_norm"),
        "post_expert_norm.attribute",
        "post-expert norm missing on the module",
    ),
    case(
        "dbrx",
        lambda r: r["params"].update({"mlp.w9": r["params"].pop("mlp.w2")}),
        "params.mlp.w9.axes",
        "dotted param missing",
    ),
    case(
        "longcat_flash",
        lambda r: r["params"]["gate_up_proj"].update(extra_experts=1, shape=None),
        "params.gate_up_proj.extra_experts",
        "extra expert rows miscounted",
    ),
    case(
        "longcat_flash",
        lambda r: r["forward"].update(identity_experts="0-1"),
        "forward.identity_experts",
        "negative identity experts",
    ),
]


@pytest.mark.parametrize("arch, edit, field", UNFUSE_CASES)
def test_bad_value_for_the_module_errors_at_unfuse_and_leaves_it_untouched(mutated_spec, arch, edit, field):
    raw = mutated_spec.raw(arch, edit)
    for p in raw["params"].values():  # shape: null in an edit means "drop it"
        if "shape" in p and p["shape"] is None:
            del p["shape"]
    path = mutated_spec.write(raw)
    spec = load_spec(path)
    module = golden.build_experts(spec)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cls = type(module)
    with pytest.raises(SpecError) as info:
        moe_unfuse.unfuse(module, spec)
    assert_one_line(info.value, path, field)
    assert type(module) is cls and not hasattr(module, "_moe_unfuse")
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# --- declared gates reproduce the classes' own _apply_gate ---------------------------------------


def _declared(arch: str, gate: dict, activation: dict | None) -> Any:
    def edit(raw: dict) -> None:
        raw["gate"] = gate
        raw.pop("activation", None)
        if activation is not None:
            raw["activation"] = activation

    return pytest.param(
        arch,
        edit,
        id=arch,
        marks=[pytest.mark.arch(arch)] + ([] if arch in spec_names() else [pytest.mark.skip(reason=f"no {arch} spec")]),
    )


DECLARED_GATES = [
    _declared("deepseek_v4", {"kind": "clamped_glu", "limit": {"attribute": "limit"}}, {"attribute": "act_fn"}),
    _declared("glm5_next", {"kind": "clamped_glu", "limit": {"attribute": "swiglu_limit"}}, {"name": "silu"}),
    _declared("hy_v4", {"kind": "clamped_glu", "limit": {"config": "swiglu_limit"}}, {"name": "silu"}),
    _declared(
        "step3p7",
        {"kind": "clamped_glu", "limit": {"attribute": "limit"}, "clamp": "after_activation"},
        {"attribute": "act_fn"},
    ),
    _declared(
        "minimax_m3_vl",
        {"kind": "clamped_swiglu_alpha", "alpha": {"config": "swiglu_alpha"}, "limit": {"attribute": "swiglu_limit"}},
        None,
    ),
]


@pytest.mark.parametrize("arch, edit", DECLARED_GATES)
def test_declared_gate_kind_matches_the_class_gate_exactly(mutated_spec, arch, edit):
    """The same spec with ``module_method`` replaced by a declared kind stays bit-exact (the golden
    configs set the clamp limit to 1.0, so the clamps bind on these O(1) activations)."""
    spec = load_spec(mutated_spec.path(arch, edit))
    results = [golden.check_exact(spec, torch.float32), golden.check_exact(spec, torch.bfloat16)]
    assert all(r.ok for r in results), [f"{r.name}: {r.detail}" for r in results]


@pytest.mark.arch("gpt_oss")
def test_declared_gate_sees_the_clamp(mutated_spec):
    """Negative control: a different limit than the module's breaks exactness, so the clamp is applied."""
    spec = load_spec(mutated_spec.path("gpt_oss", lambda r: r["gate"].update(limit=0.5)))
    assert not golden.check_exact(spec, torch.float32).ok


# --- forward and gate kinds as third-party plugins --------------------------------------------------


@pytest.mark.arch("gpt_oss")
def test_plugin_forward_and_gate_kinds(mutated_spec, registered_plugin):
    """A plugin adds a gate kind with its own parameters and a forward kind with its own roles; the
    spec language checks both at load, and the unfused module is exact with them."""

    def plugin_routed(module, *args, **kwargs):
        """A third party's token loop under its own role names."""
        state = module._moe_unfuse
        bound = state.bind(args, kwargs)
        x, ids, scores = bound["tokens"], bound["expert_ids"], bound["scores"]
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(ids, num_classes=state.num_experts).permute(2, 1, 0)
        for e in range(state.num_experts):
            pos, tok = torch.where(mask[e])
            if tok.numel():
                out.index_add_(0, tok, (module[e](x[tok]) * scores[tok, pos, None]).to(out.dtype))
        return out

    class Plugin:
        @hookimpl
        def register_gates(self, register):
            register(
                "plugin_swiglu",
                GateKind(
                    build=lambda m, cfg, act, split: clamped_swiglu_alpha(
                        m, {"alpha": cfg["slope"], "limit": cfg["bound"]}, act, split
                    ),
                    params={"slope": "sigmoid slope", "bound": "clamp bound"},
                    required=("slope", "bound"),
                    needs_activation=False,
                ),
            )

        @hookimpl
        def register_forwards(self, register):
            register(
                "plugin_routed",
                ForwardKind(
                    forward=plugin_routed,
                    roles=("tokens", "expert_ids", "scores"),
                    golden_inputs=lambda module, spec, v, gen: {
                        "tokens": v["hidden_states"],
                        "expert_ids": v["top_k_index"],
                        "scores": v["top_k_weights"],
                    },
                ),
            )

    obj = registered_plugin(Plugin(), name="kinds-plugin")

    def edit(raw: dict) -> None:
        raw["gate"] = {"kind": "plugin_swiglu", "slope": {"attribute": "alpha"}, "bound": {"attribute": "limit"}}
        raw["forward"] = {
            "kind": "plugin_routed",
            "args": {"hidden_states": "tokens", "router_indices": "expert_ids", "routing_weights": "scores"},
        }

    spec = load_spec(mutated_spec.path("gpt_oss", edit))
    assert golden.check_exact(spec, torch.float32).ok and golden.check_exact(spec, torch.bfloat16).ok
    bad = mutated_spec.path("gpt_oss", lambda r: (edit(r), r["gate"].update(alpha=1.0)))
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert_one_line(info.value, bad, "gate.alpha")
    assert "slope, bound" in str(info.value)
    bad = mutated_spec.path(
        "gpt_oss", lambda r: (edit(r), r["forward"]["args"].update(routing_weights="top_k_weights"))
    )
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert_one_line(info.value, bad, "forward.args.routing_weights")
    moe_unfuse.unregister_plugin(obj)
    assert "plugin_routed" not in moe_unfuse.registry().forwards


# --- layout pieces ------------------------------------------------------------------------------------


def shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@pytest.mark.arch("longcat_flash")
def test_narrow_sets_rows_aside_and_reverses_exactly():
    fused = torch.randn(6, 10, 4)
    op = Narrow(0, 4)
    kept, rest = op.apply(fused), op.rest(fused)
    assert shares_storage(kept, fused) and shares_storage(rest, fused) and kept.shape[0] == 4 and rest.shape[0] == 2
    assert torch.equal(op.reverse(kept.clone(), rest.clone()), fused)
    layout = layout_for(("expert", "out", "in"), 2, "concatenated", {"expert": 4}, extra_experts=True)
    parts = layout.unfuse(fused)
    assert len(parts[0]) == 4 and layout.aliases(fused, parts)
    copies = [[t.clone() for t in part] for part in parts]
    assert torch.equal(layout.refuse(copies, layout.rest(fused).clone()), fused)
    with pytest.raises(ValueError):
        layout.refuse(copies)  # the set-aside rows are needed
    with pytest.raises(ValueError):
        layout_for(("expert*out", "in"), 1, "concatenated", {"expert": 4}, extra_experts=True)


@pytest.mark.arch("dbrx")
def test_separate_packing_keeps_gate_and_up_apart():
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    split = Split(-1, 2, "separate")
    packed = split.reverse([gate, up])
    assert packed[0] is gate and packed[1] is up
    assert all(a is b for a, b in zip(split.apply(packed), (gate, up)))


@pytest.mark.arch("gpt_oss")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_exact_numerics(dtype):
    """bias_after is ``x @ W + b`` bit for bit; compute_dtype upcasts a strided half of a transposed
    fused weight keeping its stride order, as the original's upcast of the whole expert does."""
    fused = (torch.randn(64, 80) * 0.1).to(dtype)  # one expert of a transposed [H, 2I] weight
    bias = (torch.randn(80) * 0.1).to(dtype)
    x = torch.randn(7, 64).to(dtype)
    lin = linear_over(fused[:, :40].T, bias[:40], False, bias_after=True)
    assert isinstance(lin, LinearExact) and lin.weight.data_ptr() == fused.data_ptr()
    assert torch.equal(lin(x), (x @ fused + bias)[:, :40])
    lin32 = linear_over(fused[:, 40:].T, bias[40:], False, bias_after=True, compute_dtype=torch.float32)
    expected = (x.float() @ fused.float() + bias.float())[:, 40:]
    assert lin32(x).dtype == torch.float32 and torch.equal(lin32(x), expected)
    assert type(linear_over(fused.T, None, False, bias_after=True)) is torch.nn.Linear  # nothing to reorder
