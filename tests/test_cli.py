"""``moe-unfuse list``, ``show`` and ``check`` through the real entry point (``moe_unfuse.cli.main.main``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import HANG_S, SPECS_DIR

import moe_unfuse
from moe_unfuse.cli import main as cli


@pytest.mark.arch("gemma4")
def test_list_table_and_json(capsys, gemma4_spec):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.split()[0] == "gemma4")
    assert row.split()[1:] == ["yes", gemma4_spec.target_class]
    assert cli.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["arch"] for r in rows] == sorted(moe_unfuse.list_specs())
    gemma = next(r for r in rows if r["arch"] == "gemma4")
    assert (
        gemma["available"] is True
        and gemma["target_class"] == gemma4_spec.target_class
        and gemma["source"] == gemma4_spec.source
    )


@pytest.mark.arch("gemma4")
def test_list_reports_a_class_missing_from_transformers(capsys, monkeypatch):
    from moe_unfuse.spec.model import Spec

    monkeypatch.setattr(Spec, "resolve_class", lambda self: None if self.arch == "gemma4" else object)
    moe_unfuse.registry()  # list asks each spec's class (not the light read) once the registry is loaded:
    # loaded here, not left to an earlier test in this process (under xdist this one may run first)
    assert cli.main(["list", "--json"]) == 0
    rows = {r["arch"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gemma4"]["available"] is False and rows["mixtral"]["available"] is True


@pytest.mark.arch("gemma4")
def test_show_prints_the_resolved_spec(capsys, gemma4_spec):
    assert cli.main(["show", "gemma4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# gemma4: resolved from {gemma4_spec.source}")
    assert yaml.safe_load(out) == dict(gemma4_spec.raw)


@pytest.mark.arch("mixtral")
def test_show_merges_extends(capsys):
    child = yaml.safe_load((SPECS_DIR / "mixtral.yaml").read_text())
    assert child.get("extends") == "_standard" and "params" not in child
    assert cli.main(["show", str(SPECS_DIR / "mixtral.yaml")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert "extends" not in shown and "abstract" not in shown
    assert shown["params"]["gate_up_proj"]["into"] == ["gate_proj", "up_proj"] and shown["arch"] == "mixtral"


def test_show_unknown_arch_is_one_line(capsys):
    assert cli.main(["show", "no_such_arch"]) == 2
    err = capsys.readouterr().err
    assert "unknown arch 'no_such_arch'" in err and "fix:" in err and err.count("\n") == 1


@pytest.mark.arch("gemma4")
def test_check_passes_a_good_spec_with_every_golden_check(capsys, gemma4_spec):
    assert cli.main(["check", gemma4_spec.source]) == 0
    out = capsys.readouterr().out
    assert out.startswith("spec ok: gemma4 ->")
    for name in (
        "exact-float32",
        "exact-bfloat16",
        "grouped_mm-float32",
        "fuse",
        "modelopt-off",
        "fp8-calibrated-eager",
        "whole-model",
    ):
        assert f"PASS  {name}" in out
    assert "FAIL" not in out and "checks passed" in out


@pytest.mark.arch("gemma4")
def test_check_fails_a_spec_whose_layout_is_wrong(tmp_path, capsys, gemma4_spec):
    raw = yaml.safe_load(Path(gemma4_spec.source).read_text())
    raw["params"]["gate_up_proj"]["packing"] = "interleaved"  # valid spec, wrong for Gemma 4
    path = tmp_path / "gemma4_wrong.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["check", str(path), "--no-modelopt"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  exact-float32" in out and "checks failed" in out


@pytest.mark.arch("gemma4")
def test_check_bad_spec_is_one_line_naming_file_and_field(tmp_path, capsys, gemma4_spec):
    raw = yaml.safe_load(Path(gemma4_spec.source).read_text())
    raw["params"]["down_proj"]["axis"] = raw["params"]["down_proj"].pop("axes")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "params.down_proj" in err and "fix:" in err


@pytest.mark.arch("gemma4")
def test_check_without_golden_section_is_one_line(tmp_path, capsys, gemma4_spec):
    raw = yaml.safe_load(Path(gemma4_spec.source).read_text())
    del raw["golden"]
    path = tmp_path / "nogolden.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: golden: missing" in err and err.count("\n") == 1


def test_help_and_import_stay_free_of_torch():
    """``moe-unfuse --help`` must not pay for torch/transformers/modelopt imports (lazy package attributes)."""
    import subprocess
    import sys

    code = "import sys, moe_unfuse; from moe_unfuse.cli.main import build_parser; build_parser(); print(sorted(m for m in ('torch', 'transformers', 'modelopt') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
