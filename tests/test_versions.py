"""Specs across transformers versions: where each spec stands (``drift.status``, ``moe-unfuse list``),
class presence decided without importing, and list/show staying light.

The suite runs on the pinned versions (constraints.txt) and on the newest (constraints-latest.txt);
nothing here assumes which one is installed: other versions are simulated by monkeypatching
``drift.installed_version``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, SPECS_DIR, spec_names, spec_raw, spec_variant

import moe_unfuse
from moe_unfuse.base import versions
from moe_unfuse.cli import main as cli
from moe_unfuse.cli.commands import list as list_command
from moe_unfuse.core import drift
from moe_unfuse.spec import catalog

VERIFIED = "1.2.3"
FUTURE = "99.0.0"
#: Fused-experts classes that first appear in transformers 5.24.0.
NEW_IN_5_24 = {"hy_v4_vl": "HYV4VLExperts", "inkling2_loop": "Inkling2LoopExperts", "lara_mini": "LaraMiniExperts"}


def ci_versions() -> set[str]:
    """The transformers versions CI runs the suite on: the pins of the constraints files."""
    pins = set()
    for name in ("constraints.txt", "constraints-latest.txt"):
        pins.update(re.findall(r"^transformers==(\S+)$", (ROOT / name).read_text(), re.MULTILINE))
    return pins


@pytest.fixture
def clean_cache():
    drift._CHECKED.clear()
    yield
    drift._CHECKED.clear()


def mixtral_like(target: str | None = None, verified_on: list[str] | None = None, edit=None) -> moe_unfuse.Spec:
    def simulate(raw: dict) -> None:
        if target:
            raw["target"]["class"] = target
        if verified_on is None:
            raw["target"].pop("verified_on", None)
        else:
            raw["target"]["verified_on"] = {"transformers": verified_on}
        if edit:
            edit(raw)

    return spec_variant("mixtral", simulate, "specs/simulated.yaml")


def test_both_ci_versions_are_pinned():
    assert len(ci_versions()) == 2, "constraints.txt and constraints-latest.txt each pin one transformers"


def test_every_spec_is_verified_on_the_ci_version_it_runs_on():
    """On a version CI tests, a spec whose class exists must list it: its golden test runs there."""
    version = versions.installed_version()
    if version not in ci_versions():
        pytest.skip(f"transformers {version} is not one CI pins")
    unlisted = [
        arch
        for arch, spec in moe_unfuse.list_specs().items()
        if drift.class_present(spec.target_class) and version not in versions.verified_versions(spec)
    ]
    assert not unlisted, (
        f"add {version} to target.verified_on of: {', '.join(unlisted)} (after their golden tests pass on it)"
    )


@pytest.mark.parametrize("arch", sorted(NEW_IN_5_24))
def test_the_5_24_specs_load_everywhere_and_are_missing_or_verified(arch):
    spec = moe_unfuse.get_spec(arch)
    assert spec.class_name == NEW_IN_5_24[arch] and versions.verified_versions(spec) == ("5.24.0",)
    present = spec.resolve_class() is not None
    assert drift.class_present(spec.target_class) is present
    assert drift.status(spec) == (
        drift.VERIFIED if versions.installed_version() == "5.24.0" else drift.MISSING if not present else drift.FITS
    )


def test_class_presence_from_source_agrees_with_importing():
    specs = moe_unfuse.list_specs().values()
    assert {s.arch: drift.class_present(s.target_class) for s in specs} == {
        s.arch: s.resolve_class() is not None for s in specs
    }
    gemma = moe_unfuse.get_spec("gemma4").target_class
    assert not drift.class_present(gemma.replace("Gemma4TextExperts", "Gemma9Experts"))
    assert not drift.class_present("transformers.models.no_such_model.modeling_no_such_model.NoSuchExperts")
    assert not drift.class_present("moe_unfuse_no_such_package.modeling.Experts")


def test_class_presence_imports_no_modeling_file():
    code = (
        "import sys; from moe_unfuse.core import drift; from moe_unfuse.base import versions\n"
        "assert drift.class_present('transformers.models.mixtral.modeling_mixtral.MixtralExperts')\n"
        "assert not drift.class_present('transformers.models.no_such_model.modeling_no_such_model.X')\n"
        "assert versions.installed_version()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_status_verified_fits_drifted_unproven_missing(monkeypatch, clean_cache):
    monkeypatch.setattr(versions, "installed_version", lambda: VERIFIED)
    assert drift.status(mixtral_like(verified_on=[VERIFIED])) == drift.VERIFIED
    monkeypatch.setattr(versions, "installed_version", lambda: FUTURE)
    assert drift.status(mixtral_like(verified_on=[VERIFIED])) == drift.FITS
    transposed = mixtral_like(
        verified_on=[VERIFIED],
        edit=lambda r: r["params"]["gate_up_proj"].update(
            axes=["expert", "in", "out"], shape=["num_experts", "hidden", "2*intermediate"]
        ),
    )
    assert drift.status(transposed) == drift.DRIFTED
    assert drift.status(mixtral_like(verified_on=None)) == drift.UNPROVEN
    gone = mixtral_like(
        "transformers.models.no_such_model.modeling_no_such_model.NoSuchExperts", verified_on=[VERIFIED]
    )
    assert drift.status(gone) == drift.MISSING


def test_list_shows_each_status(monkeypatch, capsys, clean_cache):
    specs = {
        "fitting": mixtral_like(verified_on=[VERIFIED]),
        "reshaped": mixtral_like(
            verified_on=[VERIFIED],
            edit=lambda r: r["params"]["gate_up_proj"].update(
                axes=["expert", "in", "out"], shape=["num_experts", "hidden", "2*intermediate"]
            ),
        ),
        "draft": mixtral_like(verified_on=None),
        "gone": mixtral_like(
            "transformers.models.no_such_model.modeling_no_such_model.NoSuchExperts", verified_on=[VERIFIED]
        ),
    }
    specs = {arch: spec.__class__(**{**spec.__dict__, "arch": arch}) for arch, spec in specs.items()}
    monkeypatch.setattr(catalog, "specs", lambda: specs)
    monkeypatch.setattr(versions, "installed_version", lambda: FUTURE)
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["arch", "transformers", FUTURE]
    assert {line.split()[0]: line.split()[1] for line in lines[1:-1]} == {
        "fitting": "fits",
        "reshaped": "DRIFTED",
        "draft": "unproven",
        "gone": "NO",
    }
    assert lines[-1].startswith(f"4 specs on transformers {FUTURE}: 0 yes (verified on it), 1 fits")
    assert cli.main(["list", "--json"]) == 0
    rows = {r["arch"]: r for r in json.loads(capsys.readouterr().out)}
    assert {a: r["status"] for a, r in rows.items()} == {
        "fitting": "fits",
        "reshaped": "drifted",
        "draft": "unproven",
        "gone": "missing",
    }
    assert rows["gone"]["available"] is False and rows["fitting"]["verified_on"] == {"transformers": [VERIFIED]}


def test_spec_names_are_the_registry_archs():
    """The cheap reading the tests parametrize with (file names, merged mappings: no Spec at import)
    gives the registry's built-in archs and mappings."""
    registry = {arch: spec for arch, spec in moe_unfuse.list_specs().items() if Path(spec.source).parent == SPECS_DIR}
    assert spec_names() == list(registry)
    assert all(spec_raw(arch) == dict(spec.raw) for arch, spec in registry.items())


