"""Plain helpers the test modules share: what parametrization needs at import time (spec names, raw
mappings, the decorated classes of the installed transformers), read cheaply and without building a
single ``Spec``, plus the spec-variant builders behind the ``mutated_spec`` fixture (conftest.py).

Spec objects are obtained inside tests and fixtures only: a spec that fails to load then fails the
tests that use it, instead of breaking the collection of a whole file, and ``--arch``/``-k`` runs do
not pay for loading every spec.
"""

from __future__ import annotations

import ast
import copy
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest
import yaml

from moe_unfuse.base import versions

if TYPE_CHECKING:
    import moe_unfuse

ROOT = Path(__file__).resolve().parents[1]
#: The built-in specs (``moe_unfuse``'s registry reads the same folder in a source checkout).
SPECS_DIR = ROOT / "specs"

Edit = Callable[[dict], Any]
#: A subprocess still running after this long is hung, not slow: the only timeout a test may use, a
#: hang detector far beyond any machine's normal (a loaded CI machine runs several times slower).
HANG_S = 1800


def spec_names() -> list[str]:
    """Every built-in arch, from the file names alone (a spec file is named after its arch; files
    starting with ``_`` are abstract bases). ``test_spec_names_are_the_registry_archs`` keeps this
    in step with the registry."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml") if not p.stem.startswith("_"))


@lru_cache(maxsize=None)
def _merged(arch: str) -> dict:
    from moe_unfuse.spec.extends import merged_raw

    return merged_raw(SPECS_DIR / f"{arch}.yaml", (SPECS_DIR,))


def spec_raw(arch: str, edit: Edit | None = None) -> dict:
    """A private copy of the built-in ``arch`` spec's merged mapping (``extends`` resolved, not
    validated: a YAML read, no ``Spec``), with ``edit`` applied to it in place when given."""
    raw = copy.deepcopy(_merged(arch))
    if edit is not None:
        edit(raw)
    return raw


def spec_variant(arch: str, edit: Edit | None = None, source: str | None = None) -> moe_unfuse.Spec:
    """The built-in ``arch`` spec with ``edit`` applied, parsed in memory as if read from ``source``."""
    from moe_unfuse.spec.model import parse

    return parse(spec_raw(arch, edit), source or f"{arch}-variant.yaml")


def write_spec(directory: Path, data: dict | str | bytes, name: str = "broken.yaml") -> Path:
    """``data`` (a mapping, dumped in key order, or the file's exact text or bytes) as ``directory/name``."""
    path = directory / name
    if isinstance(data, dict):
        data = yaml.safe_dump(data, sort_keys=False)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def arch_param(*archs: str, id: str | None = None) -> Any:
    """A test parameter (the tuple ``archs``) marked for every arch it exercises, skipped when one has no spec."""
    missing = [a for a in archs if a not in spec_names()]
    marks = [pytest.mark.arch(a) for a in archs]
    if missing:
        marks.append(pytest.mark.skip(reason=f"no spec for {', '.join(missing)}"))
    return pytest.param(archs, marks=marks, id=id or archs[0])


def not_installed_reason(spec: moe_unfuse.Spec) -> str:
    """Why a spec's tests cannot run here: its class is not in the installed transformers (a spec for
    a newer or an older release; ``target.verified_on`` says which)."""
    verified = ", ".join(spec.verified_on.get("transformers", ())) or "none"
    return f"{spec.class_name} is not in the installed transformers {versions.installed_version()} (verified on: {verified})"


def installed_spec(arch: str) -> moe_unfuse.Spec:
    """The built-in ``arch`` spec; the calling test is skipped (saying why) when its class is not installed."""
    import moe_unfuse

    spec = moe_unfuse.get_spec(arch)
    if spec.resolve_class() is None:
        pytest.skip(not_installed_reason(spec))
    return spec


DECORATOR = "use_experts_implementation"


def _decorator_name(node: ast.expr) -> str | None:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute):
        return target.attr
    return target.id if isinstance(target, ast.Name) else None


@lru_cache(maxsize=None)
def decorated_classes() -> tuple[str, ...]:
    """Import paths of every class the installed transformers decorates with
    ``use_experts_implementation`` (bare or called with arguments): its modeling sources parsed,
    nothing imported, so the scan takes about a second instead of importing ~70 modeling files."""
    import transformers

    found = []
    for f in sorted((Path(transformers.__file__).parent / "models").glob("*/modeling_*.py")):
        text = f.read_text(encoding="utf-8")
        if DECORATOR not in text:
            continue
        for node in ast.parse(text).body:
            if isinstance(node, ast.ClassDef) and any(_decorator_name(d) == DECORATOR for d in node.decorator_list):
                found.append(f"transformers.models.{f.parent.name}.{f.stem}.{node.name}")
    return tuple(found)


def save_tiny(arch: str, path: Path) -> Path:
    """``arch``'s whole tiny model (the built-in one for gemma4) and the byte tokenizer, saved as a model
    folder with config.json as the hub has it (:func:`moe_unfuse.hub.tiny.save_tiny_model`)."""
    import moe_unfuse
    from moe_unfuse.hub.tiny import save_hub_style, save_tiny_model, tiny_gemma4

    return save_hub_style(tiny_gemma4(), path) if arch == "gemma4" else save_tiny_model(moe_unfuse.get_spec(arch), path)


def checkpoint_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of a checkpoint folder's safetensors files, by name."""
    from moe_unfuse.hub.checkpoint import read_tensors

    return read_tensors(path)


def tensor_bits(t: Any) -> Any:
    """A tensor's bytes, to compare bit for bit (NaNs and -0.0 included)."""
    return t.contiguous().reshape(-1).view(__import__("torch").uint8)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Two checkpoint folders hold the same tensors bit for bit and the same configs and ``moe_unfuse.json``."""
    import json

    import torch

    bits = tensor_bits
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert set(ta) == set(tb)
    differ = [
        k
        for k in ta
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(bits(ta[k]), bits(tb[k]))
    ]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"
    for name in ("hf_quant_config.json", "config.json", "moe_unfuse.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


def killed_at(point: str, args: list[str]) -> None:
    """Run ``moe-unfuse ARGS`` in a forked child that SIGKILLs itself at ``point`` (the test hook
    ``MOE_UNFUSE_TEST_SIGKILL``: no interpreter start-up, nothing timed); it must die there."""
    import os
    import signal

    from moe_unfuse.cli.main import main
    from moe_unfuse.quant.resume import KILL_ENV

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            os.environ[KILL_ENV] = point
            code = main(args)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point}: {status}"


def same_files(a: Path, b: Path) -> None:
    """Two folders hold the same file names with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()] == []
