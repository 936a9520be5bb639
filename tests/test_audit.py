"""``moe-unfuse audit`` and the fused-expert detector it shares with unfuse and quantize.

The Gemma-4-26B-A4B config cannot be downloaded here, so it is written from its published
dimensions (text: hidden 2816, 30 layers, dense MLP 2112, 16 heads with 8 KV heads of 256 on
sliding layers and 2 of 512 on the 5 full layers which share K and V (attention_k_eq_v),
vocab 262144, tied embeddings, 128 experts of 704, top-8, no per-layer inputs). Assumed, since no
public excerpt gives them: a SigLIP-So400m-shaped vision tower (1152 wide, 27 layers, MLP 4304,
16 heads of 72) and no audio tower. field_notes.md reports experts ~91% of ~25 B parameters,
BF16 ~49 GB, NVFP4 with experts 16-17 GB and experts left in BF16 by mistake 46 GB.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import moe_unfuse
from moe_unfuse import UncoveredExpertsError
from moe_unfuse.cli import main as cli
from moe_unfuse.core.coverage import find_fused_params, fused_expert_params, uncovered_expert_params
from moe_unfuse.spec import catalog
from moe_unfuse.tools import golden
from moe_unfuse.tools.audit import GB, GIB, audit
from moe_unfuse.tools.presets import preset_rules

pytestmark = pytest.mark.xdist_group("audit")  # report_26b: one module-scoped build per run


def gemma4_26b_config() -> dict:
    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 5
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "dtype": "bfloat16",
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "gemma4_text",
            "hidden_size": 2816,
            "num_hidden_layers": 30,
            "intermediate_size": 2112,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "num_global_key_value_heads": 2,
            "head_dim": 256,
            "global_head_dim": 512,
            "attention_k_eq_v": True,
            "vocab_size": 262144,
            "max_position_embeddings": 262144,
            "sliding_window": 1024,
            "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 0,
            "num_kv_shared_layers": 0,
            "enable_moe_block": True,
            "num_experts": 128,
            "top_k_experts": 8,
            "moe_intermediate_size": 704,
            "layer_types": layer_types,
            "tie_word_embeddings": True,
        },
        "vision_config": {  # assumed (see module docstring)
            "model_type": "gemma4_vision",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "head_dim": 72,
            "standardize": True,
            "use_clipped_linears": False,
        },
        "audio_config": None,
    }


def tiny_gemma4_config() -> dict:
    text = {"model_type": "gemma4_text", **moe_unfuse.get_spec("gemma4").golden["model"]["config_kwargs"]}
    vision = {
        "model_type": "gemma4_vision",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "position_embedding_size": 16,
    }
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": vision,
        "audio_config": None,
    }


def write(tmp_path, config: dict, folder: bool = False):
    path = tmp_path / "model" if folder else tmp_path
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path if folder else path / "config.json"


@pytest.fixture
def only_specs(monkeypatch):
    """Pretend the registry holds only the given specs (a model family nobody wrote a spec for)."""

    def set_specs(*specs):
        monkeypatch.setattr(catalog, "specs", lambda: {s.arch: s for s in specs})

    return set_specs


# ----------------------------------------------------------------------------------------------
# tiny Gemma 4


@pytest.mark.arch("gemma4")
def test_audit_tiny_gemma4_config(tmp_path):
    report = audit(write(tmp_path, tiny_gemma4_config(), folder=True), "nvfp4")
    assert report.ok and report.model_class == "Gemma4ForConditionalGeneration"
    assert [(f.name, f.spec.arch) for f in report.fused] == [("gate_up_proj", "gemma4"), ("down_proj", "gemma4")] * 2
    layers, experts, hidden, inter = 2, 4, 64, 40
    assert report.categories["experts"] == [2 * layers, layers * experts * 3 * inter * hidden]

    # the same model, really built, gives the independent expectation: every text Linear except the
    # router is quantized, plus 3 per-expert linears per expert; vision, router and tied lm_head are not
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    config = AutoConfig.for_model(**tiny_gemma4_config())
    model = Gemma4ForConditionalGeneration(config)
    params = {id(p): p for p in model.parameters()}
    assert report.total == sum(p.numel() for p in params.values())
    linears = [
        (n, m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("model.language_model") and ".router." not in n
    ]
    linears += [(f"expert {e}", (inter, hidden)) for _ in range(layers * experts) for e in range(2)]
    linears += [("expert down", (hidden, inter))] * (layers * experts)
    quantized = sum(math.prod(s) for _, s in linears)
    nvfp4 = sum(math.prod(s) / 2 + s[0] * math.ceil(s[1] / 16) + 4 + 4 for _, s in linears)
    assert report.plans["nvfp4"].quantized_numel == quantized
    assert report.plans["nvfp4"].bytes == pytest.approx(2 * report.total - 2 * quantized + nvfp4)
    fp8 = sum(math.prod(s) + 4 + 4 for _, s in linears)
    assert report.plans["fp8"].bytes == pytest.approx(2 * report.total - 2 * quantized + fp8)
    patterns = {g.pattern: g for g in report.plans["nvfp4"].quantized}
    assert patterns["model.language_model.layers.*.experts.*.gate_proj"].count == layers * experts
    excluded = {g.pattern: g.detail for g in report.plans["nvfp4"].excluded}
    assert excluded["model.language_model.layers.*.router.proj"] == "excluded by '*.router.*'"
    assert any(
        p.startswith("model.vision_tower") and d == "excluded by '*.vision_tower.*'" for p, d in excluded.items()
    )
    only = {g.pattern for g in report.plans["nvfp4_experts_only"].quantized}
    assert only == {f"model.language_model.layers.*.experts.*.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.arch("gemma4")
def test_audit_cli_json_and_text(tmp_path, capsys):
    path = write(tmp_path, tiny_gemma4_config())
    assert cli.main(["audit", str(path), "--json", "--qformat", "fp8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (
        data["ok"]
        and data["qformat"] == "fp8"
        and set(data["formats"]) == {"bf16", "fp8", "nvfp4", "nvfp4_experts_only"}
    )
    assert all(p["arch"] == "gemma4" for p in data["fused_expert_params"]) and data["uncovered"] == []
    assert cli.main(["audit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fused expert parameters: 4, all covered" in out and "OK: every fused expert parameter is covered" in out


@pytest.mark.arch("gemma4")
def test_audit_without_a_spec_for_the_experts_exits_nonzero(tmp_path, capsys, only_specs):
    path = write(tmp_path, tiny_gemma4_config())
    only_specs(moe_unfuse.get_spec("mixtral"))
    assert cli.main(["audit", str(path)]) == 1
    out = capsys.readouterr().out
    assert (
        "4 NOT covered" in out
        and "-- none --" in out
        and "FAIL:" in out
        and "model.language_model.layers.0.experts.gate_up_proj" in out
    )
    assert "no spec: stays fused" in out


@pytest.mark.arch("gemma4")
def test_audit_bad_input_is_one_line(tmp_path, capsys):
    assert cli.main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no config.json in this folder" in err and "fix:" in err and err.count("\n") == 1
    (tmp_path / "config.json").write_text("{not json")
    assert cli.main(["audit", str(tmp_path / "config.json")]) == 2
    assert "line 1: not valid JSON" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    assert cli.main(["audit", str(tmp_path)]) == 2
    assert "'no_such_model' is unknown to transformers" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(tiny_gemma4_config()))
    assert cli.main(["audit", str(tmp_path), "--qformat", "nvfp5"]) == 2
    assert "unknown qformat 'nvfp5'" in capsys.readouterr().err


def test_preset_rules_match_modelopt_configs():
    """The presets read from YAML are modelopt's own configs (same patterns, same order)."""
    import modelopt.torch.quantization as mtq

    for name, cfg in (
        ("fp8", mtq.FP8_DEFAULT_CFG),
        ("nvfp4", mtq.NVFP4_DEFAULT_CFG),
        ("nvfp4_experts_only", mtq.NVFP4_EXPERTS_ONLY_CFG),
    ):
        ours = [(e["quantizer_name"], e.get("parent_class"), e.get("enable", True)) for e in preset_rules(name)]
        theirs = [(e["quantizer_name"], e.get("parent_class"), e.get("enable", True)) for e in cfg["quant_cfg"]]
        assert ours == theirs, name


