"""Layer-by-layer quantization (``quantize --layerwise``) writes the checkpoint the whole-model path
writes: every tensor bit for bit, the same configs and the same ``moe_unfuse.json``, for every spec
with a whole tiny model (per-layer inputs and mixed attention types, hub per-expert tensors fused on
load, a fused export layout, fp32-kept routers and sinks, a router reading its child's weight,
identity experts, hybrid attention, decoder layers only the config names (DBRX, Jamba), a module
owning the layers with tensors of its own (Zaya, the OCR models), a module reading a child's weights
without calling it (JetMoE, Llama 4), conversion mappings with split rules (Bailing hybrid, GLM-5
next, Lara-Mini) ...; :mod:`moe_unfuse.quant.streaming` works around modelopt for each); a model with no
decoder layer list fails in one line before anything is written, and one whose forward runs a layer
more than once (looped layers) in one line before its checkpoint is written; and layer by layer is chosen by
default when the whole model would not fit in memory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import assert_same_checkpoint, checkpoint_tensors, save_tiny, spec_names, spec_raw, tensor_bits

import moe_unfuse
from moe_unfuse.cli.main import main
from moe_unfuse.hub.tiny import tiny_model_for

pytestmark = pytest.mark.usefixtures("one_thread")

#: Every spec with a whole tiny model, as in the export-family tests (names read from the spec files).
FAMILIES = [a for a in spec_names() if (spec_raw(a).get("golden") or {}).get("model")]
CALIB = ["--calib-size", "4", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--force-routing"]
#: A decoder layer runs more than once per forward (Inkling2-Loop's looped layers): layer by layer refuses it.
LOOPED = {"inkling2_loop"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.arch(a), id=a) for a in FAMILIES])
def test_layerwise_checkpoint_equals_whole_model(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if moe_unfuse.get_spec(arch).resolve_class() is None:
        pytest.skip(f"{arch}: not in the installed transformers")
    model = save_tiny(arch, tmp_path / "model")
    if arch in LOOPED:
        out = tmp_path / "layerwise"
        capsys.readouterr()
        assert main(["quantize", str(model), "--qformat", "nvfp4", "--out", str(out), "--layerwise", *CALIB]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "run more than once per forward" in err[0] and "fix: pass --no-layerwise" in err[0]
        assert not out.exists() and not (tmp_path / "layerwise.invalid").exists()
        return
    for mode in ("--no-layerwise", "--layerwise"):
        out = tmp_path / mode.strip("-")
        assert main(["quantize", str(model), "--qformat", "nvfp4", "--out", str(out), mode, *CALIB]) == 0
    assert_same_checkpoint(tmp_path / "no-layerwise", tmp_path / "layerwise")
    assert not list(tmp_path.glob(".layerwise.offload-*")), "the offload folder is removed"


@pytest.mark.arch("gemma4")
def test_layerwise_fp8_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = save_tiny("gemma4", tmp_path / "model")
    for mode in ("--no-layerwise", "--layerwise"):
        out = tmp_path / mode.strip("-")
        assert main(["quantize", str(model), "--qformat", "fp8", "--out", str(out), mode, *CALIB]) == 0
    assert_same_checkpoint(tmp_path / "no-layerwise", tmp_path / "layerwise")
    report = capsys.readouterr().out
    assert report.count("mode       layer by layer: 4 decoder layers") == 1


@pytest.mark.arch("gemma4")
def test_layerwise_refused_in_one_line_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model with no decoder layer list to walk (neither modelopt nor the config finds one)."""
    import moe_unfuse.quant.layerwise as layerwise

    model = save_tiny("gemma4", tmp_path / "model")
    monkeypatch.setattr(layerwise, "decoder_layer_list", lambda m: None)
    capsys.readouterr()
    before = {f: f.stat().st_mtime_ns for f in model.iterdir()}
    out = tmp_path / "out"
    assert main(["quantize", str(model), "--qformat", "nvfp4", "--out", str(out), "--layerwise", *CALIB]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no decoder layer list" in err[0] and "fix: pass --no-layerwise" in err[0]
    assert not out.exists() and not (tmp_path / "out.invalid").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no offload folder left behind"
    assert {f: f.stat().st_mtime_ns for f in model.iterdir()} == before


def test_layerwise_is_the_default_when_the_model_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import moe_unfuse.quant.layerwise as layerwise

    model = save_tiny("gemma4", tmp_path / "model")
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    monkeypatch.setattr(layerwise.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(layerwise, "available_memory", lambda: size)  # about 1x: the whole model needs ~2.5x
    assert main(["quantize", str(model), "--qformat", "fp8", "--out", str(tmp_path / "a"), *CALIB]) == 0
    assert "mode       layer by layer" in capsys.readouterr().out
    monkeypatch.setattr(layerwise, "available_memory", lambda: 100 * size)
    assert main(["quantize", str(model), "--qformat", "fp8", "--out", str(tmp_path / "b"), *CALIB]) == 0
    assert "layer by layer" not in capsys.readouterr().out
    assert main(["quantize", str(model), "--qformat", "fp8", "--out", str(tmp_path / "c"), "--layerwise", *CALIB]) == 0
    assert "mode       layer by layer" in capsys.readouterr().out


def test_default_counts_gpu_memory_for_auto_and_keeps_explicit_placements(monkeypatch: pytest.MonkeyPatch) -> None:
    import moe_unfuse.quant.layerwise as layerwise

    monkeypatch.setattr(layerwise, "available_memory", lambda: 10 * 2**30)
    monkeypatch.setattr(layerwise.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(layerwise.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(layerwise.torch.cuda, "mem_get_info", lambda i: (40 * 2**30, 80 * 2**30))
    ckpt = 30 * 2**30  # whole model ~75 GiB: host 10 + 2 x 40 free on the GPUs holds it
    assert not layerwise.needs_layerwise(ckpt, "auto")
    assert layerwise.needs_layerwise(ckpt, "cpu")  # host only: 10 GiB
    assert not layerwise.needs_layerwise(ckpt, "cuda")  # an explicit placement is the user's
    assert layerwise.needs_layerwise(2 * ckpt, "auto")


def test_layerwise_needs_a_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", "--qformat", "fp8", "--out", str(tmp_path / "o"), "--layerwise", *CALIB]) == 2
    assert "--layerwise reads a model folder" in capsys.readouterr().err


def test_report_summarizes_fallbacks_per_experts_module() -> None:
    """At 128 experts a line per fallback buried the report: one line per experts module on screen,
    each value in moe_unfuse.json (``input_scale_fallbacks``)."""
    from moe_unfuse.quant.calibration import ScaleFallback
    from moe_unfuse.quant.report import fallback_lines

    many = [ScaleFallback("model.layers.0.experts", e, ("gate_proj", "up_proj"), 0.5, "layer max") for e in range(40)]
    one = [ScaleFallback("model.layers.1.experts", 3, ("down_proj",), 0.25, "model max")]
    lines = fallback_lines(many + one)
    assert len(lines) == 3
    assert lines[0].startswith("fallback model.layers.0.experts 40 experts (0-39)")
    assert "40 input amax without data took the layer max" in lines[0]
    assert lines[1] == f"fallback {one[0]}" and "moe_unfuse.json" in lines[2]


@pytest.mark.arch("bailing_hybrid")
def test_split_rules_are_reversed_one_decoder_layer_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the streaming export leaves under in-memory names where the conversion mapping has split
    rules (Bailing hybrid's q/k/v conv1d, concatenated on load) comes out of the post-processing as
    ``save_pretrained`` writes it, names and bytes, converted one decoder layer at a time (memory: one
    layer's tensors, not every layer's)."""
    from safetensors.torch import save_file
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from moe_unfuse.hub.naming import model_contract
    from moe_unfuse.quant.postprocess import postprocess_checkpoint

    spec = moe_unfuse.get_spec("bailing_hybrid")
    if spec.resolve_class() is None:
        pytest.skip("bailing_hybrid: not in the installed transformers")
    model = tiny_model_for(spec)
    model.save_pretrained(tmp_path / "hub")
    hub = {k: v for k, v in checkpoint_tensors(tmp_path / "hub").items() if ".experts." not in k}
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    written = {k: v.contiguous() for k, v in state.items() if ".experts." not in k}
    assert any(k.endswith(".conv1d.weight") for k in written) and set(written) != set(hub)
    (tmp_path / "export").mkdir()
    save_file(written, str(tmp_path / "export" / "model.safetensors"))
    contract = model_contract(model, [spec])
    calls: list[set[str]] = []
    to_hub = contract.to_hub

    def recorded(state: dict) -> dict:
        calls.append({m.group(1) if (m := re.match(r"^(.*?\.\d+)\.", k)) else "" for k in state})
        return to_hub(state)

    monkeypatch.setattr(contract, "to_hub", recorded)
    postprocess_checkpoint(tmp_path / "export", [], [], False, contract)
    out = checkpoint_tensors(tmp_path / "export")
    assert set(out) == set(hub)
    assert all(torch.equal(tensor_bits(out[k]), tensor_bits(hub[k])) for k in hub)
    assert len(calls) >= 2 * 2 and all(len(layers) == 1 for layers in calls)  # meta check, then values


@pytest.mark.arch("gemma4")
def test_whole_model_that_would_spill_to_disk_goes_layer_by_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The whole model's measured peak fits, yet accelerate's placement under ``auto`` (given the host
    memory left, cgroups included) would run part of it from disk: the job goes layer by layer, no
    silent mixed placement, and writes the checkpoint the whole model writes in memory (tied
    embeddings: no lm_head). ``--no-layerwise`` keeps the mixed placement, says so, and writes the
    same checkpoint too."""
    import moe_unfuse.hub.loading as loading
    import moe_unfuse.quant.layerwise as layerwise

    model = save_tiny("gemma4", tmp_path / "model")
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    monkeypatch.setattr(layerwise.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(layerwise, "available_memory", lambda: 100 * size)
    fp8 = ["--qformat", "fp8"]
    assert main(["quantize", str(model), *fp8, "--out", str(tmp_path / "whole"), *CALIB]) == 0
    assert "mode " not in capsys.readouterr().out
    monkeypatch.setattr(loading, "available_memory", lambda: size // 3)  # accelerate: a third on the host
    assert main(["quantize", str(model), *fp8, "--out", str(tmp_path / "auto"), *CALIB]) == 0
    assert "mode       layer by layer: 4 decoder layers" in capsys.readouterr().out
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "auto")
    assert main(["quantize", str(model), *fp8, "--out", str(tmp_path / "mixed"), "--no-layerwise", *CALIB]) == 0
    out = capsys.readouterr().out
    assert "but it did not fit: accelerate runs" in out and "model.layers" in out
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "mixed")
    assert not (tmp_path / "mixed" / "lm_head.weight").exists()