def run_cli(*args: str) -> tuple[str, list[str]]:
    """Run the CLI in a fresh interpreter; (stdout, the torch/transformers modules it imported)."""
    code = (
        "import sys, io, contextlib; from moe_unfuse.cli import main as cli\n"
        "out = io.StringIO()\n"
        f"with contextlib.redirect_stdout(out): code = cli.main({list(args)!r})\n"
        "assert code == 0, code\n"
        "sys.stdout.write(out.getvalue()); sys.stderr.write(repr(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return done.stdout, eval(done.stderr.strip().splitlines()[-1])


def test_list_and_show_import_neither_torch_nor_transformers():
    """Why they answer in a fraction of a second: the plugins register without importing torch or
    transformers (seconds), specs load without importing their classes, and class presence is read
    from the modeling sources."""
    from importlib.metadata import entry_points

    if entry_points(group="moe_unfuse"):
        pytest.skip("an installed moe_unfuse plugin may contribute specs: list and show load the full registry")
    out, imported = run_cli("list", "--json")
    assert imported == []
    in_process = list_command.spec_rows()
    assert json.loads(out) == in_process
    out, imported = run_cli("show", "gemma4")
    assert imported == []
    assert out.startswith(f"# gemma4: resolved from {moe_unfuse.get_spec('gemma4').source}\n")
