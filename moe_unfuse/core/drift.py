"""Version drift: a spec verified on some transformers versions, used with another one.

Specs record ``target.verified_on.transformers``. When the installed version is listed, a spec is
trusted as is. Otherwise it is checked against the installed class before it is used (``unfuse``,
``register``, the golden checks, ``moe-unfuse check``): the class still exists, its undecorated
forward still takes the arguments the spec maps (same names, same order), and a module built on
the meta device from the spec's golden config still has every fused parameter with the declared
axes and shape (the validation ``unfuse`` itself runs). What changed comes back as one
:class:`DriftError` line naming the spec, the field and the fix, never as a traceback from deep
inside a forward. A spec that still fits simply works. A spec without ``verified_on`` (a fresh
draft) is unproven rather than drifted: its faults are the plain one-line SpecErrors.

:func:`status` names where a spec stands on the installed transformers (``moe-unfuse list``):
verified, fits (not verified on it, but the drift check passes), drifted, unproven, or missing
(its class is not in the installed transformers). :func:`moe_unfuse.base.versions.installed_version` and
:func:`class_present` answer without importing transformers when they can, so listing specs stays
fast.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from ..base import versions
from ..base.errors import SpecError, first_line
from ..base.modules import module_source
from ..spec.golden_config import golden_experts
from ..spec.model import Spec

if TYPE_CHECKING:
    from torch import nn


class DriftError(SpecError):
    """The installed transformers is not one the spec was verified on, and the spec no longer fits its class there."""


@dataclass(frozen=True)
class Problem:
    """One thing that no longer fits: the spec field it concerns and what the installed class has."""

    field: str
    problem: str


def _context(spec: Spec, problem: Problem) -> str:
    # The spec is what does not fit: the class is simply what the installed transformers has (or
    # lacks: a spec for a newer release, on an older one).
    verified = ", ".join(versions.verified_versions(spec))
    what = (
        f"has no {spec.class_name}"
        if problem.field == "target.class"
        else f"the spec does not fit its {spec.class_name}"
    )
    return f"transformers {versions.installed_version()} is not in target.verified_on ({verified}) and {what}"


def _fix(spec: Spec, problem: Problem) -> str:
    verified = versions.verified_versions(spec)
    pin = f"install transformers=={verified[-1]}" if verified else ""
    if problem.field == "target.class" and pin:
        return f"{pin}, which has the class, or point target.class at the installed class and prove it with `moe-unfuse check {spec.source}`"
    return f"update the spec to the installed class and prove it with `moe-unfuse check {spec.source}`" + (
        f", or {pin}" if pin else ""
    )


def _error(spec: Spec, problem: Problem) -> DriftError:
    return DriftError(spec.source, problem.field, f"{_context(spec, problem)}: {problem.problem}", _fix(spec, problem))


def _resolve(spec: Spec) -> tuple[type | None, Problem | None]:
    module, _, name = spec.target_class.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return None, Problem("target.class", f"no module {module} ({exc.__class__.__name__})")
    cls = getattr(mod, name, None)
    if not inspect.isclass(cls):
        return None, Problem("target.class", f"{module} has no class {name!r}")
    return cls, None


def forward_problem(spec: Spec, cls: type) -> Problem | None:
    """The forward's parameters must start with the names ``forward.args`` maps, in that order."""
    expected = [name for name, _ in spec.forward_args]
    fn = inspect.unwrap(cls.forward)
    try:
        params = [p for p in inspect.signature(fn).parameters.values()][1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    names = [p.name for p in params]
    if names[: len(expected)] != expected:
        return Problem("forward.args", f"forward({', '.join(expected)}) is now forward({', '.join(names)})")
    return None


def _meta_module(spec: Spec, cls: type) -> tuple[nn.Module | None, Problem | None]:
    """The experts module built on the meta device from the golden config (no memory, no init)."""
    import torch

    try:
        with torch.device("meta"):
            return golden_experts(spec, cls), None
    except Exception as exc:  # noqa: BLE001 - any failure here is what changed; report it on one line
        first = first_line(exc)
        return None, Problem(
            "golden.config_kwargs",
            f"{spec.class_name} no longer builds from the golden config ({exc.__class__.__name__}: {first})",
        )


def problems(spec: Spec, module: nn.Module | None = None) -> list[Problem]:
    """Everything about ``spec`` that the installed class no longer fits (empty: it still fits).

    ``module``: an instance to check the parameters of; default a meta-device build from the
    spec's golden config (parameters are created in ``__init__``, so the class alone cannot tell).
    """
    from .plan import build_plan  # torch: imported on use, so `list` and `show` stay light

    cls, missing = _resolve(spec)
    if missing:
        return [missing]
    found: list[Problem] = []
    fwd = forward_problem(spec, cls)
    if fwd:
        found.append(fwd)
    if module is None and spec.golden:
        module, failed = _meta_module(spec, cls)
        if failed:
            found.append(failed)
    if module is not None:
        try:
            build_plan(module, spec)
        except SpecError as exc:
            found.append(Problem(exc.field, exc.problem))
        except Exception as exc:  # noqa: BLE001 - planning crashed on the changed class: that is the drift
            first = first_line(exc)
            found.append(Problem("params", f"planning {spec.class_name} failed ({exc.__class__.__name__}: {first})"))
    return found


_CHECKED: dict[tuple[str, str, str], tuple[Problem, ...]] = {}  # (source, version, content) -> problems


def _cached_problems(spec: Spec) -> tuple[Problem, ...]:
    # Keyed by content, not just the source: two specs from one file (edited in between, or
    # variants built in memory) are different specs.
    key = (
        spec.source,
        versions.installed_version(),
        json.dumps(dict(spec.raw), sort_keys=True, default=str) if spec.raw else repr(spec),
    )
    if key not in _CHECKED:
        _CHECKED[key] = tuple(problems(spec))
    return _CHECKED[key]


def check(spec: Spec) -> None:
    """Raise :class:`DriftError` when ``spec`` is drifted (verified on other transformers versions
    than the installed one) and no longer fits the installed class; a no-op otherwise. Cached per
    spec and version."""
    if not versions.is_drifted(spec):
        return
    found = _cached_problems(spec)
    if found:
        raise _error(spec, found[0])


VERIFIED, FITS, DRIFTED, UNPROVEN, MISSING = "verified", "fits", "drifted", "unproven", "missing"


def status(spec: Spec, present: bool | None = None) -> str:
    """Where ``spec`` stands on the installed transformers: :data:`MISSING` (its class is not
    there), :data:`VERIFIED` (the version is in ``verified_on``), :data:`UNPROVEN` (no
    ``verified_on``: a draft), else :data:`FITS` or :data:`DRIFTED` by the drift check (which
    imports the class; the other answers do not). ``present``: class presence, when known."""
    if present is None:
        present = class_present(spec.target_class)
    if not present:
        return MISSING
    if versions.is_verified(spec):
        return VERIFIED
    if not versions.verified_versions(spec):
        return UNPROVEN
    return DRIFTED if _cached_problems(spec) else FITS


_CLASS_LINE = "^class {}\\b"


def class_present(target_class: str) -> bool:
    """Whether the installed packages define ``target_class`` (a dotted path).

    Decided from the module's source when that is certain (the file defines ``class NAME``, or the
    module does not exist), so listing ~75 specs imports no modeling file; otherwise by importing.
    """
    module, _, name = target_class.rpartition(".")
    source = module_source(module)
    if source is False:
        return False
    if source is not None:
        try:
            if re.search(_CLASS_LINE.format(re.escape(name)), source.read_text(encoding="utf-8"), re.MULTILINE):
                return True
        except (OSError, UnicodeDecodeError):
            pass
    try:
        return inspect.isclass(getattr(importlib.import_module(module), name, None))
    except ImportError:
        return False


@contextmanager
def explained(spec: Spec, module: nn.Module) -> Iterator[None]:
    """Around planning one module: on a drifted spec, a changed forward or a :class:`SpecError`
    from the module's parameters is reported as drift (what changed, and how to fix it)."""
    if not versions.is_drifted(spec):
        yield
        return
    fwd = forward_problem(spec, type(module))
    if fwd:
        raise _error(spec, fwd)
    try:
        yield
    except DriftError:
        raise
    except SpecError as exc:
        raise _error(spec, Problem(exc.field, exc.problem)) from None
