"""Layer-by-layer quantization (``quantize --layerwise``) writes the checkpoint the whole-model path
writes: every tensor bit for bit, the same configs and the same ``moe_unfuse.json``, for every spec
with a whole tiny model (per-layer inputs and mixed attention types, hub per-expert tensors fused on
load, a fused export layout, fp32-kept routers and sinks, a router reading its child's weight,
identity experts, hybrid attention, decoder layers only the config names (DBRX, Jamba), a module
owning the layers with tensors of its own (Zaya, the OCR models), a module reading a child's weights
without calling it (JetMoE, Llama 4), conversion mappings with split rules (Bailing hybrid, GLM-5
next, Lara-Mini) ...; :mod:`moe_unfuse.quant.streaming` works around modelopt for each), also when a
layer reads outputs from several layers back (Inkling2's block residuals) or a layer runs once per pass
of a loop (Inkling2-Loop); a model with no decoder layer list fails in one line before anything is
written; and layer by layer is chosen by default when the whole model would not fit in memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_same_checkpoint,
    checkpoint_tensors,
    killed_at,
    same_files,
    save_tiny,
    spec_names,
    spec_raw,
    tensor_bits,
)

import moe_unfuse
from moe_unfuse.cli.main import main
from moe_unfuse.hub.tiny import tiny_model_for

pytestmark = pytest.mark.usefixtures("one_thread")

#: Every spec with a whole tiny model, as in the export-family tests (names read from the spec files).
FAMILIES = [a for a in spec_names() if (spec_raw(a).get("golden") or {}).get("model")]
CALIB = ["--calib-size", "4", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--force-routing"]


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.arch(a), id=a) for a in FAMILIES])
def test_layerwise_checkpoint_equals_whole_model(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if moe_unfuse.get_spec(arch).resolve_class() is None:
        pytest.skip(f"{arch}: not in the installed transformers")
    model = save_tiny(arch, tmp_path / "model")
    for mode in ("--no-layerwise", "--layerwise"):
        out = tmp_path / mode.strip("-")
        assert main(["quantize", str(model), "--qformat", "nvfp4", "--out", str(out), mode, *CALIB]) == 0
    assert_same_checkpoint(tmp_path / "no-layerwise", tmp_path / "layerwise")
    assert not list(tmp_path.glob(".layerwise.offload-*")), "the offload folder is removed"


#: Deeper than the golden models: Inkling2 with every layer a residual block of its own (each layer
#: reads every earlier layer's output through the block states), and Inkling2-Loop with layers 1-2
#: looped three times (nine calls; each pass restarts from layer 0's output and reads the last pass's
#: messages) and 16 experts at top-1, so that some get no token and the forced pass runs on every pass.
DEEP = {
    "inkling2": {"num_hidden_layers": 5, "layer_types": ["hybrid_sliding", "hybrid"] * 2 + ["hybrid_sliding"]},
    "inkling2_loop": {
        "num_hidden_layers": 5,
        "layer_types": ["hybrid_sliding", "hybrid"] * 2 + ["hybrid_sliding"],
        "loop_layer_index_start": 1,
        "loop_layer_index_end": 3,
        "loop_num_passes": 3,
        "n_routed_experts": 16,
        "num_experts_per_tok": 1,
    },
}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.arch(a), id=a) for a in DEEP])
def test_layerwise_feeds_each_call_what_the_forward_reads(arch: str, tmp_path: Path) -> None:
    """A layer reading outputs from several calls back, and looped layers calibrated once per pass,
    give the whole-model checkpoint; the loop's run, killed inside the second pass and started again,
    writes the uninterrupted run's files."""
    from moe_unfuse.hub.tiny import save_tiny_model

    spec = moe_unfuse.get_spec(arch)
    if spec.resolve_class() is None:
        pytest.skip(f"{arch}: not in the installed transformers")
    model = save_tiny_model(spec, tmp_path / "model", overrides=DEEP[arch])
    for mode in ("--no-layerwise", "--layerwise"):
        out = tmp_path / mode.strip("-")
        assert main(["quantize", str(model), "--qformat", "nvfp4", "--out", str(out), mode, *CALIB]) == 0
    assert_same_checkpoint(tmp_path / "no-layerwise", tmp_path / "layerwise")
    if arch != "inkling2_loop":
        return
    metadata = json.loads((tmp_path / "layerwise" / "moe_unfuse.json").read_text())
    forced = metadata["routing"]["forced"]["model.layers.1.mlp.experts"]
    assert set(forced) == {0, 3 * 64}, "forced experts run on the first batch of each of the three passes"
    args = ["quantize", str(model), "--qformat", "nvfp4", "--layerwise", *CALIB, "--out", str(tmp_path / "resumed")]
    killed_at("after-layer:4", args)  # call 4: layer 2's second pass
    state = tmp_path / "resumed.resume" / "state"
    assert (state / "layer-3" / "first.pt").is_file(), "layer 1's second pass keeps its first batch for the forced pass"
    assert main(args) == 0
    same_files(tmp_path / "layerwise", tmp_path / "resumed")


