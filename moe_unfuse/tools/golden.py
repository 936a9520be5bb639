"""Golden checks: a spec's unfused forward against the real transformers module on a tiny config.

Used by the test-suite (``tests/test_golden.py``, one parametrized case per spec) and by
``moe-unfuse check SPEC.yaml``, so a contributor proves a new spec without writing code.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..base.errors import SpecError, first_line
from ..core.drift import check as check_drift
from ..core.experts import UnfusedExpertsMixin
from ..core.plan import build_plan, owner_of, resolve_dims
from ..core.registration import register
from ..core.unfusing import fuse, unfuse
from ..plugins.manager import registry
from ..spec.golden_config import golden_experts, set_experts_implementation
from ..spec.imports import resolve_object
from ..spec.model import Spec

#: grouped_mm / batched_mm reorder the reductions (one grouped GEMM, fp32 accumulation and a
#: sum over top-k instead of index_add_), so they can only agree to rounding: fp32 eps is 1.2e-7
#: and outputs here are O(1), bf16 eps is 7.8e-3 and a bf16 output is rounded at each GEMM.
IMPL_TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
TOKENS = 48
SEED = 0
#: Routings every exact check runs, whatever the spec says (``golden.top_k`` only adds one): k=1
#: has no sum, a sum of two bf16 outputs rounds alike in bf16 and fp32, so only k=3 catches a wrong
#: accumulation dtype. Capped at the module's expert count.
TOP_KS = (1, 2, 3)


def import_object(path: str, kind: str | None = None, source: str = "(golden)", where: str = "golden") -> Any:
    """The class at ``path``, checked to be of ``kind`` (moe_unfuse.spec.imports.KINDS; None: any) before anyone calls it."""
    return resolve_object(path, kind, source, where)


def build_experts(spec: Spec, dtype: torch.dtype = torch.float32, seed: int = SEED) -> nn.Module:
    """The real experts module from the spec's tiny config, with random weights (std 0.1, biases too)."""

    check_drift(spec)  # a transformers not in verified_on: what changed, in one line
    cls = spec.resolve_class()  # an nn.Module subclass, checked before anything is called
    if cls is None:
        raise LookupError(f"{spec.target_class} is not in the installed transformers")
    module = golden_experts(spec, cls)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.to(dtype).eval()


def input_dim(module: nn.Module, spec: Spec) -> int:
    """Size of the experts' input features as the spec lays out the parameter holding up_proj (else the first)."""

    p = next((p for p in spec.params if "up_proj" in p.into), spec.params[0])
    owner, leaf = owner_of(module, p.name)
    t = owner._parameters[leaf]
    for op in p.layout(resolve_dims(module, spec, "")["num_experts"]).prepare:
        t = op.apply(t)
    return t.shape[2]


