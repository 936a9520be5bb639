"""Which transformers is installed, and which ones a spec was verified on.

The bottom of the version story: the spec loader asks :func:`is_drifted` (is the installed
transformers one the spec was not verified on?) and ``drift`` explains what changed. Tests that
simulate a version monkeypatch :func:`installed_version` here.
"""

from __future__ import annotations

import importlib.metadata
import sys
from functools import cache
from typing import Any


def installed_version() -> str:
    """The installed transformers version (monkeypatched by the tests that simulate a version).

    Read from the package metadata unless transformers is already imported: importing it only to
    read its version would cost ``moe-unfuse list`` most of a second.
    """
    module = sys.modules.get("transformers")
    if module is not None:
        return module.__version__
    return _metadata_version()


@cache
def _metadata_version() -> str:
    """Parsed once per process: every spec loaded asks (``list`` would parse the metadata ~150 times)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        import transformers

        return transformers.__version__


def verified_versions(raw_or_spec: Any) -> tuple[str, ...]:
    """``target.verified_on.transformers`` of a spec or of a raw spec mapping."""
    if isinstance(raw_or_spec, dict):
        return tuple(raw_or_spec.get("target", {}).get("verified_on", {}).get("transformers", ()))
    return tuple(raw_or_spec.verified_on.get("transformers", ()))


def is_verified(raw_or_spec: Any) -> bool:
    return installed_version() in verified_versions(raw_or_spec)


def is_drifted(raw_or_spec: Any) -> bool:
    """Verified on some transformers, but not on the installed one (a spec with no verified_on is
    unproven rather than drifted: its faults are plain spec errors)."""
    versions = verified_versions(raw_or_spec)
    return bool(versions) and installed_version() not in versions
