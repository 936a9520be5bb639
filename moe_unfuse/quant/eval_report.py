"""The figures an evaluation of a quantized checkpoint produces, and what they must meet: each
module's error against the original (:class:`ModuleFigures`), the whole report (:class:`EvalReport`,
its JSON and its text), the per-format limits and the checks drawn from them. Kept apart from the
measurement (:mod:`moe_unfuse.quant.evaluate`), which fills the report in.

A module whose error passes its format's limit (:data:`REL_ERROR_LIMIT`, set from the clean exports
of every spec's tiny model) or whose output is not finite fails a check that names it; one far
beyond its peers' median is named as an outlier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .dequant import FP8, NVFP4

#: Output relative error above which a linear fails, per format (None: unquantized, where the
#: checkpoint holds the original's bytes and the error is 0). Clean exports of the spec's whole tiny
#: models measure about 0.04 (FP8, W8A8) and 0.14 (NVFP4, W4A4) per linear (tests/test_evaluate.py);
#: every numeric corruption tested there lands at 0.5 or more.
REL_ERROR_LIMIT = {FP8: 0.12, NVFP4: 0.3, None: 0.02}
#: An experts module compounds gate, up and down (clean: about 0.07 FP8, 0.23 NVFP4): its limit is
#: the linear's times this.
EXPERTS_LIMIT_FACTOR = 1.6
#: A quantized module is an outlier when its error is this many times its peers' median (and above
#: half its format's limit): a single bad expert among hundreds of good ones.
OUTLIER_FACTOR = 4.0


@dataclass
class ModuleFigures:
    """One module's output against the original's on the same inputs, over all samples."""

    name: str
    kind: str  # "experts", "linear", "expert_linear", "embedding" or "module" (other modules with weights)
    fmt: str | None  # fp8 / nvfp4, None when unquantized
    rel_error: float
    snr_db: float | None  # None: identical outputs
    nonfinite: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.name,
            "kind": self.kind,
            "format": self.fmt,
            "rel_error": _num(self.rel_error),
            "snr_db": _num(self.snr_db),
            "nonfinite": self.nonfinite,
        }


def _num(x: float | None) -> float | str | None:
    """A figure for JSON (which has no inf/nan)."""
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)


@dataclass
class EvalReport:
    """What :func:`moe_unfuse.quant.evaluate.evaluate` measured; ``failures`` name the modules that fail their format's limit."""

    checkpoint: str
    original: str
    samples: int
    tokens: int
    modules: list[ModuleFigures]
    kl: float
    top1: float
    ppl_original: float | None  # None: the model has no next-token head (a token classifier)
    ppl_quantized: float | None
    seconds: float
    held_out: str = ""
    failures: list[str] = field(default_factory=list)
    outliers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def by_kind(self, kind: str, fmt: str | None = "any") -> list[ModuleFigures]:
        return [m for m in self.modules if m.kind == kind and (fmt == "any" or m.fmt == fmt)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "original": self.original,
            "samples": self.samples,
            "tokens": self.tokens,
            "held_out": self.held_out,
            "kl": _num(self.kl),
            "top1": _num(self.top1),
            "ppl_original": _num(self.ppl_original),
            "ppl_quantized": _num(self.ppl_quantized),
            "seconds": round(self.seconds, 2),
            "limits": {str(k) if k else "unquantized": v for k, v in REL_ERROR_LIMIT.items()},
            "experts_limit_factor": EXPERTS_LIMIT_FACTOR,
            "failures": self.failures,
            "outliers": self.outliers,
            "modules": [m.to_dict() for m in self.modules],
        }

    def lines(self) -> list[str]:
        """The report block (one line per figure family; every module's figures are in ``to_dict``)."""
        out = [
            f"{self.samples} held-out samples, {self.tokens} tokens ({self.held_out}; {self.seconds:.0f} s); KL(original || quantized) "
            f"{self.kl:.4f}, top-1 agreement {self.top1:.1%}, "
            + (
                f"perplexity {self.ppl_original:.2f} -> {self.ppl_quantized:.2f}"
                if self.ppl_original is not None and self.ppl_quantized is not None
                else "no perplexity (the outputs are not next-token logits)"
            )
        ]
        for kind, label in (
            ("experts", "experts modules"),
            ("expert_linear", "expert linears"),
            ("linear", "other linears"),
        ):
            for fmt in (FP8, NVFP4):
                mods = self.by_kind(kind, fmt)
                if not mods:
                    continue
                errs = sorted(m.rel_error for m in mods)
                worst = max(mods, key=lambda m: m.rel_error)
                snr = [m.snr_db for m in mods if m.snr_db is not None]
                out.append(
                    f"{label} ({fmt.upper()}, {len(mods)}): relative error median {_median(errs):.4f}, max {worst.rel_error:.4f} "
                    f"({worst.name}); SNR median {_median(sorted(snr)):.1f} dB"
                )
        plain = [m for m in self.modules if m.fmt is None]
        if plain:
            worst = max(plain, key=lambda m: m.rel_error)
            out.append(f"unquantized modules ({len(plain)}): max relative error {worst.rel_error:.2g} ({worst.name})")
        out.append("outliers: " + (", ".join(self.outliers) if self.outliers else "none"))
        if self.failures:
            shown = self.failures[:8] + ([f"... ({len(self.failures) - 8} more)"] if len(self.failures) > 8 else [])
            out.extend(f"FAILED {f}" for f in shown)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _median(xs: Sequence[float]) -> float:
    return xs[len(xs) // 2] if xs else float("nan")


def failures(modules: Sequence[ModuleFigures], report: EvalReport | None = None) -> list[str]:
    """One line per module past its format's limit or with a non-finite output, and non-finite logits."""
    out = []
    for m in modules:
        if m.nonfinite:
            out.append(f"{m.name}: non-finite output ({m.fmt or 'unquantized'} {m.kind})")
        elif m.rel_error > limit(m):
            out.append(
                f"{m.name}: relative error {m.rel_error:.3g} over the {m.fmt or 'unquantized'} limit {limit(m):.3g} ({m.kind})"
            )
    if report is not None and not (
        math.isfinite(report.kl) and (report.ppl_quantized is None or math.isfinite(report.ppl_quantized))
    ):
        out.append(f"logits: KL {report.kl} / perplexity {report.ppl_quantized} not finite")
    return out


def limit(m: ModuleFigures) -> float:
    """The relative error above which ``m`` fails."""
    return REL_ERROR_LIMIT[m.fmt] * (EXPERTS_LIMIT_FACTOR if m.kind == "experts" and m.fmt else 1.0)


def outliers(modules: Sequence[ModuleFigures]) -> list[str]:
    """Quantized modules whose error is ``OUTLIER_FACTOR`` x their peers' median (same kind, format
    and projection name) and over half their format's limit."""
    groups: dict[tuple, list[ModuleFigures]] = {}
    for m in modules:
        if m.fmt is not None:
            groups.setdefault((m.kind, m.fmt, m.name.rsplit(".", 1)[-1]), []).append(m)
    out = []
    for mods in groups.values():
        med = _median(sorted(m.rel_error for m in mods))
        for m in mods:
            if m.rel_error > OUTLIER_FACTOR * med and m.rel_error > limit(m) / 2:
                out.append(f"{m.name} (relative error {m.rel_error:.3g}, peers' median {med:.3g})")
    return out


def numeric_check(ev: EvalReport, max_kl: float | None = None) -> Any:
    """The evaluation as one check of ``verify --against``: failing modules named in its keys."""
    from ..hub.verify_report import Check

    problems = list(ev.failures)
    if max_kl is not None and not ev.kl <= max_kl:
        problems.append(f"logits: KL {ev.kl:.4g} over --max-kl {max_kl:g}")
    figures = f"{len(ev.modules)} modules on {ev.tokens} tokens, KL {ev.kl:.4g}, top-1 {ev.top1:.1%}"
    if problems:
        return Check("numeric", False, f"{len(problems)} module(s) off the original ({figures})", problems)
    return Check("numeric", True, f"every module within its format's limit ({figures})")
