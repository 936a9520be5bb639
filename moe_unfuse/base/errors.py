"""Errors moe_unfuse raises on bad input: one line each, naming where and how to fix."""

from __future__ import annotations


class MoeUnfuseError(Exception):
    """Base class for every error this package raises on purpose."""


class SpecError(MoeUnfuseError, ValueError):
    """A spec file is malformed or does not fit the module it targets.

    The message is one line: ``<file>: <field.path>: <problem>; fix: <what to do>``.
    """

    def __init__(self, source: str, field: str, problem: str, fix: str):
        self.source, self.field, self.problem, self.fix = source, field, problem, fix
        super().__init__(f"{source}: {field}: {problem}; fix: {fix}")


class UnknownArchError(MoeUnfuseError, KeyError):
    """An architecture name that no spec provides."""

    def __init__(self, arch: str, known: list[str]):
        self.arch, self.known = arch, known
        super().__init__(arch)

    def __str__(self) -> str:
        return f"unknown arch {self.arch!r}; known: {', '.join(self.known)}; fix: pick one of these or add specs/{self.arch}.yaml"


class UncoveredExpertsError(MoeUnfuseError, RuntimeError):
    """The model holds fused expert parameters that no spec covers (the silent-skip bug, made loud)."""

    def __init__(self, uncovered: list[str]):
        self.uncovered = uncovered
        super().__init__(
            f"fused expert parameters with no spec: {', '.join(uncovered)}; fix: add a spec "
            "(moe-unfuse draft CLASS drafts one) or pass allow_uncovered=True to skip them knowingly"
        )


def first_line(exc: BaseException, limit: int = 200, with_type: bool = False) -> str:
    """An exception's message cut to its first line (or its type when it has none), for one-line
    errors; ``with_type`` prefixes the type (``KeyError: 'x'``)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(exc).__name__}: {line}" if with_type else line