def test_call_plan_follows_what_each_call_reads() -> None:
    """:func:`plan_calls` on parents with every pattern: a plain stack, an output read again at the end,
    a loop restarting from an earlier output, an output a quantizer of the parent's reads (kept to the
    end: every capture forward runs that quantizer again), and a forward whose layer order depends on
    the values."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from torch import nn

    from moe_unfuse.base.errors import MoeUnfuseError
    from moe_unfuse.quant.layerwise import plan_calls

    class Parent(nn.Module):
        def __init__(self, pattern: str):
            super().__init__()
            self.pattern = pattern
            self.embed = nn.Embedding(8, 4)
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
            self.side_quantizer = TensorQuantizer()

        def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
            h = self.embed(input_ids)
            if self.pattern == "loop":  # layers 1-2 twice, each pass from layer 0's output
                first = self.layers[0](h)
                h = first
                for _ in range(2):
                    h = self.layers[2](self.layers[1](first + 0 * h) + h)
                return self.layers[3](h)
            if self.pattern == "side":  # a quantizer of the parent's reads layer 1's output, used by no layer
                h = self.layers[1](self.layers[0](h))
                self.side_quantizer(h)
                return self.layers[3](self.layers[2](h))
            if self.pattern == "data":
                h = self.layers[0](h)
                return self.layers[1 if h.sum() > 0 else 2](h)
            outputs = []
            for layer in self.layers:
                h = layer(h)
                outputs.append(h)
            return h + outputs[0] if self.pattern == "skip" else h

    batch = {"input_ids": torch.tensor([[1, 2, 3]])}
    output = torch.zeros(1, 3, 4)

    def plan(pattern: str):
        parent = Parent(pattern)
        return plan_calls(parent, parent.layers, batch, output)

    assert (plan("chain").layers, plan("chain").last_use) == ([0, 1, 2, 3], [1, 2, 3, 4])
    assert plan("skip").last_use == [4, 2, 3, 4]
    assert plan("side").last_use == [1, 4, 3, 4]
    loop = plan("loop")
    assert loop.layers == [0, 1, 2, 1, 2, 3] and loop.looped and loop.calls_of(1) == [1, 3]
    assert loop.last_use == [3, 2, 4, 4, 5, 6]
    with pytest.raises(MoeUnfuseError, match="order of the layers depends on the data"):
        plan("data")


def test_planning_digests_see_every_element() -> None:
    """The digests that tell which call reads which output change with any one element, and the sums
    an accelerator's tensors are reduced to (run here on the CPU) do too."""
    from moe_unfuse.quant.layerwise import _bit_sums, _digest

    base = torch.randn(3, 5, 7).to(torch.bfloat16)
    for index in [(0, 0, 0), (1, 2, 3), (2, 4, 6)]:
        changed = base.clone()
        changed[index] = changed[index] * 2 + 1
        assert _digest((changed,)) != _digest((base,)) == _digest((base.clone(),))
        assert not torch.equal(_bit_sums(changed.reshape(-1)), _bit_sums(base.reshape(-1)))
    assert torch.equal(_bit_sums(base.reshape(-1)), _bit_sums(base.clone().reshape(-1)))
    assert _digest({"a": base}) != _digest({"b": base}) and _digest(base.float()) != _digest(base)


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
