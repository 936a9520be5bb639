"""The weight-quantizer cache (:mod:`moe_unfuse.quant.fastquant`) changes nothing but speed: amax, exports,
fake-quant outputs and modelopt state are those of the same run with every fast path off."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import moe_unfuse
from moe_unfuse.core.experts import unfused_experts
from moe_unfuse.hub.tiny import byte_tokenizer, tiny_gemma4
from moe_unfuse.quant import fastquant
from moe_unfuse.quant.calibration import calibration_batches, read_calibration_texts
from moe_unfuse.quant.quantize import quantize_model

pytestmark = [pytest.mark.arch("gemma4"), pytest.mark.usefixtures("one_thread")]


def _batches() -> list[dict[str, torch.Tensor]]:
    return calibration_batches(byte_tokenizer(), read_calibration_texts(None), calib_size=4, seq_len=64, batch_size=2)


def _amax(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_amax")}


def _run(tmp: Path, qformat: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = tiny_gemma4()
    result = quantize_model(model, qformat, _batches(), progress=False)
    amax = _amax(model)
    linears = _expert_linears(model)
    assert linears and all(fastquant._modelopt_callback(lin).callback is fastquant.quantized_weight for lin in linears)
    out = tmp / qformat
    _, report = moe_unfuse.export_checkpoint(model, out, specs=result.specs, qformat=qformat, tokenizer=None)
    assert report.ok, str(report)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return amax, tensors


def _expert_linears(model: nn.Module) -> list[nn.Module]:
    return [
        getattr(expert, proj)
        for _, m in unfused_experts(model)
        for expert in m
        for proj in ("gate_proj", "up_proj", "down_proj")
    ]


@pytest.mark.parametrize("qformat", ["fp8", "nvfp4"])
def test_amax_and_export_identical_to_reference(tmp_path: Path, qformat: str) -> None:
    fastquant.clear()
    amax, tensors = _run(tmp_path / "fast", qformat)
    with fastquant.disabled():
        ref_amax, ref_tensors = _run(tmp_path / "reference", qformat)
    assert amax.keys() == ref_amax.keys() and amax
    for k in amax:
        assert torch.equal(amax[k], ref_amax[k]), k
    assert tensors.keys() == ref_tensors.keys()
    for k in tensors:
        assert tensors[k].dtype == ref_tensors[k].dtype and torch.equal(tensors[k], ref_tensors[k]), k


def _quantized(qformat: str = "fp8") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = tiny_gemma4(dtype=torch.float32)
    quantize_model(model, qformat, _batches()[:1], progress=False)
    return model, _batches()[0]


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with fastquant.disabled():
        return _logits(model, batch)


def test_fake_quant_forward_cached_and_identical() -> None:
    fastquant.clear()
    model, batch = _quantized()
    first = _logits(model, batch)
    held = fastquant.cached_bytes()
    assert held > 0  # the fake-quantized expert weights are kept ...
    assert torch.equal(_logits(model, batch), first)  # ... and reused
    assert fastquant.cached_bytes() == held
    assert torch.equal(first, _reference(model, batch))


def test_gate_and_up_fake_quantize_their_input_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gate and up read the same input through equal input quantizers: it is fake-quantized once (up's
    quantizer is not called), with modelopt's logits bit for bit; when their quantizers differ, each
    runs its own, again bit for bit."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    fastquant.clear()
    model, batch = _quantized()
    experts = [e for _, m in unfused_experts(model) for e in m]
    ups = {id(e.up_proj.input_quantizer) for e in experts}
    called: list[int] = []
    forward = TensorQuantizer.forward

    def counting(self: TensorQuantizer, inputs: torch.Tensor) -> torch.Tensor:
        called.append(id(self))
        return forward(self, inputs)

    monkeypatch.setattr(TensorQuantizer, "forward", counting)
    shared = _logits(model, batch)
    assert called and not ups & set(called), "up's input quantizer is never called"
    called.clear()
    assert torch.equal(shared, _reference(model, batch)) and ups & set(called), "the reference calls it"

    gate, up = experts[0].gate_proj, experts[0].up_proj
    x = torch.randn(3, gate.in_features)
    assert fastquant.gate_up(gate, up, x) is not None
    up.input_quantizer.amax = up.input_quantizer.amax * 2  # no longer the gate's twin
    assert fastquant.gate_up(gate, up, x) is None
    called.clear()
    assert torch.equal(_logits(model, batch), _reference(model, batch))


def test_weight_edits_and_recalibration_invalidate() -> None:
    fastquant.clear()
    model, batch = _quantized()
    _logits(model, batch)
    linear = _expert_linears(model)[0]
    with torch.no_grad():
        linear.weight.mul_(0.5)  # bumps the version counter
    assert torch.equal(_logits(model, batch), _reference(model, batch))
    linear.weight.data[0].mul_(-1.0)  # through .data: no version bump, the fingerprint sees it
    assert torch.equal(_logits(model, batch), _reference(model, batch))
    linear.weight_quantizer.amax = linear.weight_quantizer.amax * 0.25  # written through .data
    assert torch.equal(_logits(model, batch), _reference(model, batch))
    linear.weight_quantizer.disable()
    assert torch.equal(_logits(model, batch), _reference(model, batch))


def test_cache_budget_and_offloaded_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    fastquant.clear()
    model, batch = _quantized()
    monkeypatch.setattr(fastquant, "CACHE_BYTES", 0)
    assert torch.equal(_logits(model, batch), _reference(model, batch))
    assert fastquant.cached_bytes() == 0
    monkeypatch.setattr(fastquant, "CACHE_BYTES", 1 << 40)
    linear = _expert_linears(model)[0]
    linear.__dict__["_hf_hook"] = object()  # as accelerate leaves on a module whose weight it loads per call
    fastquant.clear()
    _logits(model, batch)
    assert fastquant._entries.get(linear.weight_quantizer) is None
    assert fastquant._entries.get(_expert_linears(model)[1].weight_quantizer) is not None


def test_modelopt_state_and_deepcopy_unchanged() -> None:
    import modelopt.torch.opt as mto

    fastquant.clear()
    model, batch = _quantized()
    with fastquant.disabled():
        reference, _ = _quantized()
    state, ref_state = mto.modelopt_state(model), mto.modelopt_state(reference)
    assert str(state) == str(ref_state)
    clone = copy.deepcopy(model)
    assert torch.equal(_logits(clone, batch), _reference(model, batch))


def _structure(model: nn.Module) -> list:
    """Per module: class, attribute names, modelopt's attribute-manager layout, quantizer state."""
    rows = []
    for name, m in model.named_modules():
        row = [name, type(m).__qualname__, sorted(m.__dict__)]
        manager = m.__dict__.get("_dm_attribute_manager")
        if manager is not None:
            row += [
                manager._og_cls_all,
                sorted(manager._da),
                [sorted(d) for d in manager._da_cb_all],
                sorted(manager._attr),
            ]
        if hasattr(m, "get_modelopt_state") and "quantizer" in type(m).__name__.lower():
            row.append(str(m.get_modelopt_state()))
        if "_parallel_state" in m.__dict__:
            row.append(repr(m._parallel_state))
        rows.append(row)
    return rows


