"""``--algorithm``: modelopt's own calibration algorithms on the unfused experts. ``mse`` searches each
expert weight's amax (FP8; refused in one line for the NVFP4 formats, whose search modelopt runs only
on a GPU); the weight-quantizer cache does not short-circuit the search (same bytes with it off); the
layer-by-layer path writes the whole-model checkpoint; every engine's contract holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_same_checkpoint, checkpoint_tensors, installed_spec, save_tiny
from test_layerwise import CALIB

import moe_unfuse
from moe_unfuse.cli.main import main
from moe_unfuse.core.experts import unfused_experts
from moe_unfuse.hub.tiny import byte_tokenizer, tiny_gemma4, tiny_model_for
from moe_unfuse.quant import fastquant
from moe_unfuse.quant.calibration import calibration_batches, read_calibration_texts
from moe_unfuse.quant.quantize import quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

#: Families with different expert layouts: standard, standard under block_sparse_moe (w1/w2/w3),
#: transposed + interleaved + bias exported fused (GPT-OSS), hub-fused per-expert (Gemma 4).
FAMILIES = ["gemma4", "qwen3_moe", "mixtral", "gpt_oss"]


def _model(arch: str) -> torch.nn.Module:
    return tiny_gemma4() if arch == "gemma4" else tiny_model_for(moe_unfuse.get_spec(arch))


def _batches() -> list[dict[str, torch.Tensor]]:
    return calibration_batches(byte_tokenizer(), read_calibration_texts(None), calib_size=4, seq_len=32, batch_size=2)


def _quantize_export(arch: str, algorithm: str, out: Path) -> dict[str, torch.Tensor]:
    model = _model(arch)
    result = quantize_model(model, "fp8", _batches(), algorithm=algorithm, force_routing=True, progress=False)
    assert result.algorithm == algorithm
    # the engines that serve this family's experts quantized (GPT-OSS: not vLLM nor SGLang, export.engines)
    engines = [e for e in ("vllm", "sglang", "trtllm") if moe_unfuse.get_spec(arch).experts_unquantized_for(e) is None]
    _, report = moe_unfuse.export_checkpoint(
        model, out, specs=result.specs, qformat="fp8", tokenizer=None, engine=engines[0]
    )
    assert report.ok, str(report)
    for engine in engines[1:]:
        assert moe_unfuse.verify_checkpoint(out, engine=engine).ok
    return {n: q.amax.float().clone() for n, q in _expert_weight_quantizers(model)}


def _expert_weight_quantizers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (f"{path}.{name}", lin.weight_quantizer)
        for path, experts in unfused_experts(model)
        for name, lin in experts.named_modules()
        if hasattr(lin, "weight_quantizer")
    ]


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.arch(a), id=a) for a in FAMILIES])
def test_mse_searches_expert_weight_scales_and_the_cache_changes_nothing(arch: str, tmp_path: Path) -> None:
    installed_spec(arch)
    fastquant.clear()
    amax_max = _quantize_export(arch, "max", tmp_path / "max")
    amax_mse = _quantize_export(arch, "mse", tmp_path / "mse")
    with fastquant.disabled():  # modelopt alone: the cache must not have skipped any search step
        reference = _quantize_export(arch, "mse", tmp_path / "mse-reference")
    assert_same_checkpoint(tmp_path / "mse", tmp_path / "mse-reference")
    assert amax_mse.keys() == amax_max.keys() == reference.keys()
    moved = [n for n in amax_max if not torch.equal(amax_max[n], amax_mse[n])]
    assert len(moved) >= len(amax_max) // 2, f"mse changed only {len(moved)} of {len(amax_max)} expert weight amax"
    # the search multiplies max's amax by a factor in [0.25, 4] (modelopt's defaults); gate and up
    # then share the larger of their two
    for n in amax_max:
        ratio = (amax_mse[n] / amax_max[n]).max().item()
        assert 0.25 - 1e-3 <= ratio <= 4.0 + 1e-3, (n, ratio)
    exported_max, exported_mse = checkpoint_tensors(tmp_path / "max"), checkpoint_tensors(tmp_path / "mse")
    assert exported_max.keys() == exported_mse.keys()
    scales = [k for k in exported_mse if k.endswith("weight_scale") and "expert" in k]
    assert scales and any(not torch.equal(exported_max[k], exported_mse[k]) for k in scales)


@pytest.mark.arch("gemma4")
def test_mse_layerwise_writes_the_whole_model_checkpoint(tmp_path: Path) -> None:
    model = save_tiny("gemma4", tmp_path / "model")
    for mode in ("--no-layerwise", "--layerwise"):
        out = tmp_path / mode.strip("-")
        argv = ["quantize", str(model), "--qformat", "fp8", "--algorithm", "mse", "--out", str(out), mode, *CALIB]
        assert main(argv) == 0
    assert_same_checkpoint(tmp_path / "no-layerwise", tmp_path / "layerwise")


@pytest.mark.parametrize("qformat", ["nvfp4", "nvfp4_experts_only", "w4a16_nvfp4"])
def test_mse_refused_in_one_line_for_nvfp4_formats(qformat: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["quantize", "--qformat", qformat, "--algorithm", "mse", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--algorithm mse" in err and "fix: use --algorithm max" in err, err
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(moe_unfuse.MoeUnfuseError, match="triton on a GPU"):
        quantize_model(tiny_gemma4(), qformat, _batches(), algorithm="mse", progress=False)


def test_unknown_algorithm_refused(tmp_path: Path) -> None:
    with pytest.raises(moe_unfuse.MoeUnfuseError, match="unknown --algorithm 'gptq'"):
        quantize_model(tiny_gemma4(), "fp8", [], algorithm="gptq", progress=False)
