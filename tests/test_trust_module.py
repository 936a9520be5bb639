"""A spec for a class in the user's own module: refused unless the user consents with
``--trust-module`` / ``trust_modules=`` (as ``trust_remote_code``), never because the spec says so."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from helpers import spec_raw, write_spec

import moe_unfuse
from moe_unfuse import SpecError
from moe_unfuse.cli.main import main

pytestmark = [pytest.mark.arch("mixtral"), pytest.mark.usefixtures("one_thread")]

MODULE_CODE = '''"""A user's own experts class: a copy-subclass of the transformers one (a model not in transformers yet)."""
from transformers.models.mixtral.modeling_mixtral import MixtralExperts


class MyExperts(MixtralExperts):
    pass
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh module (a name no test imported before) on sys.path, forgotten again afterwards."""
    name = f"mymodels_{uuid.uuid4().hex[:12]}"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{name}.py").write_text(MODULE_CODE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield name
    sys.modules.pop(name, None)


def user_spec(directory: Path, module: str, **extra: object) -> Path:
    """The Mixtral spec retargeted at ``module.MyExperts`` (its golden experts config is Mixtral's)."""

    def edit(raw: dict) -> None:
        raw["arch"] = "my_mixtral"
        raw["target"]["class"] = f"{module}.MyExperts"
        raw["golden"].pop("model")  # a new model: its experts are checked, there is no whole transformers model
        raw.update(extra)

    return write_spec(directory, spec_raw("mixtral", edit), "my_mixtral.yaml")


def test_check_passes_with_trust_module_and_refuses_without(
    user_module: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = user_spec(tmp_path, user_module)
    assert main(["check", str(spec), "--no-modelopt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is outside what a spec may import" in err and "--trust-module" in err, err
    assert user_module not in sys.modules  # refused before it was imported
    assert main(["check", str(spec), "--no-modelopt", "--trust-module", user_module]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert f"spec ok: my_mixtral -> {user_module}.MyExperts" in out and "checks passed" in out


def test_a_parent_package_name_trusts_its_submodules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pkg = f"mypkg_{uuid.uuid4().hex[:12]}"
    (tmp_path / "src" / pkg / "models").mkdir(parents=True)
    (tmp_path / "src" / pkg / "__init__.py").write_text("")
    (tmp_path / "src" / pkg / "models" / "__init__.py").write_text("")
    (tmp_path / "src" / pkg / "models" / "experts.py").write_text(MODULE_CODE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    try:
        spec = user_spec(tmp_path, f"{pkg}.models.experts")
        assert main(["check", str(spec), "--no-modelopt", "--trust-module", f"{pkg}.other"]) == 2
        assert "is outside what a spec may import" in capsys.readouterr().err
        assert main(["check", str(spec), "--no-modelopt", "--trust-module", pkg]) == 0
    finally:
        for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
            sys.modules.pop(name)


def test_register_takes_trust_modules(user_module: str, tmp_path: Path) -> None:
    spec = user_spec(tmp_path, user_module)
    with pytest.raises(SpecError, match="is outside what a spec may import"):
        moe_unfuse.register(spec)
    cls = moe_unfuse.register(spec, trust_modules=[user_module])
    assert cls is not None and user_module in sys.modules
    assert sys.modules[user_module].MyExperts.__name__ == "MyExperts"


def test_a_spec_cannot_trust_itself(user_module: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = user_spec(tmp_path, user_module, trust_modules=[user_module])
    assert main(["check", str(spec), "--no-modelopt"]) == 2
    assert user_module not in sys.modules and "trust_modules" in capsys.readouterr().err


def test_trust_module_must_be_a_module_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "mixtral", "--no-modelopt", "--trust-module", "../evil"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a module name" in err and "fix:" in err
    with pytest.raises(moe_unfuse.MoeUnfuseError, match="is not a module name"):
        with moe_unfuse.trusted_modules(["os; rm"]):
            pass
