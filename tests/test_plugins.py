"""Third-party plugins contribute specs and activations through the same hooks as the built-ins."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import moe_unfuse
from moe_unfuse import golden
from moe_unfuse.hookspecs import hookimpl
from moe_unfuse.plugins import DEFAULT_PLUGINS, pm
from moe_unfuse.spec import merged_raw

pytestmark = pytest.mark.arch("gemma4")


def test_builtin_features_are_registered_as_plugins():
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert set(DEFAULT_PLUGINS) <= names
    reg = moe_unfuse.registry()
    assert {"glu", "module_method", "none"} <= set(reg.gates)
    assert "routed" in reg.forwards and "modelopt" in reg.backends and "silu" in reg.activations


class CountingGelu:
    """tanh-GELU (Gemma 4's activation) that counts its calls, to prove the plugin's is the one used."""

    def __init__(self):
        self.calls = 0
        self.fn = torch.nn.functional.gelu

    def __call__(self, x):
        self.calls += 1
        return self.fn(x, approximate="tanh")


@pytest.fixture
def plugin(tmp_path):
    raw = copy.deepcopy(merged_raw(Path(moe_unfuse.get_spec("gemma4").source)))
    raw["arch"] = "gemma4_plugin"
    raw["activation"] = {"name": "counting_gelu"}
    (tmp_path / "gemma4_plugin.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    act = CountingGelu()

    class Plugin:
        @hookimpl
        def register_specs(self, register):
            register(tmp_path)

        @hookimpl
        def register_activations(self, register):
            register("counting_gelu", lambda: act)

    obj = Plugin()
    moe_unfuse.register_plugin(obj, name="test-plugin")
    yield act
    moe_unfuse.unregister_plugin(obj)


def test_plugin_contributes_spec_and_activation(plugin):
    assert "gemma4_plugin" in moe_unfuse.list_specs()
    spec = moe_unfuse.get_spec("gemma4_plugin")
    module = golden.build_experts(spec)
    args, _ = golden.make_inputs(module, spec)
    with torch.no_grad():
        expected = module(*args)
        report = moe_unfuse.unfuse(module, "gemma4_plugin")
        got = module(*args)
    assert report.changed[0].arch == "gemma4_plugin"
    assert plugin.calls == 4  # once per hit expert: the plugin's activation ran
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # F.gelu(tanh) vs ACT2FN's module: same formula


def test_plugin_is_gone_after_unregister(tmp_path):
    class Plugin:
        @hookimpl
        def register_activations(self, register):
            register("temporary_act", lambda: torch.tanh)

    obj = Plugin()
    moe_unfuse.register_plugin(obj)
    assert "temporary_act" in moe_unfuse.registry().activations
    moe_unfuse.unregister_plugin(obj)
    assert "temporary_act" not in moe_unfuse.registry().activations


def test_duplicate_names_across_plugins_are_an_error():
    class Clash:
        @hookimpl
        def register_gates(self, register):
            register("glu", lambda *a: None)

    obj = Clash()
    with pytest.raises(moe_unfuse.MoeUnfuseError, match="two plugins register the gate kind 'glu'"):
        moe_unfuse.register_plugin(obj, name="clash")
        moe_unfuse.registry()
    moe_unfuse.unregister_plugin(obj)
    assert "glu" in moe_unfuse.registry().gates
