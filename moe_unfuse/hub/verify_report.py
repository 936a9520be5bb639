"""What ``verify`` reports: one :class:`Check` per contract invariant or engine rule, the report over
them (text, ``to_dict`` for ``--json``) and the error a failed export raises with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base.errors import MoeUnfuseError

#: Offending keys a check lists on screen; the rest are counted (``--json`` has them all).
SHOW = 8


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    keys: list[str] = field(default_factory=list)

    def line(self) -> str:
        shown = ", ".join(self.keys[:SHOW]) + (f" (+{len(self.keys) - SHOW} more)" if len(self.keys) > SHOW else "")
        return f"{self.name}: {self.detail}" + (f": {shown}" if shown else "")


class CheckpointContractError(MoeUnfuseError):
    """An exported checkpoint violates the export contract (see :mod:`moe_unfuse.hub.verify`)."""

    def __init__(self, report: "VerifyReport"):
        self.report = report
        failed = "; ".join(c.line() for c in report.checks if not c.ok)
        super().__init__(
            f"{report.path}: export contract violated: {failed}; fix: re-export with moe-unfuse quantize (see README)"
        )


@dataclass
class VerifyReport:
    path: Path
    engine: str
    quant_algo: str | None
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        what = f"{self.quant_algo or 'unquantized'}, engine {self.engine}"
        if self.ok:
            return f"ok: {len(self.checks)} checks passed ({what}: {', '.join(c.name for c in self.checks)})"
        return f"FAILED {len(self.failed)} of {len(self.checks)} checks ({what})"

    def problem_lines(self) -> list[str]:
        return [c.line() for c in self.failed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "engine": self.engine,
            "quant_algo": self.quant_algo,
            "ok": self.ok,
            "checks": [vars(c) for c in self.checks],
        }

    def raise_for_errors(self) -> "VerifyReport":
        if not self.ok:
            raise CheckpointContractError(self)
        return self

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.summary()}"]
        for c in self.checks:
            lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.line()}")
        return "\n".join(lines)
