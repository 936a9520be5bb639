"""Per-expert modules built over zero-copy views of the fused parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn


def linear_over(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are the given tensors (views stay views: no allocation, no copy).

    Built without ``nn.Linear.__init__`` so no throwaway weight is allocated and initialised:
    at 128 experts x 3 projections per layer that init would dominate the unfuse time.
    """
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.out_features, lin.in_features = weight.shape
    lin.weight = nn.Parameter(weight, requires_grad=requires_grad)
    lin.bias = nn.Parameter(bias, requires_grad=requires_grad) if bias is not None else None
    return lin


class ExpertMLP(nn.Module):
    """One expert: ``down(gate_fn(pack(gate(x), up(x))))``.

    ``pack`` writes gate and up side by side in the fused layout before gating, so the activation
    runs on the same memory layout as in the original module (CPU element-wise kernels round the
    last bits differently on a strided half than on a contiguous tensor).
    """

    def __init__(self, projections: dict[str, nn.Linear], pack: Callable, gate_fn: Callable):
        super().__init__()
        for name, lin in projections.items():
            self.add_module(name, lin)
        self._pack = pack
        self._gate_fn = gate_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_proj = self._modules.get("gate_proj")
        if gate_proj is not None:
            packed = self._pack((gate_proj(x), self.up_proj(x)))
        else:
            packed = self.up_proj(x)
        return self.down_proj(self._gate_fn(packed))


@dataclass
class UnfuseState:
    """What an unfused module remembers: its spec, the fused originals (for refuse), its forward."""

    spec: Any
    original_class: type
    num_experts: int
    originals: dict[str, nn.Parameter]
    forward_fn: Callable
    roles: tuple[tuple[str, str], ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Map the original forward's arguments to routing roles (hidden_states, top_k_index, ...)."""
        bound: dict[str, Any] = {}
        for i, (name, role) in enumerate(self.roles):
            if i < len(args):
                bound[role] = args[i]
            elif name in kwargs:
                bound[role] = kwargs[name]
            elif role in kwargs:
                bound[role] = kwargs[role]
        return bound


class UnfusedExpertsMixin:
    """Mixed in front of the original experts class: per-expert children ``0..E-1`` and a spec-driven forward.

    The module keeps its class identity (``isinstance(m, Gemma4TextExperts)`` holds) and its other
    attributes; its fused parameters are gone from ``parameters()`` and ``state_dict()``, which read
    ``{E}.gate_proj.weight``, ``{E}.up_proj.weight``, ``{E}.down_proj.weight``.
    """

    _moe_unfuse: UnfuseState

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._moe_unfuse.forward_fn(self, *args, **kwargs)

    def __len__(self) -> int:
        return self._moe_unfuse.num_experts

    def __iter__(self) -> Iterator[ExpertMLP]:
        return (self._modules[str(i)] for i in range(len(self)))

    def __getitem__(self, index: int | torch.Tensor) -> ExpertMLP:
        i = int(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"expert {i} out of range for {n} experts")
        return self._modules[str(i % n)]


_UNFUSED_CLASSES: dict[type, type] = {}


def unfused_class(cls: type) -> type:
    """``Unfused<Cls>``: the mixin in front of ``cls``; one class per original class."""
    if issubclass(cls, UnfusedExpertsMixin):
        return cls
    if cls not in _UNFUSED_CLASSES:
        _UNFUSED_CLASSES[cls] = type(f"Unfused{cls.__name__}", (UnfusedExpertsMixin, cls), {"__module__": __name__})
    return _UNFUSED_CLASSES[cls]
