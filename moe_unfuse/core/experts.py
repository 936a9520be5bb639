"""Per-expert modules built over zero-copy views of the fused parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..base.kinds import attr_path
from .plan import build_gate


def _upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` keeping the stride order of ``t`` even for a strided slice (``.to`` would
    make a gate/up half contiguous in the transposed order, and a GEMM on the other operand layout
    rounds differently from the original's upcast of the whole fused expert)."""
    if t.dtype == dtype:
        return t
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    inverse = sorted(range(t.dim()), key=lambda d: order[d])
    return t.permute(order).to(dtype).permute(inverse)


class LinearExact(nn.Linear):
    """An ``nn.Linear`` that repeats an original's numerics where plain ``F.linear`` would not.

    ``bias_after``: ``F.linear(x, W) + b`` instead of ``F.linear(x, W, b)``; the original writes
    ``x @ W + b`` (GPT-OSS), and the fused addmm adds the bias inside the GEMM, rounding once
    instead of twice (measured: differs in the last bits in fp32 and bf16). ``compute_dtype``: upcast input, weight and
    bias first, as OpenAI Privacy Filter does. Still an ``nn.Linear`` for quantizers and export
    (modelopt converts it through the backend's registration; see ``modelopt_backend``).
    """

    bias_after: bool = False
    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.compute_dtype is not None:
            x, weight = x.to(self.compute_dtype), _upcast(weight, self.compute_dtype)
            bias = bias.to(self.compute_dtype) if bias is not None else None
        if bias is None or not self.bias_after:
            return nn.functional.linear(x, weight, bias)
        return nn.functional.linear(x, weight) + bias

    def extra_repr(self) -> str:
        extra = f", bias_after={self.bias_after}" if self.bias_after else ""
        extra += f", compute_dtype={self.compute_dtype}" if self.compute_dtype is not None else ""
        return super().extra_repr() + extra


_MODULE_STATE = nn.Module().__dict__


def global_forward_hooks() -> bool:
    """Whether a global module forward hook is registered (``nn.modules.module.register_module_forward_hook``)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def blank_module(cls: type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` with a fresh, empty ``nn.Module`` state and no ``__init__`` run.

    ``nn.Module.__init__`` and ``__setattr__`` cost ~80 us per module; a 128-expert layer makes
    512 modules, which would blow the 30 ms per-layer unfuse budget. Containers are recreated by
    type from a template, so state that later torch versions add is carried over too.
    """
    obj = cls.__new__(cls)
    obj.__dict__.update({k: type(v)() if isinstance(v, (dict, set, list)) else v for k, v in _MODULE_STATE.items()})
    return obj


