"""The shape-expression language of specs (``2*intermediate``): dims names, integers and + - * //.

Parsed and evaluated over a small AST allow-list, never ``eval``; used both to validate specs and to
compute sizes when unfusing (plugins get :func:`eval_shape_expr` through ``moe_unfuse.plugin``).
"""

from __future__ import annotations

import ast
from typing import Any, Mapping

from ..base.errors import SpecError
from .limits import MAX_EXPR_CHARS, clip

_EXPR_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}


def _parse_expr(expr: str | int) -> ast.AST:
    """The syntax tree of a dims expression; ValueError naming what is wrong (too long, syntax, an
    operation other than + - * //), never a RecursionError on a hostile one."""
    text = str(expr)
    if len(text) > MAX_EXPR_CHARS:
        raise ValueError(f"expression is {len(text)} characters, over {MAX_EXPR_CHARS}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise ValueError(
            f"syntax error in {clip(text, 60)!r} ({getattr(exc, 'msg', None) or exc.__class__.__name__})"
        ) from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.Name, ast.Load, *_EXPR_OPS)) or (
            isinstance(node, ast.BinOp) and type(node.op) in _EXPR_OPS
        )
        ok = ok or (isinstance(node, ast.Constant) and type(node.value) is int)
        if not ok:
            raise ValueError(
                f"{clip(text, 60)!r}: {type(node).__name__} is not allowed (dims names, integers and + - * // only)"
            )
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.FloorDiv)
            and isinstance(node.right, ast.Constant)
            and node.right.value == 0
        ):
            raise ValueError(f"{clip(text, 60)!r} divides by zero")
    return tree


def check_expr(source: str, where: str, expr: str | int, dims: Mapping[str, Any]) -> None:
    """A dims expression that parses, uses only + - * // and names only declared dims."""
    if isinstance(expr, int):
        return
    try:
        tree = _parse_expr(expr)
    except ValueError as exc:
        raise SpecError(
            source,
            where,
            str(exc),
            "write an expression over dims names with integers and + - * //, e.g. 2*intermediate",
        ) from None
    unknown = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - set(dims)
    if unknown:
        raise SpecError(
            source, where, f"unknown dim {clip(sorted(unknown)[0], 40)!r}", f"use one of dims: {', '.join(dims)}"
        )


def eval_shape_expr(expr: str | int, dims: Mapping[str, int]) -> int:
    """Evaluate ``2*intermediate``-style expressions: names, integers, + - * // only.

    Raises KeyError for an unknown name and ValueError for anything else (a division by zero too:
    a size that cannot be computed is an error, not 0).
    """
    if isinstance(expr, int):
        return expr

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return int(dims[node.id])
        a, b = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.FloorDiv) and b == 0:
            raise ValueError(f"{clip(str(expr), 60)!r} divides by zero")
        return _EXPR_OPS[type(node.op)](a, b)

    return ev(_parse_expr(expr))
