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
from moe_unfuse.hub.policy import estimate_tensor_bytes
from moe_unfuse.hub.tiny import byte_tokenizer, tiny_gemma4
from moe_unfuse.hub.verify import verify_checkpoint
from moe_unfuse.hub.verify_report import CheckpointContractError
from moe_unfuse.quant.calibration import calibration_batches, read_calibration_texts
from moe_unfuse.quant.quantize import quantize_model
from moe_unfuse.quant.renaming import engine_renames, rename_key, rename_module

pytestmark = [pytest.mark.arch("gemma4"), pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("export")]
DTYPE_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}
L0 = "model.layers.0.experts"


def _batches() -> list[dict[str, torch.Tensor]]:
    return calibration_batches(byte_tokenizer(), read_calibration_texts(None), calib_size=4, seq_len=64, batch_size=2)


def _export(tmp: Path, qformat: str, multimodal: bool = False, **kwargs) -> Path:
    model = tiny_gemma4(multimodal=multimodal)
    exclude = kwargs.pop("exclude", ())
    result = quantize_model(model, qformat, _batches(), exclude=exclude)
    out = tmp / f"{qformat}-{'mm' if multimodal else 'text'}"
    _, report = moe_unfuse.export_checkpoint(
        model, out, specs=result.specs, qformat=qformat, tokenizer=byte_tokenizer(), **kwargs
    )
    assert report.ok, str(report)
    return out


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("fp8"), "fp8")


@pytest.fixture(scope="module")
def nvfp4_mm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multimodal NVFP4 with layer 1's experts kept BF16 and re-fused."""
    return _export(
        tmp_path_factory.mktemp("nvfp4"),
        "nvfp4",
        multimodal=True,
        exclude=("*layers.1.experts*",),
        fuse_unquantized=True,
    )


def corrupt(
    src: Path,
    tmp: Path,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    configs: Callable[[dict, dict], None] | None = None,
) -> Path:
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
        for engine in ("vllm", "sglang", "trtllm"):
            report = verify_checkpoint(path, engine=engine)
            assert report.ok, str(report)
        assert len(verify_checkpoint(path).checks) == 17
    gate_up = next(c for c in verify_checkpoint(nvfp4_mm_ckpt).checks if c.name == "gate-up-global-scale")
    assert gate_up.detail.startswith("24 expert(s) share")
    from moe_unfuse.cli.main import main

    assert main(["verify", str(nvfp4_mm_ckpt)]) == 0
    assert "ok: 17 checks passed (NVFP4, engine vllm" in capsys.readouterr().out


