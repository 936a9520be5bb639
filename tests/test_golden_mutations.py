"""Every wrong spec we can think of fails: at load (SpecError) or in the golden checks (a SpecError
or a mismatch), whatever its ``golden`` section says. Mutations of gemma4 (standard layout) and
gpt_oss (transposed, interleaved, biases, clamped gate), applied to the real specs."""

from __future__ import annotations

import pytest
import torch

from moe_unfuse import SpecError
from moe_unfuse.tools import golden


def transposed(raw: dict) -> None:
    """The orientation flipped, with a shape that matches the flipped reading."""
    for p in raw["params"].values():
        p["axes"] = ["expert", "in", "out"] if p["axes"] == ["expert", "out", "in"] else ["expert", "out", "in"]
        p["shape"] = [p["shape"][0], p["shape"][2], p["shape"][1]]


def transposed_no_shape(raw: dict) -> None:
    for p in raw["params"].values():
        p["axes"] = ["expert", "in", "out"] if p["axes"] == ["expert", "out", "in"] else ["expert", "out", "in"]
        p.pop("shape")


def put(*path_value):
    *path, value = path_value

    def apply(raw: dict) -> None:
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value

    return apply


def swap_gate_up(raw: dict) -> None:
    p = next(p for p in raw["params"].values() if p["into"] == ["gate_proj", "up_proj"])
    p["into"] = ["up_proj", "gate_proj"]


def swap_roles(raw: dict) -> None:
    args = raw["forward"]["args"]
    index_name = next(k for k, v in args.items() if v == "top_k_index")
    weights_name = next(k for k, v in args.items() if v == "top_k_weights")
    args[index_name], args[weights_name] = "top_k_weights", "top_k_index"


def standard_arg_names(raw: dict) -> None:
    raw["forward"]["args"] = {
        "hidden_states": "hidden_states",
        "top_k_index": "top_k_index",
        "top_k_weights": "top_k_weights",
    }


def swap_dims(raw: dict) -> None:
    raw["dims"]["hidden"], raw["dims"]["intermediate"] = raw["dims"]["intermediate"], raw["dims"]["hidden"]


COMMON = {
    "swap gate and up": swap_gate_up,
    "transposed, matching shape": transposed,
    "transposed, no shape": transposed_no_shape,
    "accumulate in float32": put("forward", "accumulate", "float32"),
    "batch_first tokens": put("forward", "tokens", "batch_first"),
    "identity experts": put("forward", "identity_experts", 1),
    "extra expert rows": lambda r: next(iter(r["params"].values())).update(extra_experts=1),
    "routing roles swapped": swap_roles,
    "arg order reversed": lambda r: r["forward"].update(args=dict(reversed(list(r["forward"]["args"].items())))),
    "hidden and intermediate swapped": swap_dims,
    "wrong expert count attribute": put("dims", "num_experts", "hidden_dim"),
    "post-expert norm that is not there": put("post_expert_norm", {"attribute": "post_expert_norm"}),
    "fp32 compute": put("linear", "compute_dtype", "float32"),
    "rename with a bad regex": put("export", "renames", [{"engine": "vllm", "match": "experts.(", "replace": "x"}]),
    "rename for an unknown engine": put("export", "renames", [{"engine": "vlmm", "match": "a", "replace": "b"}]),
    "top_k above the experts": put("golden", "top_k", 9),
}

GEMMA4 = {
    **COMMON,
    "interleaved packing": lambda r: r["params"]["gate_up_proj"].update(packing="interleaved"),
    "silu activation": put("activation", {"name": "silu"}),
    "clamped gate": put("gate", {"kind": "clamped_glu", "limit": 0.5}),
    "a bias the class does not have": lambda r: r["params"]["down_proj"].update(bias="down_proj_bias"),
    "bias after matmul with no bias": put("linear", "bias", "after_matmul"),
    "arg names not the forward's": lambda r: r["forward"].update(
        args={"x": "hidden_states", "top_k_index": "top_k_index", "top_k_weights": "top_k_weights"}
    ),
    "unknown glu parameter": put("gate", "limit", 1.0),
    "top_k 2 hides nothing": lambda r: (put("golden", "top_k", 2)(r), put("forward", "accumulate", "float32")(r)),
}

GPT_OSS = {
    **COMMON,
    "concatenated packing": lambda r: r["params"]["gate_up_proj"].update(packing="concatenated"),
    "no gate/up bias": lambda r: r["params"]["gate_up_proj"].pop("bias"),
    "no down bias": lambda r: r["params"]["down_proj"].pop("bias"),
    "bias fused into the matmul": put("linear", None),
    "alpha a literal": put("gate", "alpha", 1.0),
    "limit not an attribute": put("gate", "limit", {"attribute": "swiglu_limit_missing"}),
    "glu gate instead": lambda r: r.update(gate={"kind": "glu"}, activation={"name": "silu"}),
    "gate parameter it does not take": put("gate", "beta", 2.0),
    "the standard arg names": standard_arg_names,
    "top_k 2 hides nothing": lambda r: (put("golden", "top_k", 2)(r), put("forward", "accumulate", "float32")(r)),
}


def verdict(mutated_spec, arch: str, mutate) -> str:
    """How the mutant fails: ``load``, ``check`` (a SpecError while checking) or ``mismatch``; ``passed`` is a bug."""
    try:
        spec = mutated_spec.load(arch, mutate, f"{arch}.yaml")
    except SpecError:
        return "load"
    try:
        for dtype in (torch.float32, torch.bfloat16):
            if not golden.check_exact(spec, dtype).ok:
                return "mismatch"
        if not all(r.ok for r in golden.check_fuse(spec)):
            return "mismatch"
    except SpecError:
        return "check"
    return "passed"


@pytest.mark.parametrize(
    ("arch", "name"),
    [pytest.param("gemma4", n, marks=pytest.mark.arch("gemma4")) for n in GEMMA4]
    + [pytest.param("gpt_oss", n, marks=pytest.mark.arch("gpt_oss")) for n in GPT_OSS],
)
def test_mutated_spec_fails(mutated_spec, arch, name):
    mutate = (GEMMA4 if arch == "gemma4" else GPT_OSS)[name]
    assert verdict(mutated_spec, arch, mutate) != "passed"


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param("gemma4", marks=pytest.mark.arch("gemma4")),
        pytest.param("gpt_oss", marks=pytest.mark.arch("gpt_oss")),
    ],
)
def test_the_unmutated_spec_passes(mutated_spec, arch):
    assert verdict(mutated_spec, arch, lambda raw: None) == "passed"


@pytest.mark.arch("gemma4")
def test_wrong_orientation_with_matching_shape_is_a_spec_error_in_check(mutated_spec, capsys):
    """``moe-unfuse check`` gives the same one-line SpecError that unfuse() gives, not a torch crash."""
    from moe_unfuse.cli.main import main

    path = mutated_spec.path("gemma4", transposed, "gemma4.yaml")
    assert main(["check", str(path), "--no-modelopt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "params.gate_up_proj.shape" in err and "crashed" not in err


@pytest.mark.arch("gemma4")
def test_check_calls_by_keyword_with_the_forwards_own_names(gemma4_spec):
    spec = gemma4_spec
    module = golden.build_experts(spec)
    _, kwargs = golden.make_inputs(module, spec, keywords=True)
    assert set(kwargs) == {"hidden_states", "top_k_index", "top_k_weights"}
    assert golden.golden_top_ks(module, spec) == (1, 2, 3)
    assert "positional and keyword" in golden.check_exact(spec, torch.float32).detail
