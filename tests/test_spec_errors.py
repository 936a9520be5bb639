"""Bad input gets one line naming the file, the field and the fix, and leaves the model untouched.

The broken specs here derive from gemma4's, which is verified: on a transformers it lists, their
faults are plain SpecErrors (on any other one they are drift, as tests/test_drift.py checks). The
installed version is simulated as one gemma4 lists, so these tests do not depend on which is installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import spec_raw

import moe_unfuse
from moe_unfuse import SpecError, UnknownArchError, load_spec
from moe_unfuse.base import versions
from moe_unfuse.core.drift import DriftError
from moe_unfuse.tools import golden

pytestmark = pytest.mark.arch("gemma4")


@pytest.fixture(autouse=True)
def on_a_verified_version(monkeypatch):
    """The installed transformers, as far as drift is concerned, is the first gemma4 is verified on."""
    monkeypatch.setattr(versions, "installed_version", lambda: versions.verified_versions(spec_raw("gemma4"))[0])


def assert_one_line(err: SpecError, path: Path, field: str) -> None:
    msg = str(err)
    assert not isinstance(err, DriftError), msg
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg
    assert err.field == field, msg
    assert "fix: " in msg and err.fix


CASES = {
    "unknown root key": (lambda r: r.update(colour="red"), "colour"),
    "unknown nested key": (lambda r: r["params"]["gate_up_proj"].update(axis=[0]), "params.gate_up_proj.axis"),
    "missing field": (lambda r: r.pop("forward"), "forward"),
    "wrong type": (lambda r: r["dims"].update(num_experts=4), "dims.num_experts"),
    "unknown axis name": (
        lambda r: r["params"]["down_proj"].update(axes=["expert", "rows", "in"]),
        "params.down_proj.axes.1",
    ),
    "class not importable": (
        lambda r: r["target"].update({"class": "transformers.models.gemma4.modeling_gemma4.Gemma9Experts"}),
        "target.class",
    ),
    "module not importable": (lambda r: r["target"].update({"class": "not_a_package.Experts"}), "target.class"),
    "packing not declared": (lambda r: r["params"]["gate_up_proj"].pop("packing"), "params.gate_up_proj.packing"),
    "unknown dim in shape": (
        lambda r: r["params"]["down_proj"].update(shape=["num_experts", "hiden", "intermediate"]),
        "params.down_proj.shape.1",
    ),
    "model and no_model": (lambda r: r["golden"].update(no_model="no causal LM class"), "golden.no_model"),
    "projection twice": (lambda r: r["params"]["down_proj"].update(into=["up_proj"]), "params.down_proj.into"),
    "unknown role": (
        lambda r: r["forward"].update(
            args={"hidden_states": "hidden_states", "top_k_index": "indices", "top_k_weights": "top_k_weights"}
        ),
        "forward.args.top_k_index",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_spec_is_one_line_error(mutated_spec, case):
    edit, field = CASES[case]
    path = mutated_spec.path("gemma4", edit)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert_one_line(info.value, path, field)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("arch: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and "fix:" in str(info.value)


def test_missing_base_spec(mutated_spec):
    path = mutated_spec.write({"arch": "x", "extends": "_nowhere"})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert_one_line(info.value, path, "extends")


def test_extends_merges_base(mutated_spec, gemma4_spec):
    mutated_spec.path("gemma4", lambda r: r.update(abstract=True), "_base.yaml")
    path = mutated_spec.write({"arch": "child", "extends": "_base", "description": "override"})
    spec = load_spec(path)
    assert spec.arch == "child" and spec.description == "override" and spec.params == gemma4_spec.params


def snapshot(module: torch.nn.Module) -> tuple[type, dict[str, torch.Tensor]]:
    return type(module), {k: v.clone() for k, v in module.state_dict().items()}


def assert_untouched(module: torch.nn.Module, snap) -> None:
    cls, state = snap
    assert type(module) is cls
    now = module.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert not hasattr(module, "_moe_unfuse") and "0" not in module._modules


def test_wrong_shape_errors_at_unfuse_and_leaves_module_untouched(mutated_spec):
    # The transposed orientation declared for a standard-layout module: caught by the shape check.
    path = mutated_spec.path(
        "gemma4",
        lambda r: r["params"]["gate_up_proj"].update(
            axes=["expert", "in", "out"], shape=["num_experts", "hidden", "2*intermediate"]
        ),
    )
    spec = load_spec(path)
    module = golden.build_experts(spec)
    snap = snapshot(module)
    with pytest.raises(SpecError) as info:
        moe_unfuse.unfuse(module, spec)
    assert_one_line(info.value, path, "params.gate_up_proj.shape")
    assert "[4, 80, 64]" in str(info.value)
    assert_untouched(module, snap)


def test_split_that_does_not_divide_errors(mutated_spec):
    raw = mutated_spec.raw(
        "gemma4",
        lambda r: (
            r["params"]["gate_up_proj"].update(axes=["expert", "in", "out"]),
            r["params"]["gate_up_proj"].pop("shape"),
        ),
    )
    raw["golden"]["config_kwargs"]["hidden_size"] = 63
    spec = load_spec(mutated_spec.write(raw))
    module = golden.build_experts(spec)
    snap = snapshot(module)
    with pytest.raises(SpecError) as info:
        moe_unfuse.unfuse(module, spec)
    assert info.value.field == "params.gate_up_proj.into" and "does not split" in str(info.value)
    assert_untouched(module, snap)


def test_missing_dim_attribute_errors(mutated_spec, gemma4_spec):
    spec = load_spec(mutated_spec.path("gemma4", lambda r: r["dims"].update(num_experts="n_experts")))
    module = golden.build_experts(gemma4_spec)
    snap = snapshot(module)
    with pytest.raises(SpecError) as info:
        moe_unfuse.unfuse(module, spec)
    assert info.value.field == "dims.num_experts" and "n_experts" in str(info.value)
    assert_untouched(module, snap)


def test_unknown_arch_lists_known():
    with pytest.raises(UnknownArchError) as info:
        moe_unfuse.register("gemma5")
    msg = str(info.value)
    assert "gemma5" in msg and "gemma4" in msg and "\n" not in msg
    with pytest.raises(UnknownArchError):
        moe_unfuse.unfuse(torch.nn.Linear(2, 2), "gemma5")
