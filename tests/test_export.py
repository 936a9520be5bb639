"""The export contract: exports pass ``verify_checkpoint``, and each invariant fails on a checkpoint
corrupted on purpose; re-fused exports reload bit-exactly; renames never double; size estimates."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moe_unfuse
from moe_unfuse.calibration import calibration_batches, read_calibration_texts
from moe_unfuse.export import engine_renames, estimate_tensor_bytes, rename_key, rename_module
from moe_unfuse.quantize import quantize_model
from moe_unfuse.tiny import byte_tokenizer, tiny_gemma4
from moe_unfuse.verify import CheckpointContractError, verify_checkpoint

pytestmark = [pytest.mark.arch("gemma4"), pytest.mark.usefixtures("one_thread")]
DTYPE_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}
L0 = "model.layers.0.moe.experts"


def _batches() -> list[dict[str, torch.Tensor]]:
    return calibration_batches(byte_tokenizer(), read_calibration_texts(None), calib_size=4, seq_len=64, batch_size=2)


def _export(tmp: Path, qformat: str, multimodal: bool = False, **kwargs) -> Path:
    model = tiny_gemma4(multimodal=multimodal)
    exclude = kwargs.pop("exclude", ())
    result = quantize_model(model, qformat, _batches(), exclude=exclude)
    out = tmp / f"{qformat}-{'mm' if multimodal else 'text'}"
    _, report = moe_unfuse.export_checkpoint(model, out, specs=result.specs, qformat=qformat, tokenizer=byte_tokenizer(), **kwargs)
    assert report.ok, str(report)
    return out


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("fp8"), "fp8")


@pytest.fixture(scope="module")
def nvfp4_mm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multimodal NVFP4 with layer 1's experts kept BF16 and re-fused."""
    return _export(tmp_path_factory.mktemp("nvfp4"), "nvfp4", multimodal=True, exclude=("*layers.1.experts*",), refuse_unquantized=True)


def corrupt(src: Path, tmp: Path, tensors: Callable[[dict[str, torch.Tensor]], None] | None = None, configs: Callable[[dict, dict], None] | None = None) -> Path:
    """A copy of checkpoint ``src`` with its tensors and/or (hf_quant_config, config) edited in place."""
    dst = tmp / "corrupt"
    shutil.copytree(src, dst)
    if tensors is not None:
        f = dst / "model.safetensors"
        with safe_open(f, "pt") as fh:
            data = {k: fh.get_tensor(k) for k in fh.keys()}
        tensors(data)
        save_file(data, str(f), metadata={"format": "pt"})
    if configs is not None:
        hf, cfg = json.loads((dst / "hf_quant_config.json").read_text()), json.loads((dst / "config.json").read_text())
        configs(hf, cfg)
        (dst / "hf_quant_config.json").write_text(json.dumps(hf))
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def failed(path: Path, **kwargs) -> dict[str, list[str]]:
    report = verify_checkpoint(path, **kwargs)
    return {c.name: c.keys for c in report.failed}


def _excludes(edit: Callable[[list[str]], list[str]]) -> Callable[[dict, dict], None]:
    def apply(hf: dict, cfg: dict) -> None:
        hf["quantization"]["exclude_modules"] = edit(hf["quantization"]["exclude_modules"])
        cfg["quantization_config"]["ignore"] = edit(cfg["quantization_config"]["ignore"])

    return apply


# ----------------------------------------------------------------------------------------------


def test_exports_pass(fp8_ckpt: Path, nvfp4_mm_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    for path in (fp8_ckpt, nvfp4_mm_ckpt):
        report = verify_checkpoint(path)
        assert report.ok and len(report.checks) == 7, str(report)
    gate_up = verify_checkpoint(nvfp4_mm_ckpt).checks[2]
    assert gate_up.name == "gate-up-global-scale" and gate_up.detail.startswith("24 expert(s) share")
    from moe_unfuse.cli import main

    assert main(["verify", str(nvfp4_mm_ckpt)]) == 0
    assert "ok: 7 checks passed (NVFP4, engine vllm" in capsys.readouterr().out


def test_fused_expert_tensor_fails(fp8_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(fp8_ckpt, tmp_path, lambda t: t.update({f"model.layers.2.experts.gate_up_proj": torch.zeros(8, 128, 128, dtype=torch.bfloat16)}))
    assert failed(path) == {"no-fused-experts": ["model.layers.2.experts.gate_up_proj [8, 128, 128]"]}


def test_missing_expert_scale_or_expert_fails(fp8_ckpt: Path, tmp_path: Path) -> None:
    def drop(t: dict) -> None:
        del t[f"{L0}.3.up_proj.weight_scale"]
        for k in [k for k in t if k.startswith(f"{L0}.5.")]:
            del t[k]

    bad = failed(corrupt(fp8_ckpt, tmp_path, drop))
    assert bad == {"experts-complete": [f"{L0}.3.up_proj.weight_scale", f"{L0}.5 (missing)"]}


def test_gate_up_global_scale_mismatch_fails(nvfp4_mm_ckpt: Path, tmp_path: Path) -> None:
    key = "model.language_model.layers.2.moe.experts.6.up_proj.weight_scale_2"
    path = corrupt(nvfp4_mm_ckpt, tmp_path, lambda t: t.update({key: t[key] * 1.5}))
    bad = failed(path)
    assert list(bad) == ["gate-up-global-scale"] and bad["gate-up-global-scale"][0].startswith("model.language_model.layers.2.moe.experts.6 (gate_proj")


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -1.0])
def test_bad_input_scale_fails(fp8_ckpt: Path, tmp_path: Path, value: float) -> None:
    key = f"{L0}.4.down_proj.input_scale"
    path = corrupt(fp8_ckpt, tmp_path, lambda t: t.update({key: torch.tensor(value)}))
    bad = failed(path)
    assert list(bad) == ["input-scales"] and bad["input-scales"][0].startswith(f"{key}=")


