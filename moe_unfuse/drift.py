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
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from .errors import SpecError

if TYPE_CHECKING:
    from torch import nn

    from .spec import Spec


class DriftError(SpecError):
    """The installed transformers is not one the spec was verified on, and the class changed."""


@dataclass(frozen=True)
class Problem:
    """One thing that no longer fits: the spec field it concerns and what the installed class has."""

    field: str
    problem: str


def installed_version() -> str:
    """The installed transformers version (monkeypatched by the drift tests)."""
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


def _context(spec: Spec) -> str:
    verified = ", ".join(verified_versions(spec))
    return f"transformers {installed_version()} is not in target.verified_on ({verified}) and {spec.class_name} changed"


def _fix(spec: Spec) -> str:
    verified = verified_versions(spec)
    pin = f", or install transformers=={verified[-1]}" if verified else ""
    return f"update the spec to the installed class and prove it with `moe-unfuse check {spec.source}`{pin}"


def _error(spec: Spec, problem: Problem) -> DriftError:
    return DriftError(spec.source, problem.field, f"{_context(spec)}: {problem.problem}", _fix(spec))


def _resolve(spec: Spec) -> tuple[type | None, Problem | None]:
    module, _, name = spec.target_class.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return None, Problem("target.class", f"module {module} is gone ({exc.__class__.__name__})")
    cls = getattr(mod, name, None)
    if not inspect.isclass(cls):
        return None, Problem("target.class", f"{module} has no class {name!r} any more")
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

    from .golden import build_config

    golden = spec.golden or {}
    try:
        config = build_config(spec)
        arg = getattr(config, golden["config_attr"]) if golden.get("config_attr") else config
        args = (arg,) if golden.get("config_arg", True) else ()
        with torch.device("meta"):
            return cls(*args, **golden.get("module_kwargs", {})), None
    except Exception as exc:  # noqa: BLE001 - any failure here is what changed; report it on one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, Problem("golden.config_kwargs", f"{spec.class_name} no longer builds from the golden config ({exc.__class__.__name__}: {first})")


def problems(spec: Spec, module: nn.Module | None = None) -> list[Problem]:
    """Everything about ``spec`` that the installed class no longer fits (empty: it still fits).

    ``module``: an instance to check the parameters of; default a meta-device build from the
    spec's golden config (parameters are created in ``__init__``, so the class alone cannot tell).
    """
    from .unfusing import build_plan

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
            first = str(exc).splitlines()[0] if str(exc) else ""
            found.append(Problem("params", f"planning {spec.class_name} failed ({exc.__class__.__name__}: {first})"))
    return found


_CHECKED: dict[tuple[str, str, str], tuple[Problem, ...]] = {}


def check(spec: Spec) -> None:
    """Raise :class:`DriftError` when ``spec`` is drifted (verified on other transformers versions
    than the installed one) and the class changed; a no-op otherwise. Cached per spec and version."""
    if not is_drifted(spec):
        return
    key = (spec.source, spec.arch, installed_version())
    if key not in _CHECKED:
        _CHECKED[key] = tuple(problems(spec))
    if _CHECKED[key]:
        raise _error(spec, _CHECKED[key][0])


@contextmanager
def explained(spec: Spec, module: nn.Module) -> Iterator[None]:
    """Around planning one module: on a drifted spec, a changed forward or a :class:`SpecError`
    from the module's parameters is reported as drift (what changed, and how to fix it)."""
    if not is_drifted(spec):
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