# ----------------------------------------------------------------------------------------------
# Gemma-4-26B-A4B-sized


@pytest.fixture(scope="module")
def report_26b(tmp_path_factory):
    return audit(write(tmp_path_factory.mktemp("g26"), gemma4_26b_config()), "nvfp4")


@pytest.mark.arch("gemma4")
def test_audit_26b_experts_share_and_sizes(report_26b):
    r = report_26b
    assert r.ok and len(r.fused) == 60 and {f.spec.arch for f in r.fused} == {"gemma4"}
    experts = 30 * 128 * 3 * 704 * 2816
    assert r.categories["experts"][1] == experts
    assert 25.0e9 < r.language < 25.5e9 and 25.5e9 < r.total < 26.2e9  # ~25 B (+ the assumed vision tower)
    assert 0.89 < r.share("experts", "language") < 0.92  # field notes: ~91%
    assert 0.87 < r.share("experts") < 0.90
    bf16, nvfp4 = r.plans["bf16"].bytes, r.plans["nvfp4"].bytes
    assert 47 * GIB < bf16 < 49 * GIB  # field notes: ~49 GB
    assert 16 * GB < nvfp4 < 17 * GB  # field notes: 16-17 GB with the experts in NVFP4
    assert nvfp4 < r.plans["nvfp4_experts_only"].bytes < r.plans["fp8"].bytes < bf16
    # NVFP4 experts: 4 bits + an e4m3 scale per 16 + fp32 weight_scale_2 and input_scale per expert linear
    per_expert = sum(o * i / 2 + o * i / 16 + 8 for o, i in ((704, 2816), (704, 2816), (2816, 704)))
    experts_only_delta = 30 * 128 * per_expert - 2 * experts
    assert r.plans["nvfp4_experts_only"].bytes == pytest.approx(bf16 + experts_only_delta)