def test_router_tower_and_lm_head_must_be_excluded(nvfp4_mm_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(nvfp4_mm_ckpt, tmp_path, configs=_excludes(lambda ex: [e for e in ex if "layers.2.router" not in e and "vision_tower" not in e and e != "lm_head"]))
    bad = failed(path)["unquantized-excluded"]
    assert "model.language_model.layers.2.router.proj (unquantized, not in exclude_modules)" in bad
    assert "model.vision_tower.patch_embedder.input_proj (unquantized, not in exclude_modules)" in bad
    assert "lm_head (not in exclude_modules)" in bad


def test_quantized_router_fails(fp8_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(fp8_ckpt, tmp_path, lambda t: t.update({"model.layers.1.router.proj.weight_scale": torch.tensor(0.01)}))
    assert failed(path) == {"unquantized-excluded": ["model.layers.1.router.proj (quantized; must stay unquantized)"]}


def test_refused_experts_must_stay_excluded(nvfp4_mm_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(nvfp4_mm_ckpt, tmp_path, configs=_excludes(lambda ex: [e for e in ex if "layers.1.experts" not in e]))
    assert failed(path) == {"no-fused-experts": [
        "model.language_model.layers.1.experts.down_proj [8, 128, 64]", "model.language_model.layers.1.experts.gate_up_proj [8, 128, 128]",
    ]}


def test_quant_configs_must_agree(fp8_ckpt: Path, tmp_path: Path) -> None:
    def edit(hf: dict, cfg: dict) -> None:
        cfg["quantization_config"]["ignore"].append("model.layers.0.self_attn")

    assert failed(corrupt(fp8_ckpt, tmp_path, configs=edit)) == {"quant-config": ["model.layers.0.self_attn (only in config.json)"]}


@pytest.mark.parametrize("replace, expect", [(".experts.", "expected"), (".moe.moe.experts.", "doubled segment")])
def test_engine_names(fp8_ckpt: Path, tmp_path: Path, replace: str, expect: str) -> None:
    def rename(t: dict) -> None:
        for k in [k for k in t if k.startswith(f"{L0}.1.")]:
            t[k.replace(".moe.experts.", replace)] = t.pop(k)

    bad = failed(corrupt(fp8_ckpt, tmp_path, rename))  # expert 1 also went missing from its layer
    assert len(bad["engine-names"]) == 9 and all(expect in k for k in bad["engine-names"])
    assert f"{L0}.1 (missing)" in bad["experts-complete"]


def test_engine_names_of_another_engine_fail(fp8_ckpt: Path) -> None:
    """Exported for vLLM, checked for plain transformers naming: the recorded expert modules disagree."""
    bad = failed(fp8_ckpt, engine="hf")
    assert list(bad) == ["engine-names"] and f"{L0} (hf names it model.layers.0.experts)" in bad["engine-names"]


def test_raise_and_cli_exit_status(fp8_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key = f"{L0}.0.gate_proj.input_scale"
    path = corrupt(fp8_ckpt, tmp_path, lambda t: t.update({key: torch.tensor(float("nan"))}))
    with pytest.raises(CheckpointContractError, match=re.escape(key)):
        verify_checkpoint(path, raise_on_error=True)
    from moe_unfuse.cli import main

    assert main(["verify", str(path)]) == 1
    assert f"FAIL input-scales: input_scale not finite and > 0: {key}=nan" in capsys.readouterr().out


def test_failed_verification_keeps_out_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A spec whose vLLM rename doubles the prefix (a bug that broke loads before): the command fails
    (exit 1) naming the keys, and the checkpoint never lands at --out, only at <out>.invalid."""
    import moe_unfuse.export as export

    doubling = [(re.compile(r"\.experts\.(\d+)\."), r".moe.moe.experts.\1.")]
    monkeypatch.setattr(export, "engine_renames", lambda specs, engine: doubling)
    from moe_unfuse.cli import main

    out = tmp_path / "out"
    assert main(["quantize", "--qformat", "fp8", "--out", str(out), "--calib-size", "2", "--seq-len", "32", "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "verify     FAILED 1 of 7 checks" in printed and "model.layers.0.moe.moe.experts.0.down_proj.input_scale (doubled segment)" in printed
    assert not out.exists() and (tmp_path / "out.invalid" / "model.safetensors").is_file()
    assert f"FAILED     checkpoint kept for inspection at {tmp_path / 'out.invalid'}" in printed


# ----------------------------------------------------------------------------------------------


def test_refused_unquantized_reloads_bit_exact(tmp_path: Path) -> None:
    from transformers import Gemma4ForCausalLM

    model = tiny_gemma4()
    result = quantize_model(model, "none", _batches())
    _, report = moe_unfuse.export_checkpoint(model, tmp_path / "o", specs=result.specs, qformat="none", refuse_unquantized=True)
    assert report.ok, str(report)
    reloaded = Gemma4ForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.bfloat16).eval()
    original = tiny_gemma4()
    a, b = original.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ids = _batches()[0]
    with torch.no_grad():
        assert torch.equal(original(**ids).logits, reloaded(**ids).logits)


def test_refused_layer_in_quantized_export_is_the_original(nvfp4_mm_ckpt: Path) -> None:
    original = tiny_gemma4(multimodal=True).model.language_model.layers[1].experts
    with safe_open(nvfp4_mm_ckpt / "model.safetensors", "pt") as f:
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(f.get_tensor(f"model.language_model.layers.1.experts.{name}"), getattr(original, name))
        assert not any(k.startswith("model.language_model.layers.1.moe.") for k in f.keys())


def test_renames_never_double() -> None:
    renames = engine_renames([moe_unfuse.get_spec("gemma4")], "vllm")
    key = "model.language_model.layers.7.experts.12.gate_proj.weight_scale_2"
    once = rename_key(key, renames)
    assert once == "model.language_model.layers.7.moe.experts.12.gate_proj.weight_scale_2"
    assert rename_key(once, renames) == once
    assert rename_module("model.layers.3.experts.5", renames) == "model.layers.3.moe.experts.5"
    assert rename_module("model.layers.3.experts*", renames) == "model.layers.3.experts*"
    assert engine_renames([moe_unfuse.get_spec("gemma4")], "hf") == []


# ----------------------------------------------------------------------------------------------


def _tensor_bytes(path: Path) -> int:
    total = 0
    with safe_open(path / "model.safetensors", "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            total += int(torch.tensor(sl.get_shape()).prod().item() if sl.get_shape() else 1) * DTYPE_BYTES[sl.get_dtype()]
    return total


def test_size_estimate_matches_export(fp8_ckpt: Path, nvfp4_mm_ckpt: Path) -> None:
    assert estimate_tensor_bytes(tiny_gemma4(), "fp8") == _tensor_bytes(fp8_ckpt)
    assert estimate_tensor_bytes(tiny_gemma4(multimodal=True), "nvfp4", exclude=("*layers.1.experts*",)) == _tensor_bytes(nvfp4_mm_ckpt)


def test_gemma4_26b_a4b_sized_estimate() -> None:
    """On the meta device, a config approximating google/gemma-4-26B-A4B (text stack): against the
    reported sizes (BF16 ~49 GB, NVFP4 with experts quantized 16-17 GB; experts ~91% of ~25 B)."""
    from moe_unfuse.tiny import GEMMA4_26B_A4B_TEXT

    with torch.device("meta"):
        model = tiny_gemma4(**GEMMA4_26B_A4B_TEXT)
    sizes = {q: estimate_tensor_bytes(model, q) / 1e9 for q in ("none", "fp8", "nvfp4", "nvfp4_experts_only")}
    assert 45 < sizes["none"] < 52 and 24 < sizes["fp8"] < 28 and 14 < sizes["nvfp4"] < 18
    assert sizes["nvfp4"] < sizes["nvfp4_experts_only"] < sizes["nvfp4"] + 3


def test_verify_without_metadata_infers_the_spec(fp8_ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint from elsewhere (no moe_unfuse.json): the spec is inferred from config.json on the meta device."""
    path = corrupt(fp8_ckpt, tmp_path)
    (path / "moe_unfuse.json").unlink()
    assert verify_checkpoint(path).ok
    (path / "model.safetensors").rename(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as fh:
        data = {k.replace(".moe.experts.", ".experts."): fh.get_tensor(k) for k in fh.keys()}
    save_file(data, str(path / "model.safetensors"), metadata={"format": "pt"})
    bad = failed(path)
    assert list(bad) == ["engine-names"] and len(bad["engine-names"]) == 4 * 8 * 9