def test_hub_names_not_moe_prefixed(fp8_ckpt: Path) -> None:
    """Gemma 4's expert keys hang off the decoder layer, as every engine loads them (engine_contracts.md)."""
    with safe_open(fp8_ckpt / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert f"{L0}.3.gate_proj.weight" in keys and f"{L0}.3.gate_proj.weight_scale" in keys
    assert not any(".moe." in k for k in keys)


def test_fused_next_to_per_expert_fails(fp8_ckpt: Path, tmp_path: Path) -> None:
    """What modelopt 0.48's read_unplaced_weights did: the bf16 fused tensor written beside the per-expert weights."""
    path = corrupt(
        fp8_ckpt,
        tmp_path,
        lambda t: t.update({"model.layers.2.experts.gate_up_proj": torch.zeros(8, 128, 128, dtype=torch.bfloat16)}),
    )
    assert (
        "model.layers.2.experts.gate_up_proj (and per-expert weights of model.layers.2.experts)"
        in failed(path)["no-fused-experts"]
    )


def test_missing_expert_scale_or_expert_fails(fp8_ckpt: Path, tmp_path: Path) -> None:
    def drop(t: dict) -> None:
        del t[f"{L0}.3.up_proj.weight_scale"]
        for k in [k for k in t if k.startswith(f"{L0}.5.")]:
            del t[k]

    bad = failed(corrupt(fp8_ckpt, tmp_path, drop))
    assert (
        f"{L0}.3.up_proj.weight_scale" in bad["experts-complete"]
        and f"{L0}.5.gate_proj.weight (missing)" in bad["experts-complete"]
    )
    assert f"{L0}.5.down_proj.weight (missing)" in bad["hub-names"]


def test_gate_up_global_scale_mismatch_fails(nvfp4_mm_ckpt: Path, tmp_path: Path) -> None:
    key = "model.language_model.layers.2.experts.6.up_proj.weight_scale_2"
    path = corrupt(nvfp4_mm_ckpt, tmp_path, lambda t: t.update({key: t[key] * 1.5}))
    bad = failed(path)
    assert list(bad) == ["gate-up-global-scale"] and bad["gate-up-global-scale"][0].startswith(
        "model.language_model.layers.2.experts.6 (gate_proj"
    )


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("suffix", ["input_scale", "weight_scale"])
def test_bad_scale_fails(fp8_ckpt: Path, tmp_path: Path, value: float, suffix: str) -> None:
    key = f"{L0}.4.down_proj.{suffix}"
    path = corrupt(fp8_ckpt, tmp_path, lambda t: t.update({key: torch.tensor(value)}))
    bad = failed(path)
    assert list(bad) == ["scales"] and bad["scales"][0].startswith(f"{key}=")


def test_nan_global_scale_fails(nvfp4_mm_ckpt: Path, tmp_path: Path) -> None:
    key = "model.language_model.layers.0.experts.2.down_proj.weight_scale_2"
    path = corrupt(nvfp4_mm_ckpt, tmp_path, lambda t: t.update({key: torch.tensor(float("nan"))}))
    assert failed(path)["scales"] == [f"{key}=nan"]


def test_router_tower_and_lm_head_must_be_excluded(nvfp4_mm_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(
        nvfp4_mm_ckpt,
        tmp_path,
        configs=_excludes(
            lambda ex: [e for e in ex if "layers.2.router" not in e and "vision_tower" not in e and e != "lm_head"]
        ),
    )
    bad = failed(path)["unquantized-excluded"]
    assert "model.language_model.layers.2.router.proj (unquantized, not in exclude_modules)" in bad
    assert "model.vision_tower.patch_embedder.input_proj (unquantized, not in exclude_modules)" in bad
    assert "lm_head (not in exclude_modules)" in bad


def test_quantized_router_fails(fp8_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(
        fp8_ckpt, tmp_path, lambda t: t.update({"model.layers.1.router.proj.weight_scale": torch.tensor(0.01)})
    )
    assert failed(path)["unquantized-excluded"] == ["model.layers.1.router.proj (quantized; must stay unquantized)"]


def test_exclude_everything_fails(fp8_ckpt: Path, tmp_path: Path) -> None:
    """``exclude_modules: ["*"]`` over quantized modules: an engine would load FP8 bytes as BF16."""
    bad = failed(corrupt(fp8_ckpt, tmp_path, configs=_excludes(lambda ex: ["*"])))
    assert (
        f"{L0}.0.gate_proj (quantized, yet excluded: an engine loads it as unquantized)" in bad["unquantized-excluded"]
    )


def test_refused_experts_must_stay_excluded(nvfp4_mm_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(
        nvfp4_mm_ckpt, tmp_path, configs=_excludes(lambda ex: [e for e in ex if "layers.1.experts" not in e])
    )
    assert set(failed(path)["no-fused-experts"]) == {
        "model.language_model.layers.1.experts.down_proj [8, 128, 64]",
        "model.language_model.layers.1.experts.gate_up_proj [8, 128, 128]",
    }


def test_quant_configs_must_agree(fp8_ckpt: Path, tmp_path: Path) -> None:
    def edit(hf: dict, cfg: dict) -> None:
        cfg["quantization_config"]["ignore"].append("model.layers.0.self_attn")

    assert failed(corrupt(fp8_ckpt, tmp_path, configs=edit)) == {
        "quant-config": ["model.layers.0.self_attn (only in config.json)"]
    }


def test_quantized_tensors_without_config_fail(fp8_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(fp8_ckpt, tmp_path)
    (path / "hf_quant_config.json").unlink()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    bad = failed(path)
    assert bad["quant-config"] and f"{L0}.0.down_proj.input_scale" in bad["quant-config"]


def test_nvfp4_labelled_fp8_fails(nvfp4_mm_ckpt: Path, tmp_path: Path) -> None:
    def relabel(hf: dict, cfg: dict) -> None:
        hf["quantization"]["quant_algo"] = cfg["quantization_config"]["quant_algo"] = "FP8"

    bad = failed(corrupt(nvfp4_mm_ckpt, tmp_path, configs=relabel))
    assert any(
        "model.language_model.layers.0.experts.0.gate_proj.weight U8" in k and "FP8 expected F8_E4M3" in k
        for k in bad["hub-names"]
    )


def test_transposed_or_wrong_dtype_weight_fails(fp8_ckpt: Path, tmp_path: Path) -> None:
    def edit(t: dict) -> None:
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].t().contiguous()
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"].to(torch.int8)

    bad = failed(corrupt(fp8_ckpt, tmp_path, edit))["hub-names"]
    assert any(k.startswith("model.layers.0.self_attn.k_proj.weight F8_E4M3 [128, 64]") for k in bad)
    assert any(k.startswith("model.layers.0.mlp.down_proj.weight") for k in bad)


def test_unknown_tensor_fails(fp8_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(fp8_ckpt, tmp_path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    assert failed(path) == {
        "hub-names": ["model.layers.0.extra.weight (not a tensor save_pretrained writes for this model)"]
    }


def _shard(src: Path, tmp: Path) -> Path:
    """``src`` split into two shards with an index, as save_pretrained writes a large checkpoint."""
    dst = corrupt(src, tmp)
    with safe_open(dst / "model.safetensors", "pt") as fh:
        data = {k: fh.get_tensor(k) for k in fh.keys()}
    (dst / "model.safetensors").unlink()
    keys = sorted(data)
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, ks in halves.items():
        save_file({k: data[k] for k in ks}, str(dst / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_sharded_index_must_match(fp8_ckpt: Path, tmp_path: Path) -> None:
    path = _shard(fp8_ckpt, tmp_path)
    assert verify_checkpoint(path).ok
    index = json.loads((path / "model.safetensors.index.json").read_text())
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    bad = failed(path)["shards"]
    assert (
        f"{dropped} (in model-00001-of-00002.safetensors, not in the index)" in bad
        and "model.layers.0.ghost.weight (in the index, in no shard)" in bad
    )
    index["weight_map"]["x"] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "../elsewhere.safetensors (shard outside the folder)" in failed(path)["shards"]


@pytest.mark.parametrize(
    "damage", ["truncated", "header-only", "bad-json", "list-config", "no-weight-map", "missing-shard"]
)
def test_unreadable_checkpoint_is_one_line_exit_2(
    fp8_ckpt: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture
) -> None:
    path = _shard(fp8_ckpt, tmp_path) if damage in ("no-weight-map", "missing-shard") else corrupt(fp8_ckpt, tmp_path)
    if damage == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "header-only":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    elif damage == "bad-json":
        (path / "config.json").write_text("{not json")
    elif damage == "list-config":
        (path / "config.json").write_text("[1, 2]")
    elif damage == "no-weight-map":
        (path / "model.safetensors.index.json").write_text("{}")
    else:
        (path / "model-00002-of-00002.safetensors").unlink()
    from moe_unfuse.cli.main import main

    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fix:" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# engine rules: each fails on a checkpoint corrupted to break it


def _moe_prefixed(t: dict) -> None:
    for k in [k for k in t if ".experts." in k]:
        t[k.replace(".experts.", ".moe.experts.")] = t.pop(k)


def test_moe_prefixed_expert_keys_fail_vllm_and_trtllm(fp8_ckpt: Path, tmp_path: Path) -> None:
    """The naming main wrote before: vLLM 0.31+ raises on the unknown `moe` module, TensorRT-LLM's
    Gemma 4 mapper matches only layers.N.experts.E."""
    path = corrupt(fp8_ckpt, tmp_path, _moe_prefixed)
    for engine in ("vllm", "trtllm"):
        bad = failed(path, engine=engine)
        assert f"{L0.replace('.experts', '.moe.experts')}.0.gate_proj.weight" in bad["experts-under-decoder-layer"]
        assert any(
            k.startswith("model.layers.0.moe.experts.0.gate_proj.weight (not a tensor") for k in bad["hub-names"]
        )
    assert "experts-under-decoder-layer" not in failed(path, engine="sglang")


def test_expert_input_scale_must_be_0d(fp8_ckpt: Path, tmp_path: Path) -> None:
    key = f"{L0}.1.up_proj.input_scale"
    path = corrupt(fp8_ckpt, tmp_path, lambda t: t.update({key: t[key].reshape(1)}))
    for engine in ("vllm", "sglang"):
        assert failed(path, engine=engine)["expert-input-scale-0d"] == [f"{key} shape [1]"]
    assert verify_checkpoint(path, engine="trtllm").ok


def test_exclude_pattern_vllm_cannot_match(fp8_ckpt: Path, tmp_path: Path) -> None:
    path = corrupt(fp8_ckpt, tmp_path, configs=_excludes(lambda ex: [*ex, "model.layers.0.router.*"]))
    assert failed(path, engine="vllm") == {
        "exclude-patterns": ["model.layers.0.router.* (write model.layers.0.router*)"]
    }


def test_quant_config_fields(nvfp4_mm_ckpt: Path, tmp_path: Path) -> None:
    def edit(hf: dict, cfg: dict) -> None:
        del hf["quantization"]["group_size"]
        cfg["quantization_config"]["quant_method"] = "fp4"

    bad = failed(corrupt(nvfp4_mm_ckpt, tmp_path, configs=edit), engine="vllm")["quant-config-fields"]
    assert "hf_quant_config.json quantization.group_size (missing)" in bad and any(
        "quant_method 'fp4'" in b for b in bad
    )


def test_gpt_oss_per_expert_fails_vllm(tmp_path: Path) -> None:
    """GPT-OSS exported per expert (not its spec's fused layout): vLLM would drop every expert key."""
    import dataclasses

    from moe_unfuse.hub.tiny import tiny_model_for

    spec = moe_unfuse.get_spec("gpt_oss")
    model = tiny_model_for(spec)
    per_expert = dataclasses.replace(spec, export_layout="per_expert")
    ids = {"input_ids": torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))}
    result = quantize_model(model, "fp8", [ids], arch=per_expert)
    _, report = moe_unfuse.export_checkpoint(model, tmp_path / "o", specs=[per_expert], qformat="fp8", progress=False)
    path = report.path
    bad = failed(path, engine="vllm", arch="gpt_oss")
    assert (
        "model.layers.0.mlp.experts (per-expert keys; vLLM reads only the fused model.layers.0.mlp.experts.gate_up_proj)"
        in bad["gpt-oss-fused-experts"]
    )
    assert result.specs == [per_expert]


def test_raise_and_cli_exit_status(fp8_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key = f"{L0}.0.gate_proj.input_scale"
    path = corrupt(fp8_ckpt, tmp_path, lambda t: t.update({key: torch.tensor(float("nan"))}))
    with pytest.raises(CheckpointContractError, match=re.escape(key)):
        verify_checkpoint(path, raise_on_error=True)
    from moe_unfuse.cli.main import main

    assert main(["verify", str(path)]) == 1
    assert f"FAIL scales: scales that are not finite and > 0: {key}=nan" in capsys.readouterr().out


def test_failed_verification_keeps_out_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A spec rename that breaks the names (as `.moe.moe.experts` broke vLLM 0.19): the command fails
    (exit 1) naming the keys, and the checkpoint never lands at --out, only at <out>.invalid; a good
    earlier checkpoint at --out is kept."""
    import moe_unfuse.quant.renaming as renaming
    from moe_unfuse.cli.main import main

    out = tmp_path / "out"
    args = ["quantize", "--qformat", "fp8", "--out", str(out), "--calib-size", "2", "--seq-len", "32", "--no-progress"]
    assert main(args) == 0
    before = (out / "model.safetensors").read_bytes()
    doubling = [(re.compile(r"\.experts\.(\d+)\."), r".moe.moe.experts.\1.")]
    monkeypatch.setattr(renaming, "engine_renames", lambda specs, engine: doubling)
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 1
    printed = capsys.readouterr().out
    assert (
        "verify     FAILED" in printed
        and "model.layers.0.moe.moe.experts.0.down_proj.input_scale (not a tensor save_pretrained writes" in printed
    )
    assert (out / "model.safetensors").read_bytes() == before and (
        tmp_path / "out.invalid" / "model.safetensors"
    ).is_file()
    assert f"FAILED     checkpoint kept for inspection at {tmp_path / 'out.invalid'}" in printed


def test_export_error_is_one_line_and_keeps_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A crash inside modelopt's export: one line with the fix, exit 2, <out>.invalid says why, --out untouched."""
    import modelopt.torch.export as mte

    from moe_unfuse.cli.main import main

    out = tmp_path / "out"
    args = ["quantize", "--qformat", "fp8", "--out", str(out), "--calib-size", "2", "--seq-len", "32", "--no-progress"]
    assert main(args) == 0
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise AttributeError("Failed to access attribute 'w1' on experts")

    monkeypatch.setattr(mte, "export_hf_checkpoint", boom)
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "modelopt export_hf_checkpoint" in err and "fix:" in err and "w1" in err
    why = json.loads((tmp_path / "out.invalid" / "moe_unfuse.json").read_text())["error"]
    assert why["step"] == "modelopt export_hf_checkpoint" and "w1" in why["message"]
    assert (out / "model.safetensors").read_bytes() == before and not (tmp_path / "out.partial").exists()


def test_second_run_on_same_out_is_refused(tmp_path: Path) -> None:
    from moe_unfuse.base.errors import MoeUnfuseError
    from moe_unfuse.quant.out_dir import out_lock

    out = tmp_path / "out"
    with out_lock(out):
        with pytest.raises(MoeUnfuseError, match="another moe-unfuse run is writing it"):
            with out_lock(out):
                pass
    with out_lock(out):  # released
        pass


def test_out_inside_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moe_unfuse.cli.main import main

    src = tmp_path / "model"
    tiny_gemma4().save_pretrained(src)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src / "q", tmp_path):
        assert main(["quantize", str(src), "--qformat", "fp8", "--out", str(out), "--overwrite"]) == 2
        assert "lies inside MODEL" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before


def test_exported_files_share_one_mode(fp8_ckpt: Path) -> None:
    import os

    modes = {p.name: p.stat().st_mode & 0o777 for p in fp8_ckpt.iterdir() if p.is_file()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ----------------------------------------------------------------------------------------------


def test_refused_unquantized_reloads_bit_exact(tmp_path: Path) -> None:
    from transformers import Gemma4ForCausalLM

    model = tiny_gemma4()
    result = quantize_model(model, "none", _batches())
    _, report = moe_unfuse.export_checkpoint(
        model, tmp_path / "o", specs=result.specs, qformat="none", fuse_unquantized=True
    )
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


def test_renames_apply_once_and_to_modules() -> None:
    """``export.renames`` stays for an engine that truly needs one (none ships: Gemma 4's was wrong)."""
    assert all(
        engine_renames([spec], e) == []
        for spec in moe_unfuse.list_specs().values()
        for e in ("vllm", "sglang", "trtllm", "hf")
    )
    renames = [(re.compile(r"(?<!\.moe)\.experts\.(\d+)\."), r".moe.experts.\1.")]
    once = rename_key("model.layers.7.experts.12.gate_proj.weight_scale_2", renames)
    assert once == "model.layers.7.moe.experts.12.gate_proj.weight_scale_2" and rename_key(once, renames) == once
    assert rename_module("model.layers.3.experts.5", renames) == "model.layers.3.moe.experts.5"
    assert rename_module("model.layers.3.experts*", renames) == "model.layers.3.experts*"


# ----------------------------------------------------------------------------------------------


def _tensor_bytes(path: Path) -> int:
    total = 0
    with safe_open(path / "model.safetensors", "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            total += (
                int(torch.tensor(sl.get_shape()).prod().item() if sl.get_shape() else 1) * DTYPE_BYTES[sl.get_dtype()]
            )
    return total


def test_size_estimate_matches_export(fp8_ckpt: Path, nvfp4_mm_ckpt: Path) -> None:
    assert estimate_tensor_bytes(tiny_gemma4(), "fp8") == _tensor_bytes(fp8_ckpt)
    assert estimate_tensor_bytes(
        tiny_gemma4(multimodal=True), "nvfp4", exclude=("*layers.1.experts*",)
    ) == _tensor_bytes(nvfp4_mm_ckpt)


def test_gemma4_26b_a4b_sized_estimate() -> None:
    """On the meta device, a config approximating google/gemma-4-26B-A4B (text stack): against the
    reported sizes (BF16 ~49 GB, NVFP4 with experts quantized 16-17 GB; experts ~91% of ~25 B)."""
    from moe_unfuse.hub.tiny import GEMMA4_26B_A4B_TEXT

    with torch.device("meta"):
        model = tiny_gemma4(**GEMMA4_26B_A4B_TEXT)
    sizes = {q: estimate_tensor_bytes(model, q) / 1e9 for q in ("none", "fp8", "nvfp4", "nvfp4_experts_only")}
    assert 45 < sizes["none"] < 52 and 24 < sizes["fp8"] < 28 and 14 < sizes["nvfp4"] < 18
    assert sizes["nvfp4"] < sizes["nvfp4_experts_only"] < sizes["nvfp4"] + 3


def test_verify_without_metadata_infers_the_spec(fp8_ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint from elsewhere (no moe_unfuse.json): the contract comes from config.json on the meta device."""
    path = corrupt(fp8_ckpt, tmp_path)
    (path / "moe_unfuse.json").unlink()
    assert verify_checkpoint(path).ok
    (path / "model.safetensors").rename(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as fh:
        data = {k.replace(".experts.", ".moe.experts."): fh.get_tensor(k) for k in fh.keys()}
    save_file(data, str(path / "model.safetensors"), metadata={"format": "pt"})
    bad = failed(path)
    assert len(bad["experts-under-decoder-layer"]) == 4 * 8 * 9 and "hub-names" in bad
