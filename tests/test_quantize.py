"""``moe-unfuse quantize`` and ``quantize_model`` on tiny Gemma 4 models (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import moe_unfuse
from moe_unfuse import UncoveredExpertsError
from moe_unfuse.core.coverage import check_coverage
from moe_unfuse.core.experts import unfused_experts
from moe_unfuse.hub.tiny import byte_tokenizer, tiny_gemma4
from moe_unfuse.hub.verify import verify_checkpoint
from moe_unfuse.quant.calibration import (
    RoutingStats,
    calibration_batches,
    finalize_input_scales,
    forced_routing,
    read_calibration_texts,
)
from moe_unfuse.quant.quantize import quantize_model

pytestmark = [pytest.mark.arch("gemma4"), pytest.mark.usefixtures("one_thread")]


def small_batches(n: int = 4, seq_len: int = 64) -> list[dict[str, torch.Tensor]]:
    return calibration_batches(
        byte_tokenizer(), read_calibration_texts(None), calib_size=n, seq_len=seq_len, batch_size=2
    )


def cli(*argv: str) -> int:
    from moe_unfuse.cli.main import main

    return main(list(argv))


def input_amax(model: nn.Module) -> dict[tuple[str, int, str], torch.Tensor | None]:
    return {
        (path, e, proj): getattr(getattr(expert, proj), "input_quantizer").amax
        for path, m in unfused_experts(model)
        for e, expert in enumerate(m)
        for proj in ("gate_proj", "up_proj", "down_proj")
    }


class _ExtraExperts(nn.Module):
    """A fused expert bank no spec describes (stands in for a new architecture's experts class)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 4
        self.weight_bank = nn.Parameter(torch.zeros(4, 32, 128, dtype=torch.bfloat16))


def _never_route(model: nn.Module, expert: int) -> list:
    """Make every router send ``expert``'s share to the next expert, so normal calibration misses it."""

    def hook(module, args, output):
        probs, weights, index = output
        return probs, weights, torch.where(index == expert, (expert + 1) % probs.shape[-1], index)

    return [layer.router.register_forward_hook(hook) for layer in model.model.layers]


# ----------------------------------------------------------------------------------------------


def test_readme_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The README's first command, exactly: built-in tiny Gemma 4, fp8, offline, verified."""
    out = tmp_path / "tiny-gemma4-fp8"
    assert cli("quantize", "--qformat", "fp8", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "all covered (gemma4" in printed and "every expert received tokens" in printed
    assert "verify     ok: 17 checks passed" in printed and f"checkpoint {out}" in printed
    report = verify_checkpoint(out)
    assert report.ok and report.quant_algo == "FP8" and report.engine == "vllm"
    keys = json.loads((out / "moe_unfuse.json").read_text())["experts"]
    assert sorted(keys) == [f"model.layers.{i}.experts" for i in range(4)]
    assert (out / "tokenizer.json").is_file() and not out.with_name(out.name + ".partial").exists()


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli("quantize", str(tmp_path / "nope"), "--qformat", "fp8", "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no config.json" in err and "fix:" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli("quantize", "--qformat", "fp8", "--out", str(tmp_path / "full")) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_local_folder_experts_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A MODEL folder loads through transformers + accelerate's device_map; nvfp4_experts_only quantizes only experts."""
    src = tmp_path / "model"
    tiny_gemma4().save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    code = cli(
        "quantize",
        str(src),
        "--qformat",
        "nvfp4_experts_only",
        "--out",
        str(out),
        "--device-map",
        "cpu",
        "--calib-size",
        "4",
        "--seq-len",
        "64",
        "--no-progress",
        "--report",
        str(tmp_path / "r.json"),
    )
    assert code == 0, capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert (
        saved["verify"]["ok"]
        and saved["bytes_before_of"] == "source checkpoint"
        and saved["export"]["bytes_after"] < saved["bytes_before"]
    )
    report = verify_checkpoint(out)
    assert report.ok and report.quant_algo == "NVFP4"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.experts.7.down_proj.weight_scale_2" in keys
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in keys  # attention stays BF16


def test_nvfp4_multimodal(tmp_path: Path) -> None:
    """Gemma4ForConditionalGeneration: text experts under model.language_model, towers untouched and excluded."""
    model = tiny_gemma4(multimodal=True)
    result = quantize_model(model, "nvfp4", small_batches())
    assert [(p, n) for p, _, n in result.coverage.covered] == [
        (f"model.language_model.layers.{i}.experts", 8) for i in range(4)
    ]
    assert result.num_linears == 4 * 8 * 3 and not result.fallbacks
    for name, module in model.named_modules():
        if any(t in name for t in ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "router")) and hasattr(
            module, "weight_quantizer"
        ):
            assert not module.weight_quantizer.is_enabled, name
    exported, report = moe_unfuse.export_checkpoint(model, tmp_path / "mm", specs=result.specs, qformat="nvfp4")
    assert report.ok, str(report)
    excl = json.loads((tmp_path / "mm" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    for name in (
        "lm_head",
        "model.vision_tower*",
        "model.audio_tower*",
        "model.embed_vision*",
        "model.language_model.layers.3.router*",
    ):
        assert name in excl


def test_uncovered_fused_experts_fail_loudly(tmp_path: Path) -> None:
    model = tiny_gemma4()
    model.model.layers[0].extra_experts = _ExtraExperts()
    name = "model.layers.0.extra_experts.weight_bank"
    with pytest.raises(UncoveredExpertsError, match=name.replace(".", r"\.")):
        quantize_model(model, "fp8", small_batches())
    assert not any("quantizer" in n for n, _ in model.named_modules())  # failed before touching the model
    with pytest.raises(UncoveredExpertsError, match="extra_experts"):
        moe_unfuse.register("gemma4", model=model)
    with pytest.raises(UncoveredExpertsError, match="extra_experts"):
        moe_unfuse.unfuse(model)
    assert check_coverage(model, allow_uncovered=True).uncovered == [name]
    moe_unfuse.register("gemma4", model=tiny_gemma4())  # a covered model passes; plain register still works
    moe_unfuse.register("gemma4")

    # Opted out: the bank stays BF16 and the export says so (excluded). The bank was attached to the
    # model by hand, so it is no tensor of the model config.json describes: only hub-names objects.
    result = quantize_model(model, "fp8", small_batches(), allow_uncovered=True)
    assert result.coverage.uncovered == [name]
    _, report = moe_unfuse.export_checkpoint(model, tmp_path / "o", specs=result.specs, qformat="fp8")
    assert [(c.name, c.keys) for c in report.failed] == [
        ("hub-names", [f"{name} (not a tensor save_pretrained writes for this model)"])
    ]
    assert (
        "model.layers.0.extra_experts*"
        in json.loads((tmp_path / "o.invalid" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    )


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_calibration_whatever_experts_implementation(impl: str, tmp_path: Path) -> None:
    """grouped_mm/batched_mm in the config at calibration: every expert still gets an input scale."""
    model = tiny_gemma4(experts_implementation=impl)
    assert model.config._experts_implementation == impl
    result = quantize_model(model, "fp8", small_batches(), input_scale="per-expert")
    amax = input_amax(model)
    assert len(amax) == 4 * 8 * 3 and all(
        a is not None and torch.isfinite(a).all() and (a > 0).all() for a in amax.values()
    )
    assert all(sum(c) > 0 for c in result.routing.counts.values())
    if impl == "grouped_mm":  # and the export has every expert's input_scale (experts-complete checks it)
        _, report = moe_unfuse.export_checkpoint(model, tmp_path / "o", specs=result.specs, qformat="fp8")
        assert report.ok, str(report)


def test_forced_routing_covers_idle_experts() -> None:
    batches = small_batches()
    model = tiny_gemma4()
    _never_route(model, 3)
    plain = quantize_model(model, "fp8", batches, input_scale="per-expert")
    idle = plain.routing.uncovered()
    assert idle == {f"model.layers.{i}.experts": [3] for i in range(4)}
    # Fallback: the max over the layer's other experts, finite and > 0, never zero or NaN.
    assert {(f.path, f.expert) for f in plain.fallbacks} == {
        (f"model.layers.{i}.experts", 3) for i in range(4)
    } and len(plain.fallbacks) == 8
    amax = input_amax(model)
    for f in plain.fallbacks:
        assert f.source == "layer max" and f.value > 0 and torch.isfinite(torch.tensor(f.value))
        for proj in f.projections:
            others = [amax[(f.path, e, proj)] for e in range(8) if e != 3]
            assert torch.equal(amax[(f.path, 3, proj)], torch.stack(others).max())

    model = tiny_gemma4()
    _never_route(model, 3)
    forced = quantize_model(model, "fp8", batches, force_routing=True, input_scale="per-expert")
    assert forced.routing.uncovered(forced_too=False) == idle and forced.routing.uncovered() == {}
    first_batch_tokens = batches[0]["input_ids"].numel()
    assert all(forced.routing.forced[p][3] == first_batch_tokens for p in idle)
    assert not forced.fallbacks
    amax = input_amax(model)
    assert all(torch.isfinite(amax[(p, 3, "down_proj")]) and amax[(p, 3, "down_proj")] > 0 for p in idle)


def test_forced_routing_leaves_the_output_unchanged() -> None:
    model = tiny_gemma4()
    moe_unfuse.unfuse(model)
    ids = small_batches(2)[0]
    with torch.no_grad():
        expected = model(**ids).logits
        stats = RoutingStats()
        targets = {p: [0, 5] for p, _ in unfused_experts(model)}
        with forced_routing(model, targets, stats, chunk_tokens=7):
            got = model(**ids).logits
    assert torch.equal(got, expected)
    assert stats.forced["model.layers.2.experts"][5] == ids["input_ids"].numel()


def test_input_scale_policies() -> None:
    batches = small_batches()
    shared, per_expert = tiny_gemma4(), tiny_gemma4()
    quantize_model(shared, "fp8", batches, input_scale="shared")
    quantize_model(per_expert, "fp8", batches, input_scale="per-expert")
    s, p = input_amax(shared), input_amax(per_expert)
    for layer in range(4):
        path = f"model.layers.{layer}.experts"
        for proj in ("gate_proj", "down_proj"):
            values = [s[(path, e, proj)] for e in range(8)]
            assert all(torch.equal(v, values[0]) for v in values)  # one per layer and input
            assert torch.equal(
                values[0], torch.stack([p[(path, e, proj)] for e in range(8)]).max()
            )  # = max over experts
        assert len({p[(path, e, "gate_proj")].item() for e in range(8)}) > 1  # per-expert keeps its own
        assert all(torch.equal(p[(path, e, "gate_proj")], p[(path, e, "up_proj")]) for e in range(8))  # same input


def test_layer_without_any_data_gets_model_max() -> None:
    model = tiny_gemma4()
    quantize_model(model, "fp8", small_batches(), input_scale="per-expert")
    layer = dict(unfused_experts(model))["model.layers.1.experts"]
    for expert in layer:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(expert, proj).input_quantizer.reset_amax()
    fallbacks = finalize_input_scales(model, "per-expert")
    assert len(fallbacks) == 16 and {f.source for f in fallbacks} == {"model max"}
    amax = input_amax(model)
    assert all(a is not None and torch.isfinite(a) and a > 0 for a in amax.values())
