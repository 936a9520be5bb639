"""Serving engines are an extension point: a plugin registers an engine and its loader rules
(``register_engines``), and ``verify --engine`` runs them through the rule's :class:`EngineContext`;
the built-in vLLM, SGLang, TensorRT-LLM and hf come from a default plugin like any other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import moe_unfuse
from moe_unfuse.hub.verify import engine_rules, verify_checkpoint
from moe_unfuse.plugin import Engine, EngineRule, hookimpl

pytestmark = pytest.mark.arch("gemma4")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny Gemma 4, unquantized, saved as the hub has it (a checkpoint verify passes)."""
    from moe_unfuse.hub.tiny import save_hub_style, tiny_gemma4

    return save_hub_style(tiny_gemma4(), tmp_path_factory.mktemp("tiny") / "gemma4")


def many_experts(ctx) -> list[str]:
    """A third-party loader that takes at most two experts per module."""
    return [f"{e.hub} ({e.num_experts} experts)" for e in ctx.experts() if e.num_experts > 2]


MINE = Engine(
    "mine",
    "a made-up engine whose loader takes at most two experts per module",
    (EngineRule("two-experts", "Mine 1.0", "mine/loader.py:12", "at most two experts per module", many_experts),),
)


class MinePlugin:
    @hookimpl
    def register_engines(self, register):
        register("mine", MINE)


def test_builtin_engines_come_from_the_default_plugin() -> None:
    reg = moe_unfuse.registry()
    assert list(reg.engines)[:4] == ["vllm", "sglang", "trtllm", "hf"]
    for name in ("vllm", "sglang", "trtllm", "hf"):
        assert reg.contributors[("engines", name)] == "moe_unfuse.default_plugins.engines"
    assert [r.name for r in engine_rules("vllm")] == [
        "expert-input-scale-0d",
        "exclude-patterns",
        "quant-config-fields",
        "experts-under-decoder-layer",
        "gpt-oss-fused-experts",
        "engine-loads",
    ]
    assert [r.name for r in engine_rules("sglang")] == ["expert-input-scale-0d", "quant-config-fields", "engine-loads"]
    assert [r.name for r in engine_rules("trtllm")] == ["experts-under-decoder-layer"]
    assert engine_rules("hf") == []
    with pytest.raises(
        moe_unfuse.MoeUnfuseError, match=r"^unknown engine 'mine'; fix: use one of vllm, sglang, trtllm, hf$"
    ):
        engine_rules("mine")


def test_a_plugin_engine_rule_runs_in_verify(tiny_ckpt: Path, registered_plugin, capsys) -> None:
    """A third-party engine's rule runs on ``verify --engine``, and its failure is reported with the
    versions and loader source it cites; the export contract still runs before it."""
    from moe_unfuse.cli.main import main

    assert verify_checkpoint(tiny_ckpt).ok
    registered_plugin(MinePlugin(), name="mine-plugin")
    assert moe_unfuse.registry().contributors[("engines", "mine")] == "mine-plugin"
    report = verify_checkpoint(tiny_ckpt, engine="mine")
    assert report.engine == "mine" and [c.name for c in report.failed] == ["two-experts"]
    (check,) = report.failed
    assert check.detail == "at most two experts per module (mine: Mine 1.0; mine/loader.py:12)"
    assert check.keys and all(k.endswith(" experts)") and ".experts " in k for k in check.keys)
    assert len(report.checks) == len(verify_checkpoint(tiny_ckpt, engine="hf").checks) + 1
    # the CLI's --engine choices are the registered engines
    assert main(["verify", str(tiny_ckpt), "--engine", "mine"]) == 1
    assert "FAIL two-experts: at most two experts per module (mine: Mine 1.0" in capsys.readouterr().out


def test_a_rule_reads_the_checkpoint_through_its_context(tiny_ckpt: Path, registered_plugin) -> None:
    seen: dict[str, object] = {}

    def look(ctx) -> list[str]:
        keys = ctx.keys
        seen.update(
            engine=ctx.engine,
            algo=ctx.quant_algo,
            configs=(ctx.quantization_config, ctx.hf_quant_config, ctx.excludes),
            unknown=[k for k in keys if ctx.base(k) is None],
            scaled=ctx.scaled_modules(),
            experts=ctx.experts(),
            arch={ctx.spec(e.arch).arch for e in ctx.experts()},
            quantized_for=ctx.quantized_for(),
            shape=ctx.shape(keys[0]),
            dtype=ctx.dtype(keys[0]),
            tensor=tuple(ctx.tensor(keys[0]).shape),
        )
        return []

    class Plugin:
        @hookimpl
        def register_engines(self, register):
            register("look", Engine("look", "reads everything", (EngineRule("look", "-", "-", "-", look),)))

    registered_plugin(Plugin())
    assert verify_checkpoint(tiny_ckpt, engine="look").ok
    assert seen["engine"] == "look" and seen["algo"] is None and seen["configs"] == (None, None, [])
    assert seen["unknown"] == [] and seen["scaled"] == frozenset() and seen["quantized_for"] == {}
    experts = seen["experts"]
    assert experts and all(e.hub.endswith(".experts") and e.arch == "gemma4" for e in experts)
    assert seen["arch"] == {"gemma4"} and seen["shape"] == list(seen["tensor"]) and seen["dtype"] in ("BF16", "F32")


