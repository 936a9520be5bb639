"""``extends``: find a spec's base files in the spec search path and merge the chain, base first.

Kept apart from the YAML reader because it resolves names to files (no paths, no cycles, a bounded
chain), which is its own untrusted-input check.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping

from ..base.errors import SpecError
from .limits import MAX_EXTENDS, clip
from .yaml_reader import read_yaml


def _deep_merge(base: dict, over: Mapping) -> dict:
    """``over`` on top of ``base``; a ``null`` in ``over`` removes the base's key (as in JSON Merge Patch)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_EXTENDS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _find_base(path: Path, parent: Any, search_dirs: tuple[Path, ...]) -> Path:
    """The file ``extends: parent`` names: a bare file stem, looked up only in the spec search path."""
    if not isinstance(parent, str):
        raise SpecError(str(path), "extends", "must be a string", "name a base spec file stem, e.g. _standard")
    if not _EXTENDS_NAME.fullmatch(parent):
        raise SpecError(
            str(path),
            "extends",
            f"{clip(parent, 60)!r} is not a spec file stem (no paths, no '..')",
            "name a base spec in the same folder or the built-in specs, e.g. _standard",
        )
    for d in (path.parent, *search_dirs):
        candidate = d / f"{parent}.yaml"
        if candidate.is_file() and candidate.resolve().parent == d.resolve():
            return candidate
    raise SpecError(
        str(path), "extends", f"base spec {parent!r} not found next to the file", f"add {parent}.yaml or fix the name"
    )


def merged_raw(path: Path, search_dirs: tuple[Path, ...] = ()) -> dict:
    """The spec mapping with its ``extends`` chain merged in (base first)."""
    chain = [(path, read_yaml(path))]
    seen = {path.stem}
    while "extends" in chain[-1][1]:
        here, data = chain[-1]
        parent = data["extends"]
        base = _find_base(here, parent, search_dirs)
        if parent in seen:
            raise SpecError(str(here), "extends", f"cycle through {parent!r}", "remove the circular extends")
        if len(chain) > MAX_EXTENDS:
            raise SpecError(
                str(path), "extends", f"chain longer than {MAX_EXTENDS} files", "extend a base spec directly"
            )
        seen.add(parent)
        chain.append((base, read_yaml(base)))
    merged = chain[-1][1]
    for _, data in reversed(chain[:-1]):
        merged.pop("abstract", None)
        merged = _deep_merge(merged, {k: v for k, v in data.items() if k != "extends"})
    merged.pop("extends", None)
    return merged
