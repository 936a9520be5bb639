"""``register``: hook a spec's experts class into a quantizer backend, with the coverage check that
makes a skipped fused expert loud. Above the catalog, drift and coverage; below quantize and golden."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from torch import nn

from ..base.errors import MoeUnfuseError
from ..plugins.manager import registry
from ..spec.catalog import spec_of
from ..spec.imports import trusted_modules
from ..spec.model import Spec
from . import drift
from .coverage import check_coverage

#: Specs registered per backend in this process: ``register(..., model=)`` checks coverage against all of them.
_REGISTERED: dict[str, dict[str, Spec]] = {}


def register(
    arch: str | Spec | Path,
    backend: str = "modelopt",
    model: nn.Module | None = None,
    allow_uncovered: bool = False,
    trust_modules: Iterable[str] = (),
) -> type:
    """Register ``arch``'s experts class with a quantizer backend (modelopt by default), so that a
    following ``mtq.quantize`` converts every expert into per-expert quantized linears.
    ``arch`` may also be a loaded :class:`Spec` or a spec file path. Registering twice is harmless;
    registering an edited spec for the same class replaces the earlier one.

    With ``model``, raises :class:`UncoveredExpertsError` naming the fused expert parameters of
    ``model`` that no spec registered with this backend so far (this one included) covers, since
    the quantizer would skip them silently; ``allow_uncovered=True`` accepts that knowingly.

    ``trust_modules``: modules of your own (and their submodules) a spec file may import its classes
    from, e.g. ``["mymodels"]`` for a model not in transformers (see :func:`moe_unfuse.spec.imports.trusted_modules`).
    """
    with trusted_modules(trust_modules):  # later uses find the class imported: no consent needed again
        return _register(arch, backend, model, allow_uncovered)


def _register(arch: str | Spec | Path, backend: str, model: nn.Module | None, allow_uncovered: bool) -> type:
    spec = spec_of(arch)
    drift.check(spec)  # on a transformers not in verified_on: fail here, in one line, if the class changed
    backends = registry().backends
    if backend not in backends:
        raise MoeUnfuseError(
            f"unknown backend {backend!r}; known: {', '.join(backends)}; fix: install the plugin that provides it"
        )
    cls = backends[backend].register(spec)
    registered = _REGISTERED.setdefault(backend, {})
    registered[spec.arch] = spec
    if model is not None:
        check_coverage(model, list(registered.values()), allow_uncovered)
    return cls
