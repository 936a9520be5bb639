"""A spec named on the command line: an arch of the catalog, or a spec file (``show``, ``check``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..spec.model import Spec


def is_path(arch_or_path: str) -> bool:
    path = Path(arch_or_path)
    return path.suffix in (".yaml", ".yml") or path.is_file()


def resolve_spec(arch_or_path: str) -> Spec:
    """The spec named ``arch_or_path``, or loaded from that file (extends searched next to it and in
    the spec folders the plugins register)."""
    from ..plugins.manager import registry
    from ..spec.catalog import get_spec, load_spec

    if is_path(arch_or_path):
        dirs = tuple(dict.fromkeys(p.parent if p.is_file() else p for p in registry().spec_paths))
        return load_spec(Path(arch_or_path), dirs)
    return get_spec(arch_or_path)
