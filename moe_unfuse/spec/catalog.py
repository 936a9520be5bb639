"""The spec catalog: every spec file the plugins register, loaded once, and which specs apply to a model.

Above the spec loader (it loads the files the plugins name, with the kinds they contribute) and
below everything that needs "the specs": one place answers which specs exist (:func:`specs`), which
one an arch name, a path or a loaded spec means (:func:`spec_of`), and which apply to a model
(:func:`select_specs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..base.errors import SpecError, UnknownArchError
from ..plugins.manager import Registry, registry
from .model import Spec
from .model import load_spec as _load_file
from .yaml_reader import read_yaml

if TYPE_CHECKING:
    from torch import nn

ArchArg = str | Path | Spec | Iterable[str | Path | Spec] | None

_cache: tuple[Registry, dict[str, Spec]] | None = None


def search_dirs(reg: Registry | None = None) -> tuple[Path, ...]:
    """Folders ``extends`` resolves in: those of every registered spec path."""
    reg = reg or registry()
    return tuple(dict.fromkeys(p.parent if p.is_file() else p for p in reg.spec_paths))


def spec_files(reg: Registry | None = None) -> list[Path]:
    files: list[Path] = []
    for p in (reg or registry()).spec_paths:
        files.extend(sorted(p.glob("*.yaml")) if p.is_dir() else [p])
    return files


def specs() -> dict[str, Spec]:
    """arch -> Spec for every non-abstract spec file the plugins register; loaded once per registry."""
    global _cache
    reg = registry()
    if _cache is None or _cache[0] is not reg:
        found: dict[str, Spec] = {}
        dirs = search_dirs(reg)
        for path in spec_files(reg):
            if read_yaml(path).get("abstract"):
                continue
            spec = _load_file(path, dirs, check_import=False)
            if spec.arch in found:
                raise SpecError(
                    str(path),
                    "arch",
                    f"{spec.arch!r} is already defined by {found[spec.arch].source}",
                    "rename one of the two specs",
                )
            found[spec.arch] = spec
        _cache = (reg, dict(sorted(found.items())))
    return _cache[1]


def get_spec(arch: str) -> Spec:
    """The spec for ``arch``; :class:`UnknownArchError` lists the known ones."""
    known = specs()
    if arch not in known:
        raise UnknownArchError(arch, list(known))
    return known[arch]


def load_spec(path: str | Path, search_dirs_: tuple[Path, ...] = (), check_import: bool = True) -> Spec:
    """Load, merge and validate one spec file against the registered plugins' kinds; ``extends``
    resolves next to it, in ``search_dirs_`` and in the registered spec folders."""
    reg = registry()
    return _load_file(Path(path), tuple(dict.fromkeys((*search_dirs_, *search_dirs(reg)))), check_import)


def spec_of(arch: str | Path | Spec) -> Spec:
    """A loaded spec, an arch name, or a spec file path (``.yaml``/``.yml``, or an existing file)."""
    if isinstance(arch, Spec):
        return arch
    path = Path(arch)
    if isinstance(arch, Path) or path.suffix in (".yaml", ".yml") or path.is_file():
        return load_spec(path)
    return get_spec(arch)


def specs_for(arch: ArchArg) -> list[Spec]:
    """The specs ``arch`` names (every known spec when None)."""
    if arch is None:
        return list(specs().values())
    items = [arch] if isinstance(arch, (str, Path, Spec)) else list(arch)
    return [spec_of(a) for a in items]


def select_specs(model: nn.Module, arch: ArchArg = None) -> list[Spec]:
    """The specs (of ``arch``, or of every known spec) that match at least one module of ``model``:
    the one place a model is matched against the catalog (each module class once)."""
    candidates = specs_for(arch)
    by_class: dict[type, Any] = {type(m): m for m in model.modules()}  # models repeat few classes many times
    return [s for s in candidates if any(s.matches(m) for m in by_class.values())]
