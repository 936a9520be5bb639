"""What ``moe-unfuse quantize`` reports: the run's facts (``to_dict`` for ``--json`` and ``--report``)
and their text, one line per stage, kept apart from the pipeline that gathers them
(:mod:`moe_unfuse.quant.quantize`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .calibration import ScaleFallback


@dataclass
class QuantizeReport:
    """Everything ``moe-unfuse quantize`` prints; ``to_dict`` for ``--json``."""

    source: str
    options: Any  # quantize.QuantizeOptions (the pipeline imports this module)
    result: Any  # quantize.QuantizeResult
    samples: int
    tokens: int
    bytes_before: int
    export: Any  # export.ExportResult
    verify: Any  # verify.VerifyReport
    before_what: str = "in memory"
    layers: int = 0  # decoder layers quantized one at a time (0: the whole model at once)
    device: str = "cpu"
    resumed: int = 0  # decoder layers a killed run had calibrated, restored from OUT.resume
    evaluation: Any = None  # eval_report.EvalReport, or None when not evaluated
    eval_failed: str = ""  # why the evaluation failed the run
    spilled: list[str] = field(default_factory=list)  # modules accelerate ran from disk (whole model)

    @property
    def ok(self) -> bool:
        return self.verify.ok and not self.eval_failed

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            "source": self.source,
            "qformat": r.qformat,
            "algorithm": r.algorithm,
            "engine": self.options.engine,
            "specs": [s.arch for s in r.specs],
            "coverage": {
                "covered": [{"module": p, "arch": a, "experts": n} for p, a, n in r.coverage.covered],
                "uncovered": r.coverage.uncovered,
            },
            "calibration": {"samples": self.samples, "tokens": self.tokens, **r.routing.to_dict()},
            "input_scale": r.input_scale,
            "fallbacks": [vars(f) for f in r.fallbacks],
            "gate_up_synced": r.gate_up_synced,
            "kept_for_engine": r.kept_for_engine,
            "quantized_for_engine": r.quantized_for_engine,
            "layerwise": {"layers": self.layers, "resumed": self.resumed} if self.layers else None,
            "device": self.device,
            "offloaded_to_disk": self.spilled,
            "bytes_before": self.bytes_before,
            "bytes_before_of": self.before_what,
            "export": self.export.to_dict(),
            "verify": self.verify.to_dict(),
            "evaluation": self.evaluation.to_dict() if self.evaluation is not None else None,
        }

    def __str__(self) -> str:
        r, ex = self.result, self.export
        lines = [f"model      {self.source}"]
        if self.layers:
            resumed = f"; layers 0-{self.resumed - 1} resumed from a killed run's state" if self.resumed else ""
            lines.append(
                f"mode       layer by layer: {self.layers} decoder layers, each loaded from disk, calibrated and exported in turn, on {self.device}{resumed}"
            )
        if self.spilled:
            shown = ", ".join(self.spilled[:8]) + (
                f", ... ({len(self.spilled)} modules)" if len(self.spilled) > 8 else ""
            )
            lines.append(
                f"mode       whole model (--no-layerwise), but it did not fit: accelerate runs {shown} from disk (slow; without --no-layerwise the job goes layer by layer)"
            )
        if r.coverage.covered:
            archs = sorted({a for _, a, _ in r.coverage.covered})
            n_exp = {n for _, _, n in r.coverage.covered}
            lines.append(
                f"coverage   {len(r.coverage.covered)} fused expert module(s), {'some' if r.coverage.uncovered else 'all'} covered ({', '.join(archs)}; "
                f"{'/'.join(map(str, sorted(n_exp)))} experts each) -> {r.num_linears} per-expert linears"
            )
        elif not r.coverage.uncovered:
            lines.append("coverage   no fused expert modules in this model")
        if r.kept_for_engine:
            reasons = sorted(set(r.kept_for_engine.values()))
            lines.append(
                f"           {len(r.kept_for_engine)} left unquantized and excluded for --engine {self.options.engine} ({'; '.join(reasons)})"
            )
        if r.quantized_for_engine:
            reasons = sorted(set(r.quantized_for_engine.values()))
            lines.append(
                f"           {', '.join(r.quantized_for_engine)} quantized for --engine {self.options.engine} ({'; '.join(reasons)})"
            )
        if r.coverage.uncovered:
            lines.append(
                f"           NOT covered, left unquantized and excluded (--allow-uncovered): {', '.join(r.coverage.uncovered)}"
            )
        lines.append(
            f"calibrate  {self.samples} samples, {self.tokens} tokens; tokens per expert (routed, top-k counts each):"
        )
        for path, counts in r.routing.counts.items():
            forced = r.routing.forced.get(path)
            shown = (
                " ".join(map(str, counts))
                if len(counts) <= 16
                else f"min {min(counts)} median {sorted(counts)[len(counts) // 2]} max {max(counts)}"
            )
            pushed = [(e, c) for e, c in enumerate(forced or []) if c]
            extra = (
                f"  forced: {', '.join(f'#{e} {c}' for e, c in pushed)}"
                if 0 < len(pushed) <= EXPERTS_LISTED
                else f"  forced: {expert_list([e for e, _ in pushed], len(counts))}, {sum(c for _, c in pushed)} tokens"
                if pushed
                else ""
            )
            lines.append(f"           {path:<36} {shown}{extra}")
        before = r.routing.uncovered(forced_too=False)
        after = r.routing.uncovered(forced_too=True)
        if not r.routing.counts:
            lines.append("           (no experts modules: nothing to count)")
        elif not before:
            lines.append("           every expert received tokens")
        else:
            lines.extend(
                f"           no routed tokens: {p} {expert_list(es, len(r.routing.counts[p]))}"
                for p, es in before.items()
            )
            if not r.force_routing:
                lines.append("           (rerun with --force-routing to calibrate them on their layer's inputs)")
            elif after:
                lines.extend(
                    f"           still no data after forced routing: {p} {expert_list(es, len(r.routing.counts[p]))}"
                    for p, es in after.items()
                )
            else:
                lines.append("           forced routing calibrated them on their layer's inputs")
        if r.qformat != "none":
            inputs = (
                (
                    f"input: {r.input_scale}"
                    + (
                        " (one per layer and input, max over experts)"
                        if r.input_scale == "shared"
                        else " (each expert its own)"
                    )
                )
                if r.input_quantized
                else "input: none (weight-only format)"
            )
            weights = "weight amax searched for least squared error (mse); " if r.algorithm == "mse" else ""
            lines.append(
                f"scales     {inputs}; {weights}gate/up weight amax shared ({r.gate_up_synced} pair(s) adjusted)"
            )
            lines.extend(f"           {line}" for line in fallback_lines(r.fallbacks))
        lines.append(f"export     {ex.summary()}")
        ratio = ex.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        lines.append(
            f"size       {_mb(self.bytes_before)} {self.before_what} -> {_mb(ex.bytes_after)} checkpoint ({ratio:.2f}x)"
        )
        lines.append(f"verify     {self.verify.summary()}")
        for line in self.verify.problem_lines():
            lines.append(f"           {line}")
        if self.evaluation is not None:
            block = self.evaluation.lines() + ([f"FAILED {self.eval_failed}"] if self.eval_failed else [])
            lines.extend(f"{'evaluate' if i == 0 else '':<10} {line}" for i, line in enumerate(block))
        lines.append(f"checkpoint {ex.path}" if self.ok else f"FAILED     checkpoint kept for inspection at {ex.path}")
        return "\n".join(lines)


#: Expert numbers listed one by one on screen up to this many; beyond, a count and ranges.
EXPERTS_LISTED = 16
_RANGES_SHOWN = 6


def expert_list(experts: Sequence[int], total: int | None = None) -> str:
    """``#3,7,9`` up to ``EXPERTS_LISTED`` experts; beyond, a count and the first ranges:
    ``37 of 128 experts (0-3, 7, 9-40, ...)`` (every number stays in ``moe_unfuse.json``)."""
    experts = sorted(experts)
    if len(experts) <= EXPERTS_LISTED:
        return "#" + ",".join(map(str, experts))
    runs: list[list[int]] = []
    for e in experts:
        if runs and e == runs[-1][1] + 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    shown = [f"{a}-{b}" if b > a else str(a) for a, b in runs[:_RANGES_SHOWN]]
    more = ", ..." if len(runs) > _RANGES_SHOWN else ""
    of = f" of {total}" if total else ""
    return f"{len(experts)}{of} experts ({', '.join(shown)}{more})"


def fallback_lines(fallbacks: Sequence[ScaleFallback]) -> list[str]:
    """One line per experts module (every expert's value is in ``moe_unfuse.json``): at 128 experts a
    line per expert would bury the report."""
    by_path: dict[str, list[ScaleFallback]] = {}
    for fb in fallbacks:
        by_path.setdefault(fb.path, []).append(fb)
    lines = []
    for path, fbs in by_path.items():
        if len(fbs) == 1:
            lines.append(f"fallback {fbs[0]}")
            continue
        experts = sorted({fb.expert for fb in fbs})
        sources = " / ".join(sorted({fb.source for fb in fbs}))
        lines.append(f"fallback {path} {expert_list(experts)}: {len(fbs)} input amax without data took the {sources}")
    if len(fallbacks) > 1:
        lines.append("(each fallback's value: input_scale_fallbacks in the checkpoint's moe_unfuse.json)")
    return lines


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"
