"""Layout ops: fused parameter <-> per-expert 2-D weights, each op with its exact reverse.

Every ``apply`` returns views of its input (zero-copy); every ``reverse`` rebuilds the fused
layout from the pieces. A :class:`Layout` chains them, so unfusing and re-fusing are one
description read in both directions (the same idea as transformers' ``core_model_loading`` ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

# A layout is described without torch (a spec is validated by building its layout: ``moe-unfuse list``
# imports no torch); the ops that make a tensor import it, when the tensors they get have loaded it.


@dataclass(frozen=True)
class Unflatten:
    """``[E*O, I] -> [E, O, I]``: DBRX-style parameters that flatten the expert axis away."""

    axis: int
    sizes: tuple[int, int]

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(self.axis, self.sizes)

    def reverse(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(self.axis, self.axis + 1)


@dataclass(frozen=True)
class Narrow:
    """Keep the first ``length`` entries of ``axis``: Longcat allocates gate_up_proj rows for its zero
    (identity) experts that the forward never reads. The rest is set aside, and the reverse appends it."""

    axis: int
    length: int

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(self.axis, 0, self.length)

    def rest(self, t: torch.Tensor) -> torch.Tensor:
        return t.narrow(self.axis, self.length, t.shape[self.axis] - self.length)

    def reverse(self, t: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([t, rest.to(device=t.device, dtype=t.dtype)], self.axis)


@dataclass(frozen=True)
class Transpose:
    """Swap two axes; used for ``[E, in, out]`` weights so each expert reads as ``[out, in]``."""

    dim0: int
    dim1: int

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(self.dim0, self.dim1)

    def reverse(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(self.dim0, self.dim1)


@dataclass(frozen=True)
class Split:
    """Cut one axis into ``parts`` equal pieces, either as blocks or every ``parts``-th row.

    ``separate`` is the degenerate case of two projections held in two tensors (DBRX w1/v1, Inkling's
    shared gate_proj/up_proj): the "packed" value is the pair itself, so each half is gated exactly
    where the original computed it, on its own contiguous tensor.
    """

    axis: int
    parts: int
    packing: str = "concatenated"

    def check(self, size: int) -> str | None:
        """Why ``size`` cannot be split, or None."""
        if size % self.parts:
            return f"axis of size {size} does not split into {self.parts} equal parts"
        return None

    def apply(self, t: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.packing == "separate":
            return tuple(t)
        if self.parts == 1:
            return (t,)
        if self.packing == "concatenated":
            return t.chunk(self.parts, self.axis)
        axis = self.axis % t.dim()
        grouped = t.unflatten(axis, (-1, self.parts))
        return tuple(grouped.select(axis + 1, i) for i in range(self.parts))

    def reverse(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        import torch

        if self.packing == "separate":
            return tuple(pieces)
        if len(pieces) == 1:
            return pieces[0]
        if self.packing == "concatenated":
            return torch.cat(list(pieces), self.axis)
        axis = self.axis % pieces[0].dim()
        return torch.stack(list(pieces), axis + 1).flatten(axis, axis + 1)


@dataclass(frozen=True)
class Unbind:
    """One view per expert along the expert axis."""

    axis: int = 0

    def apply(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return t.unbind(self.axis)

    def reverse(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.stack(list(pieces), self.axis)


@dataclass(frozen=True)
class Layout:
    """How one fused tensor becomes ``parts[k][expert]`` 2-D tensors in ``[out, in]`` (or ``[out]``) form."""

    prepare: tuple[Unflatten | Narrow | Transpose, ...]
    split: Split
    unbind: Unbind = Unbind(0)

    def unfuse(self, fused: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
        t = fused
        for op in self.prepare:
            t = op.apply(t)
        return tuple(self.unbind.apply(part) for part in self.split.apply(t))

    def rest(self, fused: torch.Tensor) -> torch.Tensor | None:
        """The part a :class:`Narrow` sets aside (a view of ``fused``), or None when nothing is."""
        t = fused
        for op in self.prepare:
            if isinstance(op, Narrow):
                return op.rest(t)
            t = op.apply(t)
        return None

    def refuse(self, per_expert: Sequence[Sequence[torch.Tensor]], rest: torch.Tensor | None = None) -> torch.Tensor:
        t = self.split.reverse([self.unbind.reverse(experts) for experts in per_expert])
        for op in reversed(self.prepare):
            if isinstance(op, Narrow):
                if rest is None:
                    raise ValueError("this layout sets rows aside; refuse needs them (rest=...)")
                t = op.reverse(t, rest)
            else:
                t = op.reverse(t)
        return t.contiguous()

    def aliases(self, fused: torch.Tensor, per_expert: Sequence[Sequence[torch.Tensor]]) -> bool:
        """True when every piece is still exactly the view ``unfuse(fused)`` made (nothing replaced)."""
        expected = self.unfuse(fused)
        return all(
            a.data_ptr() == b.data_ptr()
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.dtype == b.dtype
            and a.device == b.device
            for exp_part, got_part in zip(expected, per_expert, strict=True)
            for a, b in zip(exp_part, got_part, strict=True)
        )


def layout_for(
    axes: Sequence[str], parts: int, packing: str, sizes: dict[str, int] | None = None, extra_experts: bool = False
) -> Layout:
    """Build the op chain for a parameter whose axes are named ``expert``, ``out``, ``in``.

    A first axis ``expert*out`` or ``expert*in`` is a flattened expert axis (DBRX).

    ``sizes`` gives ``expert`` for flattened layouts. Bias parameters use axes ``[expert, out]``.
    ``extra_experts``: the expert axis holds rows after the ``sizes["expert"]`` experts, set aside.
    """
    prepare: list[Unflatten | Narrow | Transpose] = []
    names = list(axes)
    if names and names[0].startswith("expert*"):
        if not sizes or "expert" not in sizes:
            raise ValueError(f"a flattened {names[0]!r} axis needs the expert count")
        prepare.append(Unflatten(0, (sizes["expert"], -1)))
        names = ["expert", names[0].split("*", 1)[1], *names[1:]]
    if names[0] != "expert":
        raise ValueError(f"the expert axis must come first, got {list(axes)}")
    if extra_experts:
        if not sizes or "expert" not in sizes or len(prepare):
            raise ValueError("extra expert rows need the expert count and an unflattened expert axis")
        prepare.append(Narrow(0, sizes["expert"]))
    if names == ["expert", "in", "out"]:
        prepare.append(Transpose(1, 2))
        names = ["expert", "out", "in"]
    if names not in (["expert", "out", "in"], ["expert", "out"]):
        raise ValueError(f"unsupported axes {list(axes)}")
    return Layout(tuple(prepare), Split(1, parts, packing))
