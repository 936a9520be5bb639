"""Limits on what a spec file may hold, and :func:`clip` for quoting its values in one-line errors.

A spec is untrusted input: every stage that reads it (YAML, ``extends``, shape expressions, import
paths) checks against these bounds, so they live below all of them, in one place.
"""

from __future__ import annotations

#: Limits on a spec file, far above any real spec (the largest built-in is ~3 KB, 5 levels deep),
#: so hostile input ends in one SpecError before it can exhaust memory, the stack or the C parser.
MAX_SPEC_BYTES = 256 * 1024
MAX_DEPTH = 16
MAX_EXTENDS = 16
MAX_EXPR_CHARS = 200


def clip(text: str, limit: int = 80) -> str:
    """One short line of ``text`` (values from a spec can be huge or hold newlines)."""
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."
