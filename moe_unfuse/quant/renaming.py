"""A spec's ``export.renames`` for the target engine (none ship today): compiled once, applied to
the exported keys and to the exclude list alike."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from ..spec.model import Spec


def engine_renames(specs: Iterable[Spec], engine: str) -> list[tuple[re.Pattern, str]]:
    """The ``export.renames`` of ``specs`` that apply to ``engine``, compiled, in spec order."""
    out = []
    for spec in specs:
        for r in spec.renames:
            if r.get("engine") in (engine, "*", None):
                out.append((re.compile(r["match"]), r["replace"]))
    return out


def rename_key(key: str, renames: Sequence[tuple[re.Pattern, str]]) -> str:
    for pattern, replace in renames:
        key = pattern.sub(replace, key)
    return key


def rename_module(name: str, renames: Sequence[tuple[re.Pattern, str]]) -> str:
    """A module name (or an ``exclude_modules`` pattern) renamed as its keys are: renames match
    ``.experts.{E}.`` with a trailing dot, which a module name ``...experts.3`` lacks."""
    return rename_key(name + ".", renames)[:-1]