@pytest.mark.parametrize("qformat", ["fp8", "nvfp4"])
def test_bulk_conversion_matches_per_linear(monkeypatch: pytest.MonkeyPatch, qformat: str) -> None:
    copied: list[int] = []
    convert = fastquant.convert_linears
    monkeypatch.setattr(fastquant, "convert_linears", lambda linears: copied.append(convert(linears)) or copied[-1])
    model, batch = _quantized(qformat)
    assert copied and all(n > 0 for n in copied)  # every experts module was converted in bulk
    with fastquant.disabled():
        reference, _ = _quantized(qformat)
    assert _structure(model) == _structure(reference)
    state, ref_state = model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    if qformat == "fp8":  # modelopt's NVFP4 fake quant needs CUDA
        assert torch.equal(_logits(model, batch), _logits(reference, batch))


def test_each_expert_weight_collected_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelopt.torch.quantization.calib import MaxCalibrator

    seen: list[int] = []
    collect = MaxCalibrator.collect
    monkeypatch.setattr(MaxCalibrator, "collect", lambda self, x: seen.append(x.data_ptr()) or collect(self, x))
    model, _ = _quantized()
    weights = {lin.weight.data_ptr() for lin in _expert_linears(model)}
    fast = [p for p in seen if p in weights]
    seen.clear()
    with fastquant.disabled():
        reference, _ = _quantized()
    ref_weights = {lin.weight.data_ptr() for lin in _expert_linears(reference)}
    assert len(fast) == len(weights)  # the weight-only pass, never again in the calibration forward
    assert len([p for p in seen if p in ref_weights]) > len(ref_weights)  # without the cache: again there