@pytest.mark.arch("gemma4")
def test_audit_26b_without_spec_shows_the_silent_skip_cost(tmp_path, only_specs):
    only_specs(moe_unfuse.get_spec("mixtral"))
    r = audit(write(tmp_path, gemma4_26b_config()), "nvfp4")
    assert not r.ok and len(r.uncovered) == 60
    assert 45.5 * GIB < r.plans["nvfp4"].bytes < 46.5 * GIB  # field notes: experts left in BF16 by mistake, 46 GB


# ----------------------------------------------------------------------------------------------
# the detector


class FlatBankExperts(nn.Module):
    """A DBRX-like flattened 2-D expert bank that no spec describes."""

    def __init__(self):
        super().__init__()
        self.num_experts = 4
        self.w1 = nn.Parameter(torch.zeros(4 * 6, 8))
        self.scale = nn.Parameter(torch.zeros(4, 8))  # one row per expert: not a flattened bank


class AudioTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)  # 3-D weight
        self.position_table = nn.Parameter(torch.zeros(2, 5, 4))  # 3-D, but not an experts module


def test_detector_flags_flat_banks_and_skips_convs_and_non_experts():
    model = nn.ModuleDict({"bank": FlatBankExperts(), "audio": AudioTower()})
    assert [name for name, _ in fused_expert_params(model)] == ["bank.w1"]
    assert [name for name, _ in uncovered_expert_params(model)] == ["bank.w1"]


@pytest.mark.arch("dbrx")
def test_detector_uses_dotted_spec_params_for_dbrx():
    dbrx = moe_unfuse.get_spec("dbrx")
    module = golden.build_experts(dbrx)
    found = find_fused_params(nn.ModuleDict({"experts": module}), [dbrx])
    assert [(f.path, f.covered, f.target_path) for f in found] == [
        (f"experts.mlp.{n}", True, "experts") for n in ("w1", "v1", "w2")
    ]
    # without the spec the flattened [E*I, H] bank is still caught, as uncovered
    assert [n for n, _ in uncovered_expert_params(module, [])] == ["mlp.w1", "mlp.v1", "mlp.w2"]
    moe_unfuse.unfuse(module, dbrx)
    assert find_fused_params(module, [dbrx]) == []


@pytest.mark.arch("gemma4")
@pytest.mark.arch("mixtral")
def test_unfuse_with_one_arch_is_loud_about_other_experts(gemma4_spec):
    model = nn.ModuleDict(
        {"g": golden.build_experts(gemma4_spec), "m": golden.build_experts(moe_unfuse.get_spec("mixtral"))}
    )
    with pytest.raises(UncoveredExpertsError, match=r"m\.gate_up_proj, m\.down_proj"):
        moe_unfuse.unfuse(model, "gemma4")
    assert "gate_up_proj" in model["g"]._parameters  # atomic: nothing changed
    report = moe_unfuse.unfuse(model)  # every spec: both covered
    assert len(report.changed) == 2


@pytest.mark.arch("gemma4")
def test_spec_that_omits_a_fused_param_leaves_it_uncovered(gemma4_spec):
    module = golden.build_experts(gemma4_spec)
    module.extra_bank = nn.Parameter(torch.zeros(4, 3, 3))
    assert [n for n, _ in uncovered_expert_params(module, [gemma4_spec])] == ["extra_bank"]
    with pytest.raises(UncoveredExpertsError, match="extra_bank"):
        moe_unfuse.unfuse(module, gemma4_spec)


def test_audit_and_quantize_share_one_unquantized_policy() -> None:
    """The audio tower of a multimodal Gemma 4: audit used to plan it 4-bit while quantize kept it BF16."""
    import moe_unfuse
    from moe_unfuse.hub.tiny import tiny_gemma4
    from moe_unfuse.quant.quantize import quantize_model
    from moe_unfuse.tools.audit import audit_model

    with torch.device("meta"):
        meta = tiny_gemma4(multimodal=True)
    plan = audit_model(meta, "nvfp4").plans["nvfp4"]
    planned = {g.pattern for g in plan.quantized}
    assert not any("audio_tower" in p or "vision_tower" in p or "router" in p for p in planned)
    model = tiny_gemma4(multimodal=True)
    ids = {"input_ids": torch.randint(4, 200, (2, 32), generator=torch.Generator().manual_seed(0))}
    quantize_model(model, "nvfp4", [ids], progress=False)
    quantized = {
        n for n, m in model.named_modules() if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)
    }
    from moe_unfuse.tools.audit import _pattern

    assert {_pattern(n) for n in quantized} == planned
    assert moe_unfuse.hub.policy.keep_unquantized(
        "model.visual.blocks.0"
    ) and not moe_unfuse.hub.policy.keep_unquantized("model.visual_proj")
