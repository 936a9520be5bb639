"""Specs are untrusted input: hostile files end in one SpecError line, and nothing a spec names is
called (or imported from outside transformers and registered plugins) unless it is the right kind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import SPECS_DIR as SPECS
from helpers import spec_raw, write_spec

import moe_unfuse
from moe_unfuse import SpecError, load_spec
from moe_unfuse.spec.expressions import eval_shape_expr
from moe_unfuse.spec.golden_config import golden_config
from moe_unfuse.spec.limits import MAX_SPEC_BYTES
from moe_unfuse.tools import golden

pytestmark = pytest.mark.arch("gemma4")

GEMMA4 = SPECS / "gemma4.yaml"


def gemma4_raw() -> dict:
    return spec_raw("gemma4")


def load_error(path: Path, **kwargs) -> SpecError:
    with pytest.raises(SpecError) as err:
        load_spec(path, (SPECS,), **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path)) and "; fix: " in msg and len(msg) < 600, msg
    return err.value


TEXT = GEMMA4.read_text()

HOSTILE_FILES = {
    "100,000-deep flow list": (TEXT + "colour: " + "[" * 100_000 + "]" * 100_000 + "\n", "nests deeper"),
    "deep block mapping": (TEXT + "".join(f"{' ' * i}k{i}:\n" for i in range(40)) + " " * 40 + "v\n", "nests deeper"),
    "alias bomb": (
        TEXT
        + "lol:\n  a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"  b{i}: &b{i} [{', '.join(['*a' if i == 0 else f'*b{i - 1}'] * 9)}]\n" for i in range(12)),
        "anchor or alias",
    ),
    "plain anchor": (TEXT.replace("dims:", "dims: &d", 1), "anchor or alias"),
    "duplicate key": (TEXT + "arch: gemma5\n", "duplicate key 'arch'"),
    "nested duplicate key": (
        TEXT.replace("  hidden: hidden_dim", "  hidden: intermediate_dim\n  hidden: hidden_dim", 1),
        "duplicate key 'hidden'",
    ),
    "mixed-type keys": (TEXT + "colour: {1: a, b: c}\n", "is a int, not a string"),
    "bool key": (TEXT + "true: 1\n", "is a bool, not a string"),
    "non-UTF-8 bytes": (TEXT.encode() + b"description: \xff\xfe\n", "is not UTF-8"),
    "python tag": (TEXT + "colour: !!python/object/apply:os.system [echo hi]\n", "is not allowed"),
    "two documents": (TEXT + "---\narch: other\n", "more than one YAML document"),
    "huge integer": (TEXT + "colour: " + "9" * 5000 + "\n", "cannot read"),
    "over the size limit": (TEXT + "description: " + "x" * MAX_SPEC_BYTES + "\n", "byte limit"),
    "extends with ..": ("arch: x\nextends: ../specs/_standard\n", "not a spec file stem"),
    "extends an absolute path": ("arch: x\nextends: /etc/passwd\n", "not a spec file stem"),
    "extends not a string": ("arch: x\nextends: [a]\n", "must be a string"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_file_is_one_spec_error(tmp_path, case):
    data, expected = HOSTILE_FILES[case]
    err = load_error(write_spec(tmp_path, data))
    assert expected in str(err), str(err)


def test_extends_cannot_leave_the_search_path_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "_base.yaml").write_text((SPECS / "_standard.yaml").read_text())
    inside = tmp_path / "specs"
    inside.mkdir()
    os.symlink(outside / "_base.yaml", inside / "_base.yaml")
    err = load_error(write_spec(inside, "arch: x\nextends: _base\n"))
    assert err.field == "extends" and "not found" in str(err)


def test_parse_cache_sees_a_rewrite_in_the_same_mtime(tmp_path):
    path = write_spec(tmp_path, TEXT)
    stat = path.stat()
    assert load_spec(path).arch == "gemma4"
    path.write_text(TEXT.replace("arch: gemma4", "arch: gemma9"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, same size
    assert load_spec(path).arch == "gemma9"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("+".join(["1"] * 50_000), "over 200"),  # a 50,000-term expression (a RecursionError before)
        ("2*(intermediate", "syntax error"),
        ("2**intermediate", "is not allowed"),
        ("intermediate//0", "divides by zero"),
        ("__import__('os')", "is not allowed"),
        ("hiden", "unknown dim 'hiden'"),
    ],
)
def test_bad_shape_expression(tmp_path, expr, expected):
    raw = gemma4_raw()
    raw["params"]["down_proj"]["shape"][1] = expr
    err = load_error(write_spec(tmp_path, raw))
    assert err.field == "params.down_proj.shape.1" and expected in str(err), str(err)


def test_division_by_zero_at_run_time_is_an_error_not_zero():
    with pytest.raises(ValueError, match="divides by zero"):
        eval_shape_expr("hidden//(intermediate-intermediate)", {"hidden": 64, "intermediate": 40})


def edit(path: tuple, value) -> callable:
    def apply(raw: dict) -> None:
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value

    return apply


SEMANTIC = {
    "unknown glu parameter": (edit(("gate", "alpha"), 1.5), "gate.alpha", "not a parameter of gate kind 'glu'"),
    "top_k above the expert count": (
        edit(("golden", "top_k"), 5),
        "golden.top_k",
        "more than the golden config's 4 experts",
    ),
    "rename with an invalid regex": (
        edit(("export", "renames"), [{"engine": "vllm", "match": "(unclosed", "replace": "x"}]),
        "export.renames.0.match",
        "invalid regex",
    ),
    "rename for an unknown engine": (
        edit(("export", "renames"), [{"engine": "vlm", "match": "a", "replace": "b"}]),
        "export.renames.0.engine",
        "unknown engine 'vlm'",
    ),
    "rename to a missing group": (
        edit(("export", "renames"), [{"engine": "vllm", "match": "a(b)", "replace": r"\2"}]),
        "export.renames.0.replace",
        "group '2'",
    ),
    "forward args renamed": (
        edit(
            ("forward", "args"), {"x": "hidden_states", "top_k_index": "top_k_index", "top_k_weights": "top_k_weights"}
        ),
        "forward.args",
        "Gemma4TextExperts.forward takes (hidden_states",
    ),
    "forward args reordered": (
        edit(
            ("forward", "args"),
            {"top_k_index": "top_k_index", "hidden_states": "hidden_states", "top_k_weights": "top_k_weights"},
        ),
        "forward.args",
        "forward(top_k_index",
    ),
    "target os.system": (edit(("target", "class"), "os.system"), "target.class", "is not an nn.Module subclass"),
    "target subprocess.Popen": (
        edit(("target", "class"), "subprocess.Popen"),
        "target.class",
        "is not an nn.Module subclass",
    ),
    "target a transformers function": (
        edit(("target", "class"), "transformers.pipeline"),
        "target.class",
        "is not an nn.Module subclass",
    ),
    "target outside the allowed packages": (
        edit(("target", "class"), "json.tool.Experts"),
        "target.class",
        "outside what a spec may import",
    ),
    "golden.config a function": (
        edit(("golden", "config"), "builtins.eval"),
        "golden.config",
        "is not a transformers PretrainedConfig subclass",
    ),
    "golden.config not a config": (
        edit(("golden", "config"), "transformers.Gemma4ForCausalLM"),
        "golden.config",
        "is not a transformers PretrainedConfig subclass",
    ),
    "golden.model.class not a model": (
        edit(("golden", "model", "class"), "subprocess.Popen"),
        "golden.model.class",
        "is not a transformers PreTrainedModel subclass",
    ),
}


@pytest.mark.parametrize("case", list(SEMANTIC))
def test_semantic_error_at_load(tmp_path, case):
    change, field, expected = SEMANTIC[case]
    raw = gemma4_raw()
    change(raw)
    err = load_error(write_spec(tmp_path, raw))
    assert err.field == field and expected in str(err), str(err)


def test_a_module_outside_the_allowed_packages_is_not_imported(tmp_path, monkeypatch):
    """Naming a module a spec may not import fails before the import runs (its code never executes)."""
    pkg = tmp_path / "evil_spec_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import pathlib; pathlib.Path(__file__).with_name('RAN').write_text('x')\nclass Experts: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = gemma4_raw()
    raw["target"]["class"] = "evil_spec_pkg.Experts"
    for check_import in (True, False):
        err = load_error(write_spec(tmp_path, raw), check_import=check_import)
        assert "outside what a spec may import" in str(err)
    assert not (pkg / "RAN").exists() and "evil_spec_pkg" not in sys.modules


def test_golden_config_is_checked_before_it_is_called(tmp_path, monkeypatch):
    """``build_config`` (also run by ``register``'s drift check) never calls what golden.config names
    unless it is a config class, even for a Spec built without load_spec's checks."""
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    spec = moe_unfuse.get_spec("gemma4")
    bad = type(spec)(
        **{
            **{f: getattr(spec, f) for f in spec.__dataclass_fields__},
            "golden": {**spec.golden, "config": "subprocess.Popen", "config_kwargs": {"args": ["true"]}},
        }
    )
    with pytest.raises(SpecError) as err:
        golden_config(bad)
    assert "PretrainedConfig" in str(err.value) and not calls


def test_register_and_unfuse_take_a_spec_path(tmp_path):
    path = write_spec(tmp_path, gemma4_raw(), "my_gemma4.yaml")
    for arg in (str(path), path):
        assert moe_unfuse.register(arg) is not None
        module = golden.build_experts(moe_unfuse.get_spec("gemma4"))
        report = moe_unfuse.unfuse(module, arg)
        assert len(report.changed) == 1 and report.changed[0].arch == "gemma4"


def test_a_dim_read_from_a_parameter_size(tmp_path):
    raw = gemma4_raw()
    raw["dims"]["intermediate"] = {"param": "down_proj", "axis": 2}
    spec = load_spec(write_spec(tmp_path, raw))
    assert golden.check_exact(spec, golden.torch.float32).ok
    raw["dims"]["intermediate"] = {"param": "down_proj", "axis": 1}  # 64, not 40: the shape check says so
    spec = load_spec(write_spec(tmp_path, raw))
    with pytest.raises(SpecError) as err:
        moe_unfuse.unfuse(golden.build_experts(spec), spec)
    assert err.value.field == "params.gate_up_proj.shape"
    raw["dims"]["intermediate"] = {"param": "nope", "axis": 1}
    spec = load_spec(write_spec(tmp_path, raw))
    with pytest.raises(SpecError) as err:
        moe_unfuse.unfuse(golden.build_experts(spec), spec)
    assert err.value.field == "dims.intermediate.param"
