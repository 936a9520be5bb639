"""Find fused expert parameters in a model, so none can be skipped silently.

One detector, shared by ``unfuse``, ``audit`` and ``quantize``. A parameter is a fused expert
parameter when it is owned directly by an experts module and

* a spec matching the module declares it (weights and fused biases, whatever their rank: DBRX's
  flattened 2-D ``[E*I, H]`` weights are only recognisable this way; a dotted name such as
  ``mlp.w1`` declares a submodule's parameter), or
* it has 3 or more dims (the transformers v5 ``[E, out, in]`` / ``[E, in, out]`` layouts), or
* it is 2-D, the class name says "expert" and its first dim is a multiple (> 1) of the module's
  expert count: a flattened expert bank no spec describes yet.

An experts module has "expert" in its class name or an integer expert-count attribute.
Convolutions are never experts (Conv1d weights are 3-D: audio towers have them), and 3-D
parameters outside experts modules (e.g. Gemma 4's vision ``position_embedding_table``) are not
fused experts. Works on meta-device models (``audit`` builds one without weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

from torch import nn

from ..base.errors import UncoveredExpertsError
from ..spec import catalog
from ..spec.model import Spec
from .experts import UnfusedExpertsMixin, unfuse_state

EXPERT_COUNT_ATTRS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "n_shared_experts",
    "num_routed_experts",
    "total_experts",
)


def expert_count(module: nn.Module) -> int | None:
    """The module's expert count, from the first integer expert-count attribute it has."""
    for attr in EXPERT_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def looks_like_experts(module: nn.Module) -> bool:
    """A module that owns experts: an expert-count attribute or 'Expert' in its class name."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    return "expert" in type(module).__name__.lower() or expert_count(module) is not None


@dataclass(frozen=True)
class FusedParam:
    """One fused expert parameter and the spec that unfuses it (None: no spec covers it).

    ``module`` owns the parameter; ``target`` is the module the spec matches, which differs when the
    spec names a submodule's parameter (DBRX: ``DbrxExperts`` declares ``mlp.w1``).
    """

    path: str
    module_path: str
    name: str
    shape: tuple[int, ...]
    spec: Spec | None
    module: nn.Module = field(repr=False, compare=False)
    target_path: str | None = None
    target: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def covered(self) -> bool:
        return self.spec is not None


def _declared(spec: Spec) -> set[str]:
    return {n for p in spec.params for n in (p.name, p.bias) if n}


def _is_fused(module: nn.Module, ndim: int, shape: tuple[int, ...]) -> bool:
    """The no-spec rules: 3-D or more in an experts module, or a flattened 2-D expert bank."""
    if not looks_like_experts(module):
        return False
    if ndim >= 3:
        return True
    n = expert_count(module)
    return (
        ndim == 2 and bool(n) and "expert" in type(module).__name__.lower() and shape[0] % n == 0 and shape[0] // n > 1
    )


class _SpecMatcher:
    """The first spec matching a module; cached per class (models hold thousands of modules of few classes)."""

    def __init__(self, specs: Iterable[Spec] | None):
        if specs is None:
            specs = catalog.specs().values()
        self.specs = list(specs)
        self._cache: dict[type, Spec | None] = {}

    def __call__(self, module: nn.Module) -> Spec | None:
        cls = type(module)
        if cls not in self._cache:
            self._cache[cls] = next((s for s in self.specs if s.matches(module)), None)
        return self._cache[cls]


def find_fused_params(model: nn.Module, specs: Iterable[Spec] | None = None) -> list[FusedParam]:
    """Every fused expert parameter still in ``model``, each with the first of ``specs`` (default:
    every known spec) that matches its experts module and declares it, or None."""
    match = _SpecMatcher(specs)
    modules = list(model.named_modules())
    declared: dict[
        tuple[int, str], tuple[Spec, str, nn.Module]
    ] = {}  # (id(owner), leaf) -> (spec, target path, target)
    for path, module in modules:
        spec = match(module)
        if spec is None:
            continue
        for name in _declared(spec):
            prefix, _, leaf = name.rpartition(".")
            try:
                owner = module.get_submodule(prefix) if prefix else module
            except AttributeError:  # detached while unfused, or a spec that does not fit (unfuse says so)
                continue
            declared.setdefault((id(owner), leaf), (spec, path, module))
    found: list[FusedParam] = []
    for path, module in modules:
        if not module._parameters or isinstance(module, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)):
            continue
        for name, p in module._parameters.items():
            if p is None:
                continue
            spec, target_path, target = declared.get((id(module), name), (None, None, None))
            if spec is None and not _is_fused(module, p.dim(), tuple(p.shape)):
                continue
            full = f"{path}.{name}" if path else name
            found.append(FusedParam(full, path, name, tuple(p.shape), spec, module, target_path, target))
    return found


def fused_expert_params(model: nn.Module, specs: Iterable[Spec] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(parameter path, owning module) for every fused expert parameter still present, covered or not."""
    for f in find_fused_params(model, specs):
        yield f.path, f.module


def uncovered_expert_params(model: nn.Module, specs: Iterable[Spec] | None = None) -> list[tuple[str, nn.Module]]:
    """(parameter path, owning module) for every fused expert parameter none of ``specs`` (default:
    every known spec) would unfuse: its module matches no spec, or the matching spec omits it."""
    return [(f.path, f.module) for f in find_fused_params(model, specs) if f.spec is None]


@dataclass
class Coverage:
    """Which fused expert modules a set of specs covers, and which fused expert parameters none does."""

    covered: list[tuple[str, str, int]] = field(default_factory=list)  # (path, arch, num_experts)
    uncovered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.uncovered


def check_coverage(model: nn.Module, specs: Iterable[Spec] | None = None, allow_uncovered: bool = False) -> Coverage:
    """Every fused expert parameter in ``model`` (as :func:`moe_unfuse.core.coverage.find_fused_params`
    detects them) must be declared by one of ``specs`` (default: every known spec); else
    :class:`UncoveredExpertsError` names them, unless ``allow_uncovered``. Already-unfused modules count as covered."""

    specs = catalog.select_specs(model) if specs is None else list(specs)
    cov = Coverage()
    for path, module in model.named_modules():
        if isinstance(module, UnfusedExpertsMixin):
            cov.covered.append((path, unfuse_state(module).spec.arch, len(module)))
    seen: set[str] = set()
    for f in find_fused_params(model, specs):
        if f.spec is None:
            cov.uncovered.append(f.path)
        elif f.target_path not in seen:  # the module the spec matches (DBRX: experts, not experts.mlp)
            seen.add(f.target_path)
            cov.covered.append((f.target_path, f.spec.arch, expert_count(f.target) or 0))
    if cov.uncovered and not allow_uncovered:
        raise UncoveredExpertsError(cov.uncovered)
    return cov
