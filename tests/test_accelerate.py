"""Experts dispatched by accelerate (resident, CPU-offloaded, disk-offloaded) unfuse, forward and calibrate.

CPU only, so the devices are simulated with accelerate's own code paths: ``main_device=torch.device("cpu")``
(which is not the string ``"cpu"``) makes dispatch_model treat the CPU as a GPU-like execution device, so
``"cpu"`` entries are offloaded into an ``OffloadedWeightsLoader`` state dict and ``"disk"`` entries into
memmapped files, exactly the hooks a GPU run gets; ``offload_buffers=True`` offloads buffers as well.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import dispatch_model
from accelerate.utils.offload import OffloadedWeightsLoader

import moe_unfuse
from moe_unfuse.core.experts import UnfusedExpertsMixin
from moe_unfuse.core.offload import offload_hook

EXECUTION = torch.device("cpu")  # stands in for "cuda:0"
PLACEMENT = {"model.layers.0": EXECUTION, "model.layers.1": "cpu", "model.layers.2": "disk"}
FUSED = ("gate_up_proj", "down_proj")


@pytest.fixture
def gemma4_model(tiny_model):
    """The tiny Gemma 4 with three layers (one per placement); the default init leaves experts at a
    zero-ish scale, so every expert parameter is redrawn from N(0, 0.1) to make every expert matter."""
    return tiny_model(
        "gemma4",
        expert_std=0.1,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )


def _dispatch(model, offload_dir):
    device_map = {f"model.{name}": EXECUTION for name, _ in model.model.named_children() if name != "layers"}
    device_map.update(PLACEMENT, lm_head=EXECUTION)
    return dispatch_model(model, device_map, main_device=EXECUTION, offload_dir=str(offload_dir), offload_buffers=True)


def ids_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ids():
    return ids_for(128)


@pytest.fixture
def loads(monkeypatch):
    """Every key read whole from accelerate's offload store (a disk key read whole = a full fused tensor in RAM)."""
    seen: list[str] = []
    original = OffloadedWeightsLoader.__getitem__

    def recording(self, key):
        if key not in self.state_dict:
            seen.append(key)
        return original(self, key)

    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", recording)
    return seen


def _expert_keys(keys: list[str], names: tuple[str, ...] = FUSED) -> list[str]:
    return [k for k in keys if k.rsplit(".", 1)[-1] in names]


@pytest.mark.arch("gemma4")
def test_dispatch_sets_up_the_three_placements(tmp_path, gemma4_model):
    model = _dispatch(gemma4_model, tmp_path)
    layers = model.model.layers
    assert offload_hook(layers[0].experts) is None and layers[0].experts.gate_up_proj.device.type == "cpu"
    for i in (1, 2):
        assert offload_hook(layers[i].experts) is not None and layers[i].experts.gate_up_proj.is_meta
    assert (tmp_path / "model.layers.2.experts.gate_up_proj.dat").is_file()


