"""Export for every spec that builds a whole tiny model, as a user runs it: the model saved with
``save_pretrained`` (config.json as the hub has it, bf16), ``moe-unfuse quantize MODEL`` to NVFP4 and
FP8, then the checkpoint verified for vLLM, SGLang and TensorRT-LLM, its names compared with what
``save_pretrained`` wrote, its config.json with the source's (only the quantization entries differ)
and every unquantized tensor's dtype with the source's; and ``--qformat none --fuse-unquantized``
reloads through ``from_pretrained`` into the same model, config.json and dtypes unchanged."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import installed_spec, spec_names, spec_raw
from safetensors import safe_open

import moe_unfuse
from moe_unfuse.cli.main import main
from moe_unfuse.hub.checkpoint import SCALE_SUFFIXES, excluded, has_scale, quantized_modules
from moe_unfuse.hub.naming import NamingContract, build_contract, hub_names, unplaced_source_keys
from moe_unfuse.hub.tiny import save_tiny_model, tiny_model_for
from moe_unfuse.tools.export_table import KNOWN_EXPORT_GAPS

ENGINES = ("vllm", "sglang", "trtllm")
#: Every arch whose spec builds a whole tiny model (names and mappings read from the spec files; a
#: spec whose class the installed transformers lacks is skipped by the test, saying so).
WHOLE_MODEL_SPECS = [a for a in spec_names() if (spec_raw(a).get("golden") or {}).get("model")]
pytestmark = pytest.mark.usefixtures("one_thread")
#: The config.json entries a quantized export may change: modelopt's ``quantization_config`` (its
#: ``ignore`` list as moe_unfuse fixes it). Everything else is the source's, field for field.
QUANT_CONFIG_ENTRIES = {"quantization_config"}


def _keys(path: Path) -> set[str]:
    return set(_dtypes(path))


def _dtypes(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            out.update((k, fh.get_slice(k).get_dtype()) for k in fh.keys())
    return out


def assert_source_kept(source: Path, out: Path, contract: NamingContract) -> None:
    """config.json is the source's but for :data:`QUANT_CONFIG_ENTRIES`, and every unquantized tensor
    has the dtype of the source tensor it comes from (per-expert tensors: the hub's fused tensor)."""
    config, exported = (json.loads((p / "config.json").read_text()) for p in (source, out))
    drop = lambda c: {k: v for k, v in c.items() if k not in QUANT_CONFIG_ENTRIES}  # noqa: E731
    assert drop(exported) == drop(config)
    hub, written = _dtypes(source), _dtypes(out)
    expanded = {n: e for e in contract.experts.values() for n in e.names if n not in hub}
    wrong = []
    for k, dtype in written.items():
        if has_scale(k, written) or k.endswith(SCALE_SUFFIXES):
            continue  # quantized, or a scale
        if k in hub:
            source_dtype = {hub[k]}
        elif k in expanded:
            source_dtype = {hub[f] for f, _ in expanded[k].hub_fused_names}
        else:
            wrong.append(f"{k} (no source tensor)")
            continue
        if source_dtype != {dtype}:
            wrong.append(f"{k} {dtype} (source {'/'.join(sorted(source_dtype))})")
    assert not wrong, wrong


def _meta_contract(arch: str) -> NamingContract:
    """The naming contract of ``arch``'s tiny model, built on the meta device."""
    spec = moe_unfuse.get_spec(arch)
    with torch.device("meta"):
        return build_contract(tiny_model_for(spec), [spec])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """arch -> a folder holding the tiny model saved by ``save_pretrained``, with a tokenizer."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = save_tiny_model(moe_unfuse.get_spec(arch), tmp_path_factory.mktemp(arch) / "model")
        return cache[arch]

    return get


def _quantize(model: Path | None, out: Path, qformat: str, *extra: str) -> None:
    """``moe-unfuse quantize`` as a user runs it (``model`` None: the built-in tiny Gemma 4)."""
    source = [str(model), "--device-map", "cpu"] if model is not None else []
    quick = ["--calib-size", "4", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--force-routing"]
    assert main(["quantize", *source, "--qformat", qformat, "--out", str(out), *quick, *extra]) == 0


def _excludes(path: Path) -> list[str]:
    return json.loads((path / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]


def _quantized_yet_excluded(path: Path) -> list[str]:
    """Modules that carry scales (per-expert or fused) and are excluded: an engine would build them unquantized."""
    excludes = _excludes(path)
    return sorted(m for m in quantized_modules(_keys(path)) if excluded(m, excludes))


def _params(arch: str) -> list:
    marks = [pytest.mark.arch(arch)]
    if arch in KNOWN_EXPORT_GAPS:
        marks.append(pytest.mark.xfail(reason=KNOWN_EXPORT_GAPS[arch], strict=True))
    return [pytest.param(arch, marks=marks, id=arch)]


@pytest.mark.parametrize("qformat", ["nvfp4", "fp8"])
@pytest.mark.parametrize("arch", [p for a in WHOLE_MODEL_SPECS for p in _params(a)])
def test_quantized_export_has_hub_names_and_verifies_for_every_engine(
    arch: str, qformat: str, saved, tmp_path: Path
) -> None:
    installed_spec(arch)
    source = saved(arch)
    out = tmp_path / "out"
    _quantize(source, out, qformat)
    heads, _ = moe_unfuse.get_spec(arch).modules_quantized_for("vllm")  # the default --engine's
    for engine in ENGINES:
        report = moe_unfuse.verify_checkpoint(out, engine=engine)
        if engine == "vllm" or not heads:
            assert report.ok, str(report)
        else:  # quantized because vLLM builds them so; the other engines' rules keep them BF16
            failed = {c.name: c.keys for c in report.checks if not c.ok}
            assert failed == {"unquantized-excluded": [f"{m} (quantized; must stay unquantized)" for m in heads]}
    # The names: what save_pretrained wrote, with fused hub tensors expanded per the spec's layout, and
    # the source tensors the model places nowhere (golden.model.hub_only_tensors), carried as they are.
    contract = _meta_contract(arch)
    contract.carried = frozenset(json.loads((out / "moe_unfuse.json").read_text())["carried_from_source"])
    assert contract.carried == set(moe_unfuse.get_spec(arch).golden["model"].get("hub_only_tensors") or ())
    exported, hub = _keys(out), _keys(source) - contract.carried
    bases = {contract.base(k) for k in exported} - contract.carried
    assert set(contract.names) - contract.optional <= bases <= set(contract.names)
    expanded = {n for e in contract.experts.values() if e.hub_fused and e.layout == "per_expert" for n in e.names}
    replaced = hub - set(contract.names)
    assert replaced == {k for e in contract.experts.values() for k, _ in e.hub_fused_names}
    assert set(contract.names) - hub == expanded
    assert all(re.search(r"\.\d+\.[a-z0-9_]+\.(weight|bias)$", n) for n in expanded)
    quantized = [k for k in exported if k.endswith(("weight_scale", "_weight_scale"))]
    assert quantized, "nothing was quantized"
    assert_source_kept(source, out, contract)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"].startswith("modelopt")
    assert _quantized_yet_excluded(out) == []


@pytest.mark.parametrize("arch", [p for a in WHOLE_MODEL_SPECS for p in _params(a)])
def test_unquantized_export_fused_back_reloads_identical(arch: str, saved, tmp_path: Path) -> None:
    installed_spec(arch)
    source = saved(arch)
    out = tmp_path / "out"
    _quantize(source, out, "none", "--fuse-unquantized")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert_source_kept(source, out, _meta_contract(arch))
    cls = type(tiny_model_for(moe_unfuse.get_spec(arch)))
    original = cls.from_pretrained(source, dtype=torch.bfloat16).eval()
    reloaded = cls.from_pretrained(out, dtype=torch.bfloat16).eval()
    a, b = original.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(
        0, original.config.get_text_config().vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, reloaded(input_ids=ids).logits)


@pytest.mark.arch("gemma4")
@pytest.mark.parametrize("qformat", ["nvfp4", "fp8"])
@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
def test_builtin_gemma4_exports_for_every_engine(qformat: str, multimodal: bool, tmp_path: Path) -> None:
    """The built-in model (the README's first command), text and multimodal: hub names
    (``model[.language_model].layers.N.experts.E.*``, never ``.moe.``), every engine's rules."""
    out = tmp_path / "out"
    _quantize(None, out, qformat, *(["--multimodal"] if multimodal else []))
    for engine in ENGINES:
        report = moe_unfuse.verify_checkpoint(out, engine=engine)
        assert report.ok, str(report)
    keys = _keys(out)
    prefix = "model.language_model.layers" if multimodal else "model.layers"
    assert f"{prefix}.0.experts.7.gate_proj.weight_scale" in keys and not any(".moe." in k for k in keys)


@pytest.mark.arch("phimoe")
def test_hub_config_fields_are_kept(saved, tmp_path: Path) -> None:
    """A config.json as Phi-3.5-MoE's on the hub writes it (``PhiMoEForCausalLM``, the name vLLM's
    registry knows; ``auto_map``; ``torch_dtype`` where transformers v5 writes ``dtype``; an older
    ``transformers_version``) loads, and the export keeps every field: only ``quantization_config`` is added."""
    source = tmp_path / "model"
    shutil.copytree(saved("phimoe"), source)
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.43.3"
    config["auto_map"] = {
        "AutoConfig": "configuration_phimoe.PhiMoEConfig",
        "AutoModelForCausalLM": "modeling_phimoe.PhiMoEForCausalLM",
    }
    (source / "config.json").write_text(json.dumps(config, indent=2))
    out = tmp_path / "out"
    _quantize(source, out, "fp8")
    exported = json.loads((out / "config.json").read_text())
    assert exported.pop("quantization_config")["quant_method"] == "modelopt"
    assert exported == config and config["architectures"] == ["PhiMoEForCausalLM"]


@pytest.mark.arch("gpt_oss")
@pytest.mark.parametrize("qformat", ["fp8", "nvfp4", "w4a16_nvfp4"])
def test_gpt_oss_quantized_experts_never_excluded_and_refused_for_vllm_sglang(
    qformat: str, saved, tmp_path: Path
) -> None:
    """``--engine hf``: the experts quantized in the hub's fused layout, their 3-D block scales never
    taken for unquantized fused tensors (which listed the experts as excluded); vLLM's and SGLang's
    loaders cannot serve them (the spec's ``export.engines``), so ``verify`` refuses it for those two."""
    installed_spec("gpt_oss")
    out = tmp_path / "out"
    _quantize(saved("gpt_oss"), out, qformat, "--engine", "hf")
    assert "model.layers.0.mlp.experts.gate_up_proj_weight_scale" in _keys(out)
    assert _quantized_yet_excluded(out) == []
    assert not excluded("model.layers.0.mlp.experts", _excludes(out))
    for engine in ("hf", "trtllm"):
        assert moe_unfuse.verify_checkpoint(out, engine=engine).ok
    for engine in ("vllm", "sglang"):
        report = moe_unfuse.verify_checkpoint(out, engine=engine)
        failed = {c.name: c.keys for c in report.checks if not c.ok}
        assert list(failed) == ["engine-loads"], str(report)
        assert "model.layers.0.mlp.experts, model.layers.1.mlp.experts quantized" in failed["engine-loads"][0]
        assert "gpt_oss.py:" in failed["engine-loads"][0]


@pytest.mark.arch("gpt_oss")
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_gpt_oss_default_for_vllm_and_sglang_keeps_experts_bf16(engine: str, saved, tmp_path: Path) -> None:
    """What those loaders serve: the experts as the hub's fused BF16 tensors and biases, excluded;
    attention quantized (vLLM 0.33's own loader takes it: ``tests_vllm/``)."""
    installed_spec("gpt_oss")
    out = tmp_path / "out"
    _quantize(saved("gpt_oss"), out, "nvfp4", "--engine", engine)
    keys = _keys(out)
    with safe_open(out / "model.safetensors", "pt") as fh:
        fused = fh.get_slice("model.layers.0.mlp.experts.gate_up_proj")
        assert (fused.get_dtype(), fused.get_shape()) == (
            "BF16",
            [4, 64, 96],
        )  # intermediate 40 rounded to 48 (tiny_model_for)
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in keys
    assert not any(k.startswith("model.layers.0.mlp.experts.") and "scale" in k for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight_scale" in keys
    assert excluded("model.layers.0.mlp.experts", _excludes(out))
    for e in ("vllm", "sglang", "hf"):
        assert moe_unfuse.verify_checkpoint(out, engine=e).ok
    meta = json.loads((out / "moe_unfuse.json").read_text())
    assert meta["engine"] == engine


@pytest.mark.arch("jamba")
def test_jamba_mamba_mixer_unquantized_for_vllm_only(saved, tmp_path: Path) -> None:
    """vLLM builds Jamba's Mamba mixer without a quantization config (the spec's export.engines.vllm.modules):
    the default export (--engine vllm) keeps it BF16 with the experts quantized; an export for another
    engine quantizes it, and verify --engine vllm refuses that one, naming vLLM's file:line."""
    installed_spec("jamba")
    default, hf = tmp_path / "default", tmp_path / "hf"
    _quantize(saved("jamba"), default, "fp8")
    _quantize(saved("jamba"), hf, "fp8", "--engine", "hf")
    mamba = re.compile(r"\.mamba\.")
    kept = quantized_modules(_keys(default))
    assert kept and not any(mamba.search(m) for m in kept)
    assert any(".feed_forward.experts.0." in m + "." for m in kept)
    assert _dtypes(default)["model.layers.0.mamba.in_proj.weight"] == "BF16"
    assert excluded("model.layers.0.mamba.in_proj", _excludes(default))
    assert any(mamba.search(m) for m in quantized_modules(_keys(hf)))
    for engine in ("vllm", "sglang", "trtllm"):
        assert moe_unfuse.verify_checkpoint(default, engine=engine).ok
    for engine in ("sglang", "trtllm", "hf"):
        assert moe_unfuse.verify_checkpoint(hf, engine=engine).ok
    report = moe_unfuse.verify_checkpoint(hf, engine="vllm")
    failed = {c.name: c.keys for c in report.checks if not c.ok}
    assert list(failed) == ["engine-loads"], str(report)
    assert "model.layers.0.mamba.in_proj" in failed["engine-loads"][0]
    assert "mamba_mixer.py:" in failed["engine-loads"][0]


@pytest.mark.arch("exaone_moe")
def test_exaone_head_quantized_for_vllm_only(saved, tmp_path: Path) -> None:
    """vLLM builds Exaone-MoE's lm_head quantized whatever the exclude list says (the spec's
    export.engines.vllm.quantized): the default export (--engine vllm) quantizes it and does not exclude
    it; an export for another engine keeps it BF16 and excluded, and verify --engine vllm refuses that one."""
    installed_spec("exaone_moe")
    default, sglang = tmp_path / "default", tmp_path / "sglang"
    _quantize(saved("exaone_moe"), default, "nvfp4")
    _quantize(saved("exaone_moe"), sglang, "nvfp4", "--engine", "sglang")
    assert {"lm_head.weight_scale", "lm_head.weight_scale_2", "lm_head.input_scale"} <= _keys(default)
    assert _dtypes(default)["lm_head.weight"] == "U8"
    assert not excluded("lm_head", _excludes(default))
    assert moe_unfuse.verify_checkpoint(default, engine="vllm").ok
    assert _dtypes(sglang)["lm_head.weight"] == "BF16"
    assert excluded("lm_head", _excludes(sglang))
    assert moe_unfuse.verify_checkpoint(sglang, engine="sglang").ok
    report = moe_unfuse.verify_checkpoint(sglang, engine="vllm")
    failed = {c.name: c.keys for c in report.checks if not c.ok}
    assert list(failed) == ["engine-loads"], str(report)
    assert failed["engine-loads"][0].startswith("lm_head unquantized (vllm 0.33.0: ")
    assert "exaone_moe.py:510-514" in failed["engine-loads"][0]


@pytest.mark.arch("ernie4_5_vl_moe")
def test_ernie_vl_text_and_vision_experts_share_the_hubs_expert_list(saved, tmp_path: Path) -> None:
    """Ernie 4.5 VL keeps text experts 0..E-1 and vision experts E..2E-1 in one hub list
    (``mlp.experts.N``), which transformers splits into text_moe and vision_moe: the contract gives each
    module its slice, and each exported expert is the right expert's weight. FP8 rounds each element
    within 2^-4 relative, so the right expert's relative error stays under 0.07; any other expert's, two
    independent random tensors, is near sqrt(2)."""
    installed_spec("ernie4_5_vl_moe")
    labels = {e.label: e.expert_offset for e in _meta_contract("ernie4_5_vl_moe").experts.values()}
    assert labels == {"model.layers.1.mlp.experts[0:4]": 0, "model.layers.1.mlp.experts[4:8]": 4}
    source, out = saved("ernie4_5_vl_moe"), tmp_path / "out"
    _quantize(source, out, "fp8")

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in path.glob("*.safetensors"):
            with safe_open(f, "pt") as fh:
                out.update((k, fh.get_tensor(k)) for k in fh.keys() if ".mlp.experts." in k)
        return out

    hub, exported = tensors(source), tensors(out)
    prefix = "model.layers.1.mlp.experts"
    for e in range(8):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = f"{prefix}.{e}.{proj}.weight"
            got = exported[key].float() * exported[f"{prefix}.{e}.{proj}.weight_scale"].float()
            for other in range(8):
                want = hub[f"{prefix}.{other}.{proj}.weight"].float()
                if want.shape != got.shape:
                    assert (other < 4) != (e < 4), key  # text and vision experts differ in width
                    continue
                error = ((got - want).norm() / want.norm()).item()
                assert error < 0.07 if other == e else error > 0.5, (key, other, error)


@pytest.mark.parametrize("arch", [p for a in WHOLE_MODEL_SPECS for p in _params(a)])
def test_every_name_save_pretrained_writes_is_placed(arch: str) -> None:
    """No tensor of a checkpoint as transformers saves it counts as unplaced (it would be carried
    twice): each resolves, through the load-time conversion mapping, to a parameter or buffer."""
    installed_spec(arch)
    spec = moe_unfuse.get_spec(arch)
    with torch.device("meta"):
        model = tiny_model_for(spec)
    assert unplaced_source_keys(model, hub_names(model)) == []


#: Tensors hub checkpoints hold that the model class places nowhere (transformers drops them on load):
#: AXK1's post_mlp_layernorm of its dense layers (modeling_axk1.py: _keys_to_ignore_on_load_unexpected),
#: a DeepSeek-V3 MTP head (the hub's model.layers.61, one past the last decoder layer).
CARRIED = {
    "axk1": {"model.layers.0.post_mlp_layernorm.weight": (64,)},
    "deepseek_v3": {"model.layers.2.enorm.weight": (64,), "model.layers.2.eh_proj.weight": (64, 128)},
}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.arch(a)) for a in CARRIED])
def test_source_tensors_the_model_drops_are_carried(arch: str, saved, tmp_path: Path) -> None:
    """The export carries them byte for byte (modelopt 0.48 does itself, on 0.47 moe_unfuse does),
    lists them in moe_unfuse.json, excludes their modules (an engine must not build an MTP head
    quantized) and verifies; a tensor the metadata does not list fails hub-names, as before."""
    from safetensors.torch import load_file, save_file

    installed_spec(arch)
    source, out = tmp_path / "source", tmp_path / "out"
    shutil.copytree(saved(arch), source)
    (shard,) = source.glob("*.safetensors")
    tensors = load_file(shard)
    gen = torch.Generator().manual_seed(0)
    extra = {k: torch.randn(shape, generator=gen).to(torch.bfloat16) for k, shape in CARRIED[arch].items()}
    save_file({**tensors, **extra}, str(shard), metadata={"format": "pt"})
    _quantize(source, out, "nvfp4")
    exported = {}
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            exported.update((k, fh.get_tensor(k)) for k in fh.keys() if k in extra)
    assert exported.keys() == extra.keys()
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], extra[k]) for k in extra)
    metadata = json.loads((out / "moe_unfuse.json").read_text())
    assert metadata["carried_from_source"] == sorted(extra)
    assert all(excluded(k.rsplit(".", 1)[0], _excludes(out)) for k in extra)
    assert moe_unfuse.verify_checkpoint(out).ok
    metadata["carried_from_source"] = []
    (out / "moe_unfuse.json").write_text(json.dumps(metadata))
    failed = {c.name: c.keys for c in moe_unfuse.verify_checkpoint(out).checks if not c.ok}
    assert failed == {"hub-names": [f"{k} (not a tensor save_pretrained writes for this model)" for k in sorted(extra)]}
