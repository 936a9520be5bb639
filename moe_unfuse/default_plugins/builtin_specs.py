"""The specs shipped with moe_unfuse (the top-level ``specs/`` directory)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..hookspecs import hookimpl


def builtin_spec_dir() -> Path:
    """``specs/`` in a source checkout; ``moe_unfuse/_specs`` (the same files) in an installed wheel."""
    source = Path(__file__).resolve().parents[2] / "specs"
    if source.is_dir():
        return source
    return Path(str(resources.files("moe_unfuse") / "_specs"))


@hookimpl
def register_specs(register):
    register(builtin_spec_dir())