def test_per_expert_key_parts() -> None:
    from moe_unfuse.hub.engines import EngineContext, ExpertKey

    ctx = EngineContext(None, None, "vllm", {}, None, None, None, [])
    assert ctx.per_expert("model.layers.0.mlp.experts.3.gate_proj.input_scale") == ExpertKey(
        "model.layers.0.mlp.experts", 3, "gate_proj", "input_scale"
    )
    assert ctx.per_expert("model.layers.0.mlp.experts.gate_up_proj") is None
    assert ctx.base("anything") is None and ctx.experts() == ()


def test_an_engine_registered_twice_is_an_error_naming_both(registered_plugin) -> None:
    class Clash:
        @hookimpl
        def register_engines(self, register):
            register("vllm", Engine("vllm", "another vLLM"))

    obj = Clash()
    with pytest.raises(
        moe_unfuse.MoeUnfuseError,
        match="plugins 'moe_unfuse.default_plugins.engines' and 'clash' both register the engine 'vllm'",
    ):
        registered_plugin(obj, name="clash")
        moe_unfuse.registry()
    moe_unfuse.unregister_plugin(obj)
    assert moe_unfuse.registry().contributors[("engines", "vllm")] == "moe_unfuse.default_plugins.engines"


def test_an_engine_under_another_name_is_an_error(registered_plugin) -> None:
    class Misnamed:
        @hookimpl
        def register_engines(self, register):
            register("theirs", Engine("mine", "misnamed"))

    registered_plugin(Misnamed(), name="misnamed")
    with pytest.raises(moe_unfuse.MoeUnfuseError, match="plugin 'misnamed' registers the engine 'mine' as 'theirs'"):
        moe_unfuse.registry()


def test_spec_renames_accept_a_registered_engine(mutated_spec, registered_plugin) -> None:
    def rename(engine: str):
        return lambda r: r.setdefault("export", {}).update(renames=[{"engine": engine, "match": "a", "replace": "b"}])

    with pytest.raises(
        moe_unfuse.SpecError, match="unknown engine 'mine'.*use one of: vllm, sglang, trtllm, hf or \\*"
    ):
        mutated_spec.load("gemma4", rename("mine"))
    registered_plugin(MinePlugin())
    assert mutated_spec.load("gemma4", rename("mine")).raw["export"]["renames"][0]["engine"] == "mine"


def test_the_engines_plugin_imports_no_torch() -> None:
    """``moe-unfuse list`` and ``--help`` stay light: the engines plugin and its API import no torch."""
    code = (
        "import sys; import moe_unfuse.default_plugins.engines; from moe_unfuse.cli.main import build_parser; "
        "build_parser(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_contributing_engine_rule_example_runs(tiny_ckpt: Path, tmp_path: Path, registered_plugin) -> None:
    """CONTRIBUTING's worked engine rule, run as a plugin: it imports only ``moe_unfuse.plugin``,
    passes the tiny checkpoint and fails one with a per-expert input scale of shape [1]."""
    import shutil
    import types

    import torch
    from safetensors.torch import load_file, save_file

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    code = text.split("### An engine rule\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "from moe_unfuse.plugin import" in code and "moe_unfuse." not in code.replace("moe_unfuse.plugin", "")
    example = types.ModuleType("contributing_engine_example")
    exec(compile(code, "CONTRIBUTING.md", "exec"), example.__dict__)  # noqa: S102 - our own documentation
    registered_plugin(example, name="contributing-engine-example")
    report = verify_checkpoint(tiny_ckpt, engine="my_engine")
    assert report.ok and report.checks[-1].name == "expert-input-scale-0d"
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.0.experts.0.gate_proj.input_scale"
    tensors[key] = torch.ones(1)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    failed = {c.name: c for c in verify_checkpoint(bad, engine="my_engine").failed}
    assert failed["expert-input-scale-0d"].keys == [f"{key} shape [1]"]
    assert failed["expert-input-scale-0d"].detail.endswith(
        "(my_engine: my_engine 1.2-1.4; my_engine/loaders/moe.py:120-131)"
    )


def test_spec_export_engines_name_registered_engines(mutated_spec, registered_plugin):
    """``export.engines`` takes any registered engine, a plugin's too (the schema cannot list them),
    and an unknown name is one line naming the field and the known engines."""
    from moe_unfuse import SpecError

    rule = {"experts": "unquantized", "versions": "mine 1.0", "why": "mine/loader.py:1 drops them"}
    with pytest.raises(SpecError, match=r"export\.engines\.nope: is not a registered engine.*vllm, sglang"):
        mutated_spec.load("gemma4", lambda r: r.setdefault("export", {}).setdefault("engines", {}).update(nope=rule))

    class Plugin:
        @hookimpl
        def register_engines(self, register):
            register("mine", Engine("mine", "my engine's loader"))

    registered_plugin(Plugin())
    spec = mutated_spec.load("gemma4", lambda r: r.setdefault("export", {}).setdefault("engines", {}).update(mine=rule))
    assert spec.experts_unquantized_for("mine") == "mine mine 1.0: mine/loader.py:1 drops them"