@pytest.mark.arch("gemma4")
def test_unfuse_offloaded_logits_identical_and_nothing_loaded_whole(tmp_path, ids, loads, gemma4_model):
    model = gemma4_model
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model = _dispatch(model, tmp_path)
    report = moe_unfuse.unfuse(model, "gemma4")
    assert len(report.changed) == 3
    assert _expert_keys(loads) == [], "unfusing read offloaded expert tensors"
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert _expert_keys(loads) == [], "the forward read whole fused tensors from disk instead of one expert's rows"
    experts = model.model.layers[2].experts
    assert experts[0].gate_proj.weight.is_meta, "offloaded weights must go back to meta after the forward"
    moe_unfuse.fuse(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    assert model.model.layers[2].experts.gate_up_proj.is_meta


@pytest.mark.arch("gemma4")
def test_unfuse_under_cpu_offload(ids, gemma4_model):
    """``accelerate.cpu_offload``: a plain dict weights map for the whole model.

    (modelopt 0.47's writeback assumes an ``OffloadedWeightsLoader`` and fails on this map for any
    offloaded Linear, with or without moe_unfuse, so only unfuse and forward are checked here.)
    """
    from accelerate import cpu_offload

    model = gemma4_model
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    cpu_offload(model, execution_device=EXECUTION, offload_buffers=True)
    assert model.model.layers[0].experts.gate_up_proj.is_meta
    moe_unfuse.unfuse(model, "gemma4")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    moe_unfuse.fuse(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.arch("gemma4")
@pytest.mark.parametrize("order", ["remove-hooks-then-refuse", "refuse-then-remove-hooks"])
def test_removing_the_hooks_materializes_experts_either_way(tmp_path, ids, order, gemma4_model):
    """``remove_hook_from_submodules`` (as before an export) must bring every weight back, unfused or not."""
    from accelerate.hooks import remove_hook_from_submodules

    model = gemma4_model
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model = _dispatch(model, tmp_path)
    moe_unfuse.unfuse(model, "gemma4")
    if order == "remove-hooks-then-refuse":
        remove_hook_from_submodules(model)
        assert not any(p.is_meta for p in model.parameters())
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, expected)
        moe_unfuse.fuse(model)
    else:
        moe_unfuse.fuse(model)
        remove_hook_from_submodules(model)
    assert not any(p.is_meta for p in model.parameters())
    assert model.model.layers[2].experts.gate_up_proj.shape == (4, 80, 64)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.arch("gemma4")
def test_expert_slice_writeback_reaches_the_fused_tensor(tmp_path, gemma4_model):
    """modelopt's writeback (``w_map[key] = tensor``) must land in the fused tensor the offload hook serves."""
    model = _dispatch(gemma4_model, tmp_path)
    moe_unfuse.unfuse(model, "gemma4")
    for i in (1, 2):  # CPU-offloaded, disk-offloaded
        wmap = model.model.layers[i].experts[3].up_proj._hf_hook.weights_map
        wmap["weight"] = torch.full_like(wmap["weight"], 0.25)
    moe_unfuse.fuse(model)
    for i in (1, 2):
        fused = offload_hook(model.model.layers[i].experts).weights_map["gate_up_proj"]
        up = fused[3, fused.shape[1] // 2 :]
        assert torch.equal(up, torch.full_like(up, 0.25)), f"layer {i}"
        assert not torch.equal(fused[2], torch.full_like(fused[2], 0.25))


@pytest.mark.arch("gemma4")
def test_fp8_calibrates_every_offloaded_expert(tmp_path, ids, loads, gemma4_model):
    import modelopt.torch.quantization as mtq

    model = gemma4_model
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model = _dispatch(model, tmp_path)
    moe_unfuse.register("gemma4")
    mtq.quantize(model, copy.deepcopy(mtq.FP8_DEFAULT_CFG), forward_loop=lambda m: m(input_ids=ids))
    uncalibrated = []
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer.experts, UnfusedExpertsMixin)
        for e, expert in enumerate(layer.experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(expert, proj)
                assert type(linear).__name__ == "QuantLinear"
                uncalibrated += [
                    f"{i}.{e}.{proj}.{q}"
                    for q in ("input_quantizer", "weight_quantizer")
                    if getattr(linear, q).amax is None
                ]
    assert not uncalibrated
    assert _expert_keys(loads) == [], "calibration loaded whole fused expert tensors from disk"
    mtq.disable_quantizer(model, "*")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


@pytest.mark.arch("dbrx")
def test_offloaded_dbrx_flattened_submodule_params(tmp_path, loads, tiny_model):
    """DBRX's experts are flattened 2-D ``mlp.w1/v1/w2`` owned by a submodule with its own offload hook.

    Fused and dispatched, this model cannot run at all (DbrxExperts reads ``mlp.w1`` without calling
    ``mlp``, so the hook never loads it: accelerate + DBRX, not moe_unfuse); unfused, each expert
    linear loads its own rows and the logits are the undispatched model's.
    """
    model = tiny_model("dbrx", expert_std=0.1)
    config = model.config
    with torch.no_grad():
        expected = model(input_ids=ids_for(config.vocab_size)).logits
    device_map = {f"transformer.{n}": EXECUTION for n, _ in model.transformer.named_children() if n != "blocks"}
    device_map.update({"transformer.blocks.0": "cpu", "transformer.blocks.1": "disk", "lm_head": EXECUTION})
    model = dispatch_model(model, device_map, main_device=EXECUTION, offload_dir=str(tmp_path), offload_buffers=True)
    assert model.transformer.blocks[1].ffn.experts.mlp.w1.is_meta
    moe_unfuse.unfuse(model, "dbrx")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids_for(config.vocab_size)).logits, expected)
    assert _expert_keys(loads, ("w1", "v1", "w2")) == []