def _widths(module: nn.Module, spec: Spec) -> list[int]:
    """Input widths to try, the spec's reading first, then the sizes the real module holds (its
    config's hidden_size, every axis of its fused parameters): the original forward decides."""
    widths = []
    try:
        widths.append(input_dim(module, spec))
    except (RuntimeError, IndexError, KeyError, ValueError, SpecError):
        pass
    hidden = getattr(getattr(module, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        widths.append(hidden)
    widths += [n for p in module.parameters() if p.dim() >= 2 for n in p.shape[1:]]
    return list(dict.fromkeys(widths))


def golden_top_ks(module: nn.Module, spec: Spec) -> tuple[int, ...]:
    """:data:`TOP_KS` up to the module's expert count, plus ``golden.top_k``; a top_k above the expert
    count is a SpecError (clamping it would test another routing than the spec claims)."""

    num_experts = resolve_dims(module, spec, "")["num_experts"]
    top_k = (spec.golden or {}).get("top_k")
    if top_k is not None and top_k > num_experts:
        raise SpecError(
            spec.source,
            "golden.top_k",
            f"{top_k} is more than the module's {num_experts} experts",
            f"use a top_k of at most {num_experts}",
        )
    return tuple(sorted({k for k in TOP_KS if k <= num_experts} | ({top_k} if top_k else set())))


def make_inputs(
    module: nn.Module,
    spec: Spec,
    tokens: int = TOKENS,
    seed: int = SEED,
    top_k: int | None = None,
    keywords: bool = False,
    width: int | None = None,
) -> tuple[tuple, dict]:
    """Random hidden states and a routing that hits every expert, in the forward's own argument
    order (``keywords``: by the forward's own parameter names instead). ``top_k``: default
    ``golden.top_k``, else 2; ``width``: of the hidden states, default as the spec lays out the
    parameters (:func:`check_exact` tries the real module's sizes when the original rejects it).
    """
    return _inputs(module, spec, width if width is not None else input_dim(module, spec), tokens, seed, top_k, keywords)


def _inputs(
    module: nn.Module, spec: Spec, width: int, tokens: int, seed: int, top_k: int | None, keywords: bool
) -> tuple[tuple, dict]:

    dtype = next(module.parameters()).dtype
    num_experts = resolve_dims(module, spec, "")["num_experts"]
    top_k = top_k or (spec.golden or {}).get("top_k", 2)
    if top_k > num_experts:
        raise SpecError(
            spec.source,
            "golden.top_k",
            f"{top_k} is more than the module's {num_experts} experts",
            f"use a top_k of at most {num_experts}",
        )
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(tokens, width, generator=gen).to(dtype)
    scores = torch.rand(tokens, num_experts, generator=gen)
    scores[torch.arange(tokens), torch.arange(tokens) % num_experts] += 2.0
    weights, index = scores.topk(top_k, dim=-1)
    values = {"hidden_states": hidden, "top_k_index": index, "top_k_weights": torch.softmax(weights, -1).to(dtype)}
    extra = getattr(registry().forwards.get(spec.forward_kind), "golden_inputs", None)
    if extra is not None:  # the forward kind's other roles (expert sizes, gammas, identity-expert routing)
        values.update(extra(module, spec, values, gen))
    if keywords:
        return (), {name: values[role] for name, role in spec.forward_args}
    return tuple(values[role] for _, role in spec.forward_args), {}


@contextmanager
def implementation(module: nn.Module, impl: str) -> Iterator[None]:
    """Temporarily dispatch a ``use_experts_implementation`` module to ``impl``."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "_experts_implementation"):
        if impl != "eager":
            raise LookupError(f"{type(module).__name__} has no experts implementation dispatch")
        yield
        return
    old = config._experts_implementation
    config._experts_implementation = impl
    try:
        yield
    finally:
        config._experts_implementation = old


def supports_implementations(module: nn.Module) -> bool:
    return (
        hasattr(type(module), "_apply_gate")
        and hasattr(getattr(module, "config", None), "_experts_implementation")
        and hasattr(module, "has_gate")
    )


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def validate(module: nn.Module, spec: Spec) -> None:
    """The checks ``unfuse`` runs before it touches anything (dims, shapes, splits, gate): a wrong
    layout is the same one-line SpecError here as there, before any input is made."""

    build_plan(module, spec)


def check_exact(spec: Spec, dtype: torch.dtype) -> CheckResult:
    """Unfused forward == original eager forward, bit for bit (``torch.equal``), for every routing
    of :func:`golden_top_ks` and called both positionally and by the forward's own keyword names.

    Exact on CPU because the per-expert GEMMs run on views of the fused weights (same values, same
    kernel as the fused GEMM's halves) and the gate is applied to gate and up packed back into the
    fused layout: element-wise kernels round the last bits differently on a strided half of a fused
    output than on a contiguous tensor when the width is not a multiple of the SIMD width (I = 40).
    """

    module = build_experts(spec, dtype)
    validate(module, spec)
    ks = golden_top_ks(module, spec)
    # The width the original accepts: the spec's reading first, then the real module's sizes, so a
    # misread layout fails the comparison below instead of crashing the original.
    cases, expected, skipped = [], [], ["no input width found"]
    for width in _widths(module, spec):
        cases = [
            (f"k={k} {'keyword' if kw else 'positional'}", make_inputs(module, spec, top_k=k, keywords=kw, width=width))
            for k in ks
            for kw in (False, True)
        ]
        expected, skipped = [], []
        with torch.no_grad(), implementation(module, "eager"):
            for label, (args, kwargs) in cases:
                try:
                    expected.append(module(*args, **kwargs))
                except Exception as exc:  # noqa: BLE001 - a routing the original itself cannot run (Longcat at k=1) is not tested
                    expected.append(None)
                    skipped.append(f"{label} ({type(exc).__name__} in the original)")
        if any(ref is not None for ref in expected):
            break
    if all(ref is None for ref in expected):
        return CheckResult(
            f"exact-{_dtype_name(dtype)}", False, f"the original forward fails on every golden input: {skipped[0]}"
        )
    unfuse(module, spec)
    worst, failed = 0.0, []
    with torch.no_grad():
        for (label, (args, kwargs)), ref in zip(cases, expected):
            if ref is None:
                continue
            try:
                got = module(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the original ran on these inputs: the spec misreads the layout
                raise SpecError(
                    spec.source,
                    "params",
                    f"the unfused forward fails ({label}) on inputs the original accepts ({type(exc).__name__}: {first_line(exc)})",
                    "check axes, packing and shape against the class (is the layout transposed?)",
                ) from None
            diff = _max_diff(got, ref) if got.shape == ref.shape else float("inf")
            worst = max(worst, diff)
            if got.shape != ref.shape or not torch.equal(got, ref):
                failed.append(f"{label}: max|diff| {diff:.3g}")
    detail = (
        f"k={','.join(map(str, ks))}, positional and keyword: max|diff| {worst:.3g}"
        if not failed
        else f"{len(failed)} of {len(cases)} calls differ; {'; '.join(failed[:3])}"
    )
    if skipped:
        detail += f"; not run: {', '.join(skipped)}"
    return CheckResult(f"exact-{_dtype_name(dtype)}", not failed, detail)


def check_implementations(spec: Spec, dtype: torch.dtype) -> list[CheckResult]:
    """Unfused forward vs ``grouped_mm`` / ``batched_mm``, within :data:`IMPL_TOLERANCE`."""

    impls = (spec.golden or {}).get("implementations", [])
    module = build_experts(spec, dtype)
    if not impls or not supports_implementations(module):
        return []
    validate(module, spec)
    args, kwargs = make_inputs(module, spec, top_k=max(golden_top_ks(module, spec)))
    expected = {}
    with torch.no_grad():
        for impl in impls:
            with implementation(module, impl):
                expected[impl] = module(*args, **kwargs)
        unfuse(module, spec)
        got = module(*args, **kwargs)
    tol = IMPL_TOLERANCE[dtype]
    return [
        CheckResult(
            f"{impl}-{_dtype_name(dtype)}",
            torch.allclose(got, ref, **tol),
            f"max|diff| {_max_diff(got, ref):.3g} (atol {tol['atol']}, rtol {tol['rtol']})",
        )
        for impl, ref in expected.items()
    ]


def check_fuse(spec: Spec) -> list[CheckResult]:
    """unfuse then fuse restores every parameter bit for bit, also after the views were replaced."""

    results = []
    for replaced in (False, True):
        module = build_experts(spec)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        unfuse(module, spec)
        if replaced:  # as after module.to(...) or a load: every per-expert tensor is its own copy
            with torch.no_grad():
                for p in module.parameters():
                    p.data = p.data.clone()
        fuse(module)
        after = module.state_dict()
        ok = before.keys() == after.keys() and all(
            torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before
        )
        results.append(CheckResult("fuse-copied" if replaced else "fuse", ok, f"{len(before)} parameters"))
    return results


class _Harness(nn.Module):
    """A parent for the experts module, as modelopt converts children of the model it is given."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.experts(*args, **kwargs)


def quantize(module: nn.Module, spec: Spec, cfg: dict, loop: Callable[[nn.Module], Any]) -> nn.Module:
    import modelopt.torch.quantization as mtq

    register(spec)
    harness = _Harness(module)
    mtq.quantize(harness, copy.deepcopy(cfg), forward_loop=loop)
    return harness


def check_modelopt(spec: Spec) -> list[CheckResult]:
    """Through ``register`` + ``mtq.quantize``: quantizers off == original; FP8 calibrates every expert."""
    import modelopt.torch.quantization as mtq

    results = []
    module = build_experts(spec)
    validate(module, spec)
    args, kwargs = make_inputs(module, spec, top_k=max(golden_top_ks(module, spec)))
    with torch.no_grad(), implementation(module, "eager"):
        expected = module(*args, **kwargs)
    harness = quantize(module, spec, mtq.FP8_DEFAULT_CFG, lambda m: m(*args, **kwargs))
    mtq.disable_quantizer(harness, "*")
    with torch.no_grad():
        got = harness(*args, **kwargs)
    results.append(CheckResult("modelopt-off", torch.equal(got, expected), f"max|diff| {_max_diff(got, expected):.3g}"))

    for impl in ("eager", "grouped_mm"):
        module = build_experts(spec)
        if impl != "eager" and not supports_implementations(module):
            continue
        with implementation(module, impl):
            harness = quantize(module, spec, mtq.FP8_DEFAULT_CFG, lambda m: m(*args, **kwargs))
        experts = harness.experts
        missing = [
            f"{e}.{proj}.{q}"
            for e, expert in enumerate(experts if isinstance(experts, UnfusedExpertsMixin) else [])
            for proj in spec.projection_names()
            for q in ("input_quantizer", "weight_quantizer")
            if getattr(getattr(expert, proj), q).amax is None
        ]
        n = len(experts) if isinstance(experts, UnfusedExpertsMixin) else 0
        ok = n > 0 and not missing
        results.append(CheckResult(f"fp8-calibrated-{impl}", ok, f"{n} experts, uncalibrated: {missing[:4] or 'none'}"))
    return results


def check_whole_model(spec: Spec) -> list[CheckResult]:
    """A whole tiny model gives identical logits before and after unfusing."""

    model_cfg = (spec.golden or {}).get("model")
    if not model_cfg:
        return []
    cls = resolve_object(model_cfg["class"], "model", spec.source, "golden.model.class")
    config_cls = (
        resolve_object(model_cfg["config"], "config", spec.source, "golden.model.config")
        if model_cfg.get("config")
        else cls.config_class
    )
    config = config_cls(**model_cfg["config_kwargs"])
    set_experts_implementation(config, "eager")
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = cls(config).eval()
    ids = torch.randint(0, config.get_text_config().vocab_size, (2, 12), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        report = unfuse(model, spec)
        after = model(input_ids=ids).logits
    return [
        CheckResult(
            "whole-model",
            torch.equal(before, after) and bool(report.changed),
            f"{len(report.changed)} modules unfused, max|diff| {_max_diff(before, after):.3g}",
        )
    ]


def run_golden(spec: Spec, modelopt: bool = True) -> list[CheckResult]:
    """Every golden check for ``spec``; the caller decides how to report failures."""
    results: list[CheckResult] = []
    for dtype in (torch.float32, torch.bfloat16):
        results.append(check_exact(spec, dtype))
        results.extend(check_implementations(spec, dtype))
    results.extend(check_fuse(spec))
    if modelopt:
        results.extend(check_modelopt(spec))
    results.extend(check_whole_model(spec))
    return results


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
