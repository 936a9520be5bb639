"""Layer-by-layer quantization (``quantize --layerwise``) writes the checkpoint the whole-model path
writes: every tensor bit for bit, the same configs and the same ``moe_unfuse.json``, for every spec
with a whole tiny model (per-layer inputs and mixed attention types, hub per-expert tensors fused on
load, a fused export layout, fp32-kept routers and sinks, a router reading its child's weight,
identity experts, hybrid attention ...; the gaps modelopt's streaming export leaves are strict
xfails); models it cannot do fail in one line before anything is written; and it is chosen by
default when the whole model would not fit in memory."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from helpers import assert_same_checkpoint, save_tiny, spec_names, spec_raw

import moe_unfuse
from moe_unfuse.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

#: Every spec with a whole tiny model, as in the export-family tests (names read from the spec files).
FAMILIES = [a for a in spec_names() if (spec_raw(a).get("golden") or {}).get("model")]
#: Refused in one line before anything is written (tested below).
REFUSED = {
    "dbrx": "no decoder layer list",
    "jamba": "no decoder layer list",
    "bailing_hybrid": "splits hub tensors on load",
    "glm5_next": "splits hub tensors on load",
    "lara_mini": "splits hub tensors on load",  # transformers 5.24 and later
}
#: Families modelopt's streaming export cannot yet write as the whole-model path does (README lists them).
KNOWN_LAYERWISE_GAPS = {
    "deepseek_ocr2": "modelopt's streaming export mis-shapes a weight",
    "unlimited_ocr": "modelopt's streaming export mis-shapes a weight",
    "zaya": "modelopt's streaming export mis-shapes a weight",
    "jetmoe": "a module reads weights of a child it does not call: meta under offload",
    "llama4": "a module reads weights of a child it does not call: meta under offload",
}
if version("nvidia-modelopt").startswith("0.47."):  # 0.48 names them right
    KNOWN_LAYERWISE_GAPS["nemotron_h"] = "modelopt 0.47's streaming name mapper writes backbone.pt_name_sentinel names"


def _family(arch: str) -> list:
    marks = [pytest.mark.arch(arch)]
    if arch in KNOWN_LAYERWISE_GAPS:
        marks.append(pytest.mark.xfail(reason=KNOWN_LAYERWISE_GAPS[arch], strict=True))
    return [pytest.param(arch, marks=marks, id=arch)]


CALIB = ["--calib-size", "4", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--force-routing"]


_save = save_tiny


@pytest.mark.parametrize("arch", [p for a in FAMILIES if a not in REFUSED for p in _family(a)])
def test_layerwise_checkpoint_equals_whole_model(arch: str, tmp_path: Path) -> None:
    if moe_unfuse.get_spec(arch).resolve_class() is None:
        pytest.skip(f"{arch}: not in the installed transformers")
    model = _save(arch, tmp_path / "model")
    for mode in ("--no-layerwise", "--layerwise"):
        out = tmp_path / mode.strip("-")
        assert main(["quantize", str(model), "--qformat", "nvfp4", "--out", str(out), mode, *CALIB]) == 0
    assert_same_checkpoint(tmp_path / "no-layerwise", tmp_path / "layerwise")
    assert not list(tmp_path.glob(".layerwise.offload-*")), "the offload folder is removed"


@pytest.mark.arch("gemma4")
def test_layerwise_fp8_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _save("gemma4", tmp_path / "model")
    for mode in ("--no-layerwise", "--layerwise"):
        out = tmp_path / mode.strip("-")
        assert main(["quantize", str(model), "--qformat", "fp8", "--out", str(out), mode, *CALIB]) == 0
    assert_same_checkpoint(tmp_path / "no-layerwise", tmp_path / "layerwise")
    report = capsys.readouterr().out
    assert report.count("mode       layer by layer: 4 decoder layers") == 1


@pytest.mark.parametrize("arch, why", [pytest.param(a, w, marks=pytest.mark.arch(a), id=a) for a, w in REFUSED.items()])
def test_layerwise_refused_in_one_line_before_anything_is_written(
    arch: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if moe_unfuse.get_spec(arch).resolve_class() is None:
        pytest.skip(f"{arch}: not in the installed transformers")
    model = _save(arch, tmp_path / "model")
    before = {f: f.stat().st_mtime_ns for f in model.iterdir()}
    out = tmp_path / "out"
    assert main(["quantize", str(model), "--qformat", "nvfp4", "--out", str(out), "--layerwise", *CALIB]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and "fix: pass --no-layerwise" in err[0]
    assert not out.exists() and not (tmp_path / "out.invalid").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no offload folder left behind"
    assert {f: f.stat().st_mtime_ns for f in model.iterdir()} == before


def test_layerwise_is_the_default_when_the_model_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import moe_unfuse.layerwise as layerwise

    model = _save("gemma4", tmp_path / "model")
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
    import moe_unfuse.layerwise as layerwise

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
    from moe_unfuse.calibration import ScaleFallback
    from moe_unfuse.quantize import fallback_lines

    many = [ScaleFallback("model.layers.0.experts", e, ("gate_proj", "up_proj"), 0.5, "layer max") for e in range(40)]
    one = [ScaleFallback("model.layers.1.experts", 3, ("down_proj",), 0.25, "model max")]
    lines = fallback_lines(many + one)
    assert len(lines) == 3
    assert lines[0].startswith("fallback model.layers.0.experts 40 experts (0-39)")
    assert "40 input amax without data took the layer max" in lines[0]
    assert lines[1] == f"fallback {one[0]}" and "moe_unfuse.json" in lines[2]
