"""Third-party plugins contribute specs and activations through the same hooks as the built-ins."""

from __future__ import annotations

import pytest
import torch

import moe_unfuse
from moe_unfuse.plugins.hookspecs import hookimpl
from moe_unfuse.plugins.manager import DEFAULT_PLUGINS, manager
from moe_unfuse.tools import golden

pytestmark = pytest.mark.arch("gemma4")


def test_builtin_features_are_registered_as_plugins():
    pm = manager()
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
def plugin(mutated_spec, registered_plugin):
    mutated_spec.path(
        "gemma4", lambda r: r.update(arch="gemma4_plugin", activation={"name": "counting_gelu"}), "gemma4_plugin.yaml"
    )
    spec_dir = mutated_spec.directory
    act = CountingGelu()

    class Plugin:
        @hookimpl
        def register_specs(self, register):
            register(spec_dir)

        @hookimpl
        def register_activations(self, register):
            register("counting_gelu", lambda: act)

    registered_plugin(Plugin(), name="test-plugin")
    return act


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


def test_plugin_is_gone_after_unregister(registered_plugin):
    class Plugin:
        @hookimpl
        def register_activations(self, register):
            register("temporary_act", lambda: torch.tanh)

    obj = registered_plugin(Plugin())
    assert "temporary_act" in moe_unfuse.registry().activations
    moe_unfuse.unregister_plugin(obj)
    assert "temporary_act" not in moe_unfuse.registry().activations


def test_duplicate_names_across_plugins_are_an_error(registered_plugin):
    class Clash:
        @hookimpl
        def register_gates(self, register):
            register("glu", lambda *a: None)

    obj = Clash()
    with pytest.raises(
        moe_unfuse.MoeUnfuseError,
        match="plugins 'moe_unfuse.default_plugins.gates' and .* both register the gate kind 'glu'",
    ):
        registered_plugin(obj, name="clash")
        moe_unfuse.registry()
    moe_unfuse.unregister_plugin(obj)
    assert "glu" in moe_unfuse.registry().gates


def test_plugin_adds_a_command(registered_plugin, capsys) -> None:
    """A plugin contributes a ``moe-unfuse`` subcommand through ``register_commands``."""
    import types

    from moe_unfuse.cli.main import main

    command = types.SimpleNamespace(
        __doc__="Say hello (a plugin's command).",
        add_arguments=lambda parser: parser.add_argument("--name", default="world"),
        run=lambda args: print(f"hello {args.name}") or 0,
    )

    class Plugin:
        @moe_unfuse.hookimpl
        def register_commands(self, register):
            register("hello", command)

    registered_plugin(Plugin())
    assert main(["hello", "--name", "moe"]) == 0
    assert capsys.readouterr().out == "hello moe\n"


def test_plugin_command_cannot_shadow_a_builtin(registered_plugin, capsys) -> None:
    import types

    from moe_unfuse.cli.main import main

    class Plugin:
        @moe_unfuse.hookimpl
        def register_commands(self, register):
            register("verify", types.SimpleNamespace(__doc__="x", add_arguments=lambda p: None, run=lambda a: 0))

    registered_plugin(Plugin())
    assert main(["list"]) == 2
    assert "a plugin registers the command 'verify'" in capsys.readouterr().err


def test_entry_points_can_be_skipped(monkeypatch) -> None:
    """``MOE_UNFUSE_NO_ENTRY_POINTS`` (the suite sets it): a broken installed plugin cannot break us."""
    from moe_unfuse.plugins import manager as plugins

    calls = []
    monkeypatch.setattr(plugins, "_pm", None)
    monkeypatch.setattr(
        plugins.pluggy.PluginManager, "load_setuptools_entrypoints", lambda self, group: calls.append(group)
    )
    monkeypatch.setenv(plugins.NO_ENTRY_POINTS_ENV, "1")
    plugins.manager()
    assert calls == []
    monkeypatch.setattr(plugins, "_pm", None)
    monkeypatch.delenv(plugins.NO_ENTRY_POINTS_ENV)
    plugins.manager()
    assert calls == ["moe_unfuse"]


def test_a_broken_entry_point_is_one_line(monkeypatch) -> None:
    from moe_unfuse.plugins import manager as plugins

    def boom(self, group):
        raise ImportError("No module named 'their_plugin'")

    monkeypatch.setattr(plugins, "_pm", None)
    monkeypatch.setattr(plugins.pluggy.PluginManager, "load_setuptools_entrypoints", boom)
    monkeypatch.delenv(plugins.NO_ENTRY_POINTS_ENV, raising=False)
    with pytest.raises(moe_unfuse.MoeUnfuseError, match="their_plugin.*MOE_UNFUSE_NO_ENTRY_POINTS=1"):
        plugins.manager()