def linear_over(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    requires_grad: bool,
    bias_after: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are the given tensors (views stay views: no allocation, no copy).

    Built without ``nn.Linear.__init__`` so no throwaway weight is allocated and initialised:
    at 128 experts x 3 projections per layer that init would dominate the unfuse time.
    A :class:`LinearExact` when the spec's ``linear`` numerics differ from plain ``F.linear``.
    """
    exact = (bias_after and bias is not None) or compute_dtype is not None
    cls = LinearExact if exact else nn.Linear
    lin = blank_module(cls)
    lin.out_features, lin.in_features = weight.shape
    lin._parameters["weight"] = nn.Parameter(weight, requires_grad=requires_grad)
    lin._parameters["bias"] = nn.Parameter(bias, requires_grad=requires_grad) if bias is not None else None
    if exact:
        lin.bias_after, lin.compute_dtype = bias_after, compute_dtype
    return lin


class ExpertMLP(nn.Module):
    """One expert: ``down(gate_fn(pack(gate(x), up(x))))``.

    ``pack`` writes gate and up side by side in the fused layout before gating, so the activation
    runs on the same memory layout as in the original module (CPU element-wise kernels round the
    last bits differently on a strided half than on a contiguous tensor).
    """

    @classmethod
    def build(
        cls,
        projections: dict[str, nn.Linear],
        pack: Callable | None,
        gate_fn: Callable,
        packed_weight: torch.Tensor | None = None,
    ) -> "ExpertMLP":
        """Same as the constructor, without ``nn.Module.__init__`` (see :func:`blank_module`).

        ``packed_weight``: this expert's ``[gate; up]`` block of the fused tensor (a view), used by
        :meth:`_packed_gate_up` to skip the split GEMMs when nothing could tell the difference.
        """
        mlp = blank_module(cls)
        mlp._modules.update(projections)
        mlp.__dict__["_pack"] = pack
        mlp.__dict__["_gate_fn"] = gate_fn
        mlp.__dict__["_packed_weight"] = packed_weight
        return mlp

    def _packed_gate_up(self) -> torch.Tensor | None:
        """The fused ``[gate; up]`` weight when one GEMM on it is indistinguishable from the two child
        linears: both are plain ``nn.Linear`` with no hooks, their weights still view that block
        (not replaced, cast or moved), and no gradient is wanted. It is then the original's own
        GEMM, so the unfused forward costs what the fused one does; a quantizer's linears, a hook
        or training take the per-projection path.
        """
        w = self.__dict__.get("_packed_weight")
        if w is None:
            return None
        gate, up = self._modules["gate_proj"], self._modules["up_proj"]
        if type(gate) is not nn.Linear or type(up) is not nn.Linear:
            return None
        if (
            any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in (gate, up))
            or global_forward_hooks()
        ):
            return None  # someone observes the linears (calibration hooks, accelerate's patched forward)
        gw, uw = gate.weight, up.weight
        if torch.is_grad_enabled() and (gw.requires_grad or uw.requires_grad):
            return None
        step = gw.shape[0] * w.stride(0) * w.element_size()
        if (
            gw.data_ptr() != w.data_ptr()
            or uw.data_ptr() != w.data_ptr() + step
            or gw.dtype != w.dtype
            or gw.stride() != w.stride()
            or uw.stride() != w.stride()
        ):
            return None
        return w

    def packed(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``pack(gate(x), up(x))`` (or ``up(x)`` alone): the gate function's input."""
        gate_proj = self._modules.get("gate_proj")
        if gate_proj is None:
            return self.up_proj(x)
        fused = self._packed_gate_up()
        if fused is not None:
            return nn.functional.linear(x, fused)
        shared = self.__dict__.get("_gate_up")
        if shared is not None and (pair := shared(gate_proj, self.up_proj, x)) is not None:
            return self._pack(pair)
        return self._pack((gate_proj(x), self.up_proj(x)))

    def share_gate_up(self, fn: Callable[[nn.Module, nn.Module, torch.Tensor], tuple | None] | None) -> None:
        """Let a backend compute gate and up together: ``fn(gate, up, x)`` returns ``(gate(x), up(x))``,
        or None for the usual two calls. Both read the same input, so a quantizing backend can
        fake-quantize it once (:func:`moe_unfuse.quant.fastquant.gate_up`)."""
        self.__dict__["_gate_up"] = fn

    def gate(self, packed: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The gate function; element-wise, so it also takes every expert's ``packed`` stacked
        (:func:`stack_packed`), as forwards of batched originals apply it."""
        return self._gate_fn(packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate(self.packed(x)))

    def __getstate__(self) -> dict[str, Any]:
        # The gate is a closure over the experts module (not picklable); the unfused experts
        # module rebuilds it from its spec when it is unpickled or deep-copied.
        state = dict(self.__dict__)
        state["_gate_fn"] = None
        return state


def stack_packed(items: list[torch.Tensor | tuple[torch.Tensor, ...]]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Stack per-expert ``packed`` values on a new leading expert axis.

    A batched original (``torch.bmm`` over ``[E, T, H]``) gates its ``[E, T, 2I]`` output in one
    element-wise call. CPU kernels vectorize over the flattened tensor and compute the remainder
    with scalar code that rounds differently, so gating each expert's ``[T, 2I]`` alone differs in
    the last bits wherever a per-expert tail falls; gating the stack repeats the original exactly.
    """
    if isinstance(items[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*items))
    return torch.stack(items)


class ExpertProjection(nn.Module):
    """One expert of a per-projection expert bank (JetMoE's ParallelExperts): a single ``linear``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@dataclass
class UnfuseState:
    """What an unfused module remembers: its spec, the fused originals (for fuse), its forward."""

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


def unfuse_state(module: nn.Module) -> UnfuseState:
    """An unfused experts module's :class:`UnfuseState` (spec, expert count, fused originals, the
    forward kind's prepared options): the public way for forward kinds, backends and tools to read it."""
    return module.__dict__["_moe_unfuse"]


class UnfusedExpertsMixin:
    """Mixed in front of the original experts class: per-expert children ``0..E-1`` and a spec-driven forward.

    The module keeps its class identity (``isinstance(m, Gemma4TextExperts)`` holds) and its other
    attributes; its fused parameters are gone from ``parameters()`` and ``state_dict()``, which read
    ``{E}.gate_proj.weight``, ``{E}.up_proj.weight``, ``{E}.down_proj.weight``.
    """

    _moe_unfuse: UnfuseState

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._moe_unfuse.forward_fn(self, *args, **kwargs)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # ``Unfused<Cls>`` is made at run time, so pickle cannot find it by name: rebuild it from
        # the original class (pickle, torch.save of a whole model, copy.deepcopy).
        return (_rebuild_unfused, (self._moe_unfuse.original_class,), self.__getstate__())

    def __setstate__(self, state: dict[str, Any]) -> None:

        super().__setstate__(state)
        gate_fn, _ = build_gate(self, self._moe_unfuse.spec)
        for expert in self._modules.values():
            if isinstance(expert, ExpertMLP):
                expert.__dict__["_gate_fn"] = gate_fn

    def __len__(self) -> int:
        return self._moe_unfuse.num_experts

    def __iter__(self) -> Iterator[ExpertMLP | ExpertProjection]:
        return (self._modules[str(i)] for i in range(len(self)))

    def __getitem__(self, index: int | torch.Tensor) -> ExpertMLP | ExpertProjection:
        i = int(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"expert {i} out of range for {n} experts")
        return self._modules[str(i % n)]


def post_expert_norm(module: nn.Module) -> Callable | None:
    """The spec's ``post_expert_norm`` module of an unfused experts module (MuseSpark), or None.

    Looked up on every call rather than captured at unfuse time, so it stays the module's own child
    (moved, hooked or replaced with the module) and is never duplicated under each expert.
    """
    attr = unfuse_state(module).spec.post_expert_norm
    return None if attr is None else attr_path(module, attr)


_UNFUSED_CLASSES: dict[type, type] = {}


def _rebuild_unfused(original_class: type) -> nn.Module:
    """An empty ``Unfused<original_class>`` for pickle to fill (see ``UnfusedExpertsMixin.__reduce_ex__``)."""
    cls = unfused_class(original_class)
    return cls.__new__(cls)


def unfused_class(cls: type) -> type:
    """``Unfused<Cls>``: the mixin in front of ``cls``; one class per original class."""
    if issubclass(cls, UnfusedExpertsMixin):
        return cls
    if cls not in _UNFUSED_CLASSES:
        _UNFUSED_CLASSES[cls] = type(f"Unfused{cls.__name__}", (UnfusedExpertsMixin, cls), {"__module__": __name__})
    return _UNFUSED_CLASSES[cls]


def unfused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) for every unfused experts module (plain ``unfuse`` or modelopt-converted)."""

    return [(name, m) for name, m in model.named_modules() if isinstance(m, UnfusedExpertsMixin)]
