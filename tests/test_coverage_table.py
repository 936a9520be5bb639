"""The README coverage table is generated from the specs and must not go stale.

Fix a failure with: moe-unfuse coverage --markdown --write README.md
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

import moe_unfuse
from moe_unfuse.base import versions
from moe_unfuse.base.errors import MoeUnfuseError
from moe_unfuse.cli import main as cli
from moe_unfuse.cli.commands import coverage
from moe_unfuse.core import drift
from moe_unfuse.spec.model import Spec

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_matches_the_specs():
    text = README.read_text()
    start, end = text.find(coverage.START), text.find(coverage.END)
    assert 0 <= start < end, f"README.md lacks the {coverage.START} ... {coverage.END} section"
    current = text[start : end + len(coverage.END)]
    expected = coverage.readme_section(coverage.rows())
    assert current == expected, (
        "README.md coverage table is stale; run: moe-unfuse coverage --markdown --write README.md"
    )


def test_readme_section_does_not_depend_on_the_installed_transformers(monkeypatch):
    """CI runs the suite on two transformers releases: the section must be current on both, so it
    carries nothing of the installed one (no status column, no version, no class presence)."""
    section = coverage.readme_section(coverage.rows())
    monkeypatch.setattr(versions, "installed_version", lambda: "0.0.1")
    monkeypatch.setattr(Spec, "resolve_class", lambda self: None)
    elsewhere = coverage.rows()
    assert all(r["status"] == "class not in transformers 0.0.1" for r in elsewhere)
    assert coverage.readme_section(elsewhere) == section
    assert "| status |" not in section and "verified on |" in section


def test_status_says_where_each_spec_stands(monkeypatch):
    version = versions.installed_version()
    row = coverage.rows(["mixtral"])[0]
    assert row["status"] == f"verified on transformers {version}"
    monkeypatch.setattr(versions, "installed_version", lambda: "99.0.0")
    drift._CHECKED.clear()
    assert coverage.rows(["mixtral"])[0]["status"] == "fits transformers 99.0.0 (not verified on it)"
    drift._CHECKED.clear()


def test_write_to_a_missing_file_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "README.md"
    assert cli.main(["coverage", "--markdown", "--write", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{missing}: cannot be read (No such file or directory); fix:" in err
    assert not missing.exists()


def test_every_spec_has_a_row_with_its_class():
    rows = {r["arch"]: r for r in coverage.rows()}
    specs = moe_unfuse.list_specs()
    assert set(rows) == set(specs)
    for arch, spec in specs.items():
        assert rows[arch]["class"] == spec.class_name


@pytest.mark.parametrize(
    ("arch", "kind"),
    [
        ("mixtral", "standard"),
        ("gemma4", "standard"),
        ("beam", "own `_apply_gate`"),
        ("inkling2", "own `_apply_gate`, fp32 sum"),
        ("gpt_oss", "transposed, interleaved, bias"),
        ("nemotron_h", "non-gated"),
        ("dbrx", "flattened"),
        ("llama4", "transposed, pre grouped bmm"),
        ("muse_spark", "post-expert norm"),
    ],
)
def test_layout_kind_is_derived_from_the_spec(arch, kind):
    assert coverage.layout_kind(moe_unfuse.get_spec(arch)).startswith(kind)


def test_golden_scope_follows_the_golden_section():
    assert coverage.golden_scope(moe_unfuse.get_spec("mixtral")) == "exact, grouped/batched, modelopt, whole model"
    assert coverage.golden_scope(moe_unfuse.get_spec("inkling")) == "exact, grouped/batched, modelopt"  # no whole model
    assert coverage.golden_scope(moe_unfuse.get_spec("step3p7")) == "exact, modelopt, whole model"  # undecorated


def test_write_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n\n{coverage.START}\nold table\n{coverage.END}\n\nafter\n")
    args = Namespace(markdown=True, write=readme, run=False, no_modelopt=False, results=None, arch=None)
    assert coverage.run(args) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    assert "| mixtral | `MixtralExperts` | standard |" in text
    readme.write_text("# no markers\n")
    with pytest.raises(MoeUnfuseError, match="no <!-- coverage:start --> ... <!-- coverage:end --> section"):
        coverage.run(args)


def test_status_from_a_results_file_written_by_the_test_suite(tmp_path):
    results = tmp_path / "golden.json"
    code = pytest.main(
        [
            "-q",
            "-p",
            "moe_unfuse.tools.golden_results",
            "--golden-results",
            str(results),
            "--arch",
            "mixtral",
            "-k",
            "refuse",
            str(Path(__file__).with_name("test_golden.py")),
        ]
    )
    assert code == 0
    data = json.loads(results.read_text())
    assert data["archs"]["mixtral"] == {"passed": 1, "failed": [], "skipped": 0}
    rows = {r["arch"]: r for r in coverage.rows(results=data)}
    assert rows["mixtral"]["status"] == "pass (1 tests)"
    assert rows["qwen3_moe"]["status"] == "not run"
    data["archs"]["mixtral"]["failed"] = ["test_refuse_restores_bit_exact[mixtral]"]
    assert coverage.rows(["mixtral"], results=data)[0]["status"].startswith("FAIL (1: test_refuse")


def test_run_status_runs_the_golden_checks():
    (row,) = coverage.rows(["lfm2_moe"], run=True, modelopt=False)
    assert row["status"].startswith("pass (") and row["status"].endswith(" checks)")