def test_refuse_and_infer_are_deprecated_aliases(capsys) -> None:
    import warnings

    from moe_unfuse.cli.main import main

    model = torch.nn.Module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert moe_unfuse.refuse(model).modules == []
    assert any(issubclass(w.category, DeprecationWarning) and "moe_unfuse.fuse" in str(w.message) for w in caught)
    with pytest.raises(SystemExit) as done:
        main(["infer", "--help"])
    assert done.value.code == 0 and "Draft a spec" in capsys.readouterr().out


def test_builtin_specs_prefer_the_installed_package_data(tmp_path, monkeypatch) -> None:
    """An installed wheel reads its own ``moe_unfuse/_specs``, not a ``specs`` folder that happens to
    sit at ``site-packages/../specs``; a checkout without package data reads its ``specs/``."""
    from moe_unfuse.default_plugins import builtin_specs

    package = tmp_path / "site-packages" / "moe_unfuse"
    (package / "_specs").mkdir(parents=True)
    (tmp_path / "specs").mkdir()  # the stray folder next to site-packages
    monkeypatch.setattr(builtin_specs.resources, "files", lambda name: package)
    assert builtin_specs.builtin_spec_dir() == package / "_specs"
    (package / "_specs").rmdir()
    assert (
        builtin_specs.builtin_spec_dir().name == "specs"
        and (builtin_specs.builtin_spec_dir() / "gemma4.yaml").is_file()
    )


@pytest.mark.arch("jetmoe")
def test_contributing_forward_kind_example_is_exact(mutated_spec, registered_plugin):
    """CONTRIBUTING's worked forward kind, run as a plugin: it imports only ``moe_unfuse.plugin`` and
    its unfused JetMoE forward equals the original's bit for bit (same per-expert GEMMs on views)."""
    import types
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    code = text.split("less its empty-input case):\n\n```python\n", 1)[1].split("```", 1)[0]
    assert "from moe_unfuse.plugin import" in code and "moe_unfuse." not in code.replace("moe_unfuse.plugin", "")
    example = types.ModuleType("contributing_example")
    exec(compile(code, "CONTRIBUTING.md", "exec"), example.__dict__)  # noqa: S102 - our own documentation
    registered_plugin(example, name="contributing-example")
    spec = mutated_spec.load("jetmoe", lambda r: r["forward"].update(kind="my_expert_bank"))
    module = golden.build_experts(spec)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    sizes = [3, 0, 5, 2]
    with torch.no_grad():
        want = module(x, sizes)
        moe_unfuse.unfuse(module, spec)
        got = module(x, sizes)
    assert torch.equal(got, want)


def test_public_plugin_api_names_resolve_lazily():
    """Every name ``moe_unfuse.plugin`` lists resolves; ``hookimpl`` alone costs no torch import
    (a spec-folder plugin, and ``moe-unfuse list``, stay light)."""
    import subprocess
    import sys

    import moe_unfuse.plugin as api

    assert all(getattr(api, name) is not None for name in api.__all__)
    code = "import sys; from moe_unfuse.plugin import hookimpl; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_contributing_command_example_runs(registered_plugin, capsys):
    """CONTRIBUTING's worked command, run as a plugin through the real entry point: it imports only
    ``moe_unfuse.plugin`` and prints the spec's fused parameters and their projections."""
    import types
    from pathlib import Path

    from moe_unfuse.cli.main import main

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    code = text.split("the per-expert projections a spec's fused parameters split into:\n\n```python\n", 1)[1]
    code = code.split("```", 1)[0]
    assert "from moe_unfuse.plugin import" in code and "moe_unfuse." not in code.replace("moe_unfuse.plugin", "")
    example = types.ModuleType("contributing_command")
    exec(compile(code, "CONTRIBUTING.md", "exec"), example.__dict__)  # noqa: S102 - our own documentation
    registered_plugin(example, name="contributing-command")
    assert main(["projections", "gemma4"]) == 0
    spec = moe_unfuse.get_spec("gemma4")
    assert capsys.readouterr().out.splitlines() == [f"{p.name}: {', '.join(p.into)}" for p in spec.params]
    assert main(["projections", "no_such_arch"]) == 2  # an unknown arch is one line, exit status 2
    assert "no_such_arch" in capsys.readouterr().err


def test_plugin_command_cannot_take_a_builtin_alias(registered_plugin, capsys) -> None:
    """``infer`` is ``draft``'s old name: a plugin's command of that name is one line, exit status 2."""
    import types

    from moe_unfuse.cli.main import main

    class Plugin:
        @moe_unfuse.hookimpl
        def register_commands(self, register):
            register("infer", types.SimpleNamespace(__doc__="x", add_arguments=lambda p: None, run=lambda a: 0))

    registered_plugin(Plugin())
    assert main(["list"]) == 2
    assert "the command 'draft' has the alias 'infer', which is already the command 'infer'" in capsys.readouterr().err
