"""The specs shipped with moe_unfuse (the top-level ``specs/`` directory)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..plugin import hookimpl


def builtin_spec_dir() -> Path:
    """The installed package's ``moe_unfuse/_specs``; the checkout's ``specs/`` only where the package
    has none (an editable install or a source tree). Never a ``specs`` folder that merely happens
    to sit next to site-packages."""
    installed = Path(str(resources.files("moe_unfuse") / "_specs"))
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "specs"


@hookimpl
def register_specs(register):
    register(builtin_spec_dir())
