"""What a spec may import, and resolving the classes it names: the allow-list (transformers, plugin
packages, modules the user trusts for one call) and the base-class check before anything is called.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterable, Iterator

from ..base.errors import MoeUnfuseError, SpecError
from ..plugins.manager import registry
from .limits import clip

#: What a spec may name (``target.class``, ``golden.config``, ``golden.model.class``/``config``)
#: and the base class each must be: nothing a spec names is called unless it is one of these.
KINDS = {
    "module": ("torch.nn", "Module", "an nn.Module subclass (the fused experts class)"),
    "config": ("transformers", "PretrainedConfig", "a transformers PretrainedConfig subclass"),
    "model": ("transformers", "PreTrainedModel", "a transformers PreTrainedModel subclass"),
}


def allowed_import_roots() -> tuple[str, ...]:
    """Top-level packages whose modules a spec may import: transformers, the package of every
    registered moe_unfuse plugin (code the user already chose to run, via the entry point group),
    and the modules the user trusts for the current call (:func:`trusted_modules`)."""
    return tuple(dict.fromkeys((*registry().import_roots, *_TRUSTED.get())))


#: Modules the user consented to, for the duration of one call (never read from a spec).
_TRUSTED: ContextVar[tuple[str, ...]] = ContextVar("moe_unfuse_trusted_modules", default=())
_MODULE_NAME_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@contextmanager
def trusted_modules(names: Iterable[str] = ()) -> Iterator[None]:
    """Within the block, specs may import the modules ``names`` (and their submodules): the user's
    explicit consent (``--trust-module``, ``register(..., trust_modules=...)``), as ``trust_remote_code``
    is for transformers, for a model class not in transformers nor in a plugin. A spec cannot give
    itself this consent; a name that is not a module path is a one-line error."""
    names = tuple(names)
    for name in names:
        if not isinstance(name, str) or not _MODULE_NAME_RE.fullmatch(name):
            raise MoeUnfuseError(
                f"trusted module {clip(repr(name), 60)} is not a module name; fix: pass a dotted module path, e.g. mymodels"
            )
    token = _TRUSTED.set(tuple(dict.fromkeys((*_TRUSTED.get(), *names))))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def check_importable(source: str, where: str, module: str) -> None:
    """``module`` may be imported for a spec: under an allowed root, trusted by the user, already
    imported (looked up, not run), or under a package that does not exist at all (its import fails:
    nothing runs)."""
    root = module.split(".")[0]
    if root in registry().import_roots or module in sys.modules:
        return
    if any(module == t or module.startswith(t + ".") for t in _TRUSTED.get()):
        return
    try:
        exists = importlib.util.find_spec(root) is not None  # a path search: runs no module code
    except (ImportError, ValueError):
        exists = False
    if not exists:
        return
    raise SpecError(
        source,
        where,
        f"module {clip(module, 60)!r} is outside what a spec may import ({', '.join(allowed_import_roots())})",
        "name a class in transformers, install the plugin that provides it, or trust your own module with "
        "--trust-module (see CONTRIBUTING.md, What a spec may import)",
    )


def resolve_object(path: str, kind: str | None, source: str, where: str, missing_ok: bool = False) -> Any:
    """The class ``path`` names, checked to be of ``kind`` (see :data:`KINDS`; None: any of them)
    before anything calls it.

    Imports only what :func:`check_importable` allows. ``missing_ok``: None when the module or the
    name does not exist (a class of another transformers version) instead of a SpecError.
    """
    module, _, name = path.rpartition(".")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module) or not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise SpecError(source, where, f"{clip(path, 60)!r} is not an import path", "write package.module.ClassName")
    check_importable(source, where, module)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if missing_ok:
            return None
        raise SpecError(
            source,
            where,
            f"cannot import module {module!r} ({exc.__class__.__name__})",
            "fix the import path or install the package that defines it",
        ) from None
    obj = getattr(mod, name, None)
    if obj is None:
        if missing_ok:
            return None
        raise SpecError(
            source,
            where,
            f"{module} has no class {name!r}",
            "fix the class name (check the installed transformers version)",
        )
    kinds = [KINDS[kind]] if kind is not None else list(KINDS.values())
    bases = tuple(getattr(importlib.import_module(m), n) for m, n, _ in kinds)
    if not (isinstance(obj, type) and issubclass(obj, bases)):
        what = " or ".join(w for _, _, w in kinds)
        raise SpecError(source, where, f"{clip(path, 80)} is not {what}", f"name {what}")
    return obj


def forward_args_problem(cls: type, names: tuple[str, ...]) -> str | None:
    """Why ``forward.args`` (its keys, in order) are not the leading parameters of ``cls.forward``, or None.

    The unfused forward binds positional arguments by this order and keyword arguments by these
    names, so both must be the original's own.
    """
    import inspect

    fn = inspect.unwrap(cls.forward)
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    actual = [p.name for p in params]
    if actual[: len(names)] != list(names):
        return f"forward({', '.join(names)}) but {cls.__name__}.forward takes ({', '.join(actual)})"
    return None
