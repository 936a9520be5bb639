"""Per-expert weight quantization computed once, not on every forward (modelopt backend).

modelopt's ``QuantLinear`` runs its weight quantizer on every call: during max calibration it
reduces the whole weight to its amax again (already collected by the weight-only pass), and in a
fake-quant forward it fake-quantizes the whole weight again. Expert weights do not change while
calibrating or evaluating, and an experts layer has ``3 * num_experts`` of them, so this repeated
work is most of the cost over an eager forward.

:func:`quantized_weight` replaces ``QuantLinearConvBase._get_quantized_weight`` as the ``weight``
dynamic-attribute callback of the per-expert linears (only theirs: see :func:`install`). It calls
the weight quantizer exactly as modelopt does, and reuses the result when nothing it depends on
changed:

* calibration (max calibrator, quantizing off): the collect is skipped when this quantizer's
  calibrator still holds the very amax tensor it produced after seeing this weight (``max`` of a
  tensor with itself changes nothing), so calibrated amax is bit-identical;
* fake quant: the output is reused while the weight (storage, version counter, a fingerprint of
  sampled values) and every attribute and buffer of the quantizer (compared by value: modelopt
  writes amax through ``.data``, which bumps no version counter) are what they were when it was
  computed, and the call that computed it left the quantizer unchanged.

Never cached: weights an accelerate hook materializes per call (offload: keeping them would keep
them resident), meta weights, weights that need a gradient, a quantizer with hooks or of another
type than a plain ``TensorQuantizer``, ``torch.export``/ONNX export. Fake-quant outputs stay within
``CACHE_BYTES`` (first come, kept: no eviction churn when a model does not fit). ``MOE_UNFUSE_FAST=0``
or :func:`disabled` turns every fast path off (the reference for the equivalence tests).
"""

from __future__ import annotations

import copy
import os
import types
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

ENABLED: bool = os.environ.get("MOE_UNFUSE_FAST", "1").lower() not in ("0", "false", "no", "off")
CACHE_BYTES: int = int(os.environ.get("MOE_UNFUSE_WEIGHT_CACHE_BYTES", str(4 << 30)))

_VALUE_NUMEL = 1 << 20  # quantizer tensors up to this size are compared by value
_FINGERPRINT = 8  # sampled rows and columns of a weight: catches edits through ``.data``


@contextmanager
def disabled() -> Iterator[None]:
    """Every fast path off inside the block (what modelopt alone computes)."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before


class _Entry:
    """What one weight quantizer last computed on its weight."""

    __slots__ = ("weight", "fingerprint", "calib", "state", "out", "release", "__weakref__")

    def __init__(self) -> None:
        self.weight: tuple | None = None
        self.fingerprint: torch.Tensor | None = None
        self.calib: tuple[Any, torch.Tensor] | None = None  # (calibrator, the amax it held after our collect)
        self.state: tuple[list, list[torch.Tensor]] | None = None
        self.out: torch.Tensor | None = None
        self.release: weakref.finalize | None = None


_entries: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()
_cached_bytes = 0


def _release(nbytes: int) -> None:
    global _cached_bytes
    _cached_bytes -= nbytes


def cached_bytes() -> int:
    """Bytes of fake-quantized weights currently held."""
    return _cached_bytes


def clear() -> None:
    """Drop every cached result (after editing weights in a way no version counter sees)."""
    for entry in list(_entries.values()):
        _drop_out(entry)
    _entries.clear()


def _drop_out(entry: _Entry) -> None:
    if entry.release is not None:
        entry.release()  # runs once: gives the bytes back
    entry.out = entry.release = entry.state = None


def _weight_key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight._version, weight.shape, weight.stride(), weight.dtype, weight.device)


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A few sampled values (a view's rows and columns): in-place writes through ``.data`` bump no
    version counter, but rewriting a weight changes these."""
    index = tuple(slice(None, None, max(1, n // _FINGERPRINT)) for n in weight.shape)
    return weight[index].clone()


def _same_weight(entry: _Entry, weight: torch.Tensor) -> bool:
    return (
        entry.weight == _weight_key(weight)
        and entry.fingerprint is not None
        and torch.equal(entry.fingerprint, _fingerprint(weight))
    )


_MODULE_INTERNALS = frozenset(
    k for k in nn.Module().__dict__ if k.endswith(("hooks", "hook", "_hooks_with_kwargs", "_always_called"))
) | {"_modules", "_non_persistent_buffers_set"}


def _snapshot(quantizer: nn.Module, skip: frozenset[str] = frozenset()) -> tuple[list, list[torch.Tensor]]:
    """Everything a quantizer's forward reads: its attributes, buffers and parameters (but ``skip``).
    Plain values first (compared with ``==`` in one go), tensors apart (compared by value: modelopt
    writes amax through ``.data``, which bumps no version counter; a huge one by identity and version)."""
    plain: list = []
    tensors: list[torch.Tensor] = []

    def tensor(t: torch.Tensor | None) -> Any:
        if t is None:
            return None
        if t.numel() > _VALUE_NUMEL:
            return ("r", id(t), t._version, t.data_ptr())
        tensors.append(t.detach().clone())
        return ("v", t.dtype, t.shape, t.device)

    for k, v in quantizer.__dict__.items():
        if k in _MODULE_INTERNALS or k in skip:
            continue
        if k in ("_buffers", "_parameters"):
            plain.append((k, [(n, tensor(t)) for n, t in v.items()]))
        elif isinstance(v, torch.Tensor):
            plain.append((k, tensor(v)))
        elif v is None or isinstance(v, (bool, int, float, str, tuple, frozenset)):
            plain.append((k, v))
        elif isinstance(v, (dict, list, set)):
            plain.append((k, copy.deepcopy(v)))
        else:
            plain.append((k, ("id", id(v))))
    return plain, tensors


def _same(a: tuple[list, list[torch.Tensor]], b: tuple[list, list[torch.Tensor]]) -> bool:
    try:
        if a[0] != b[0]:
            return False
    except (RuntimeError, TypeError, ValueError):  # a tensor inside a dict: no reliable equality
        return False
    return all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _cacheable(module: nn.Module, quantizer: nn.Module, weight: torch.Tensor) -> bool:
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.utils import is_torch_export_mode

    from ..core.experts import global_forward_hooks

    return (
        ENABLED
        and type(quantizer) is TensorQuantizer
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.device.type != "meta"
        and "_hf_hook" not in module.__dict__  # accelerate materializes the weight per call: keep nothing
        and not (weight.requires_grad and torch.is_grad_enabled())
        and not quantizer._forward_pre_hooks
        and all(h is _record_collect for h in quantizer._forward_hooks.values())
        and not global_forward_hooks()
        and not is_torch_export_mode()
        and not torch.compiler.is_compiling()
        and not _in_onnx_export()
    )


def _in_onnx_export() -> bool:
    from modelopt.torch.quantization.nn.modules import tensor_quantizer

    globals_ = getattr(tensor_quantizer, "GLOBALS", None)
    return bool(getattr(globals_, "in_onnx_export", False))


def _plain_max_calibration(quantizer: Any) -> bool:
    """Calibrating with a max calibrator and nothing else: the forward collects and returns its input."""
    from modelopt.torch.quantization.calib import MaxCalibrator

    calibrator = getattr(quantizer, "_calibrator", None)
    return (
        quantizer._if_calib
        and not quantizer._if_quant
        and not quantizer._disabled
        and not quantizer._dynamic
        and type(calibrator) is MaxCalibrator
        and not calibrator._track_amax
        and quantizer.pre_quant_scale is None
        and quantizer.block_sizes is None
        and not quantizer.rotate_is_enabled
        and not getattr(quantizer, "rotate_back_is_enabled", False)
    )


def quantize_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``module.weight_quantizer(weight)``, reusing what it computed on the same weight before."""
    quantizer = module.weight_quantizer
    if not _cacheable(module, quantizer, weight) or weight.numel() == 0:
        return quantizer(weight)
    entry = _entries.get(quantizer)
    if _plain_max_calibration(quantizer):
        calibrator = quantizer._calibrator
        if (
            entry is not None
            and entry.calib is not None
            and entry.calib[0] is calibrator
            and calibrator._calib_amax is entry.calib[1]
            and _same_weight(entry, weight)
        ):
            return weight  # this weight's max is already in the calibrator: collecting it again changes nothing
        out = quantizer(weight)
        entry = _entry_for(quantizer, entry, weight)
        entry.calib = (calibrator, calibrator._calib_amax)
        return out
    if not (quantizer._if_quant and quantizer.fake_quant and not quantizer._if_calib):
        return quantizer(weight)
    state = _snapshot(quantizer)
    if entry is not None and entry.out is not None and _same_weight(entry, weight) and _same(entry.state, state):
        return entry.out
    out = quantizer(weight)
    if out is weight or out.data_ptr() == weight.data_ptr() or not _same(state, _snapshot(quantizer)):
        return out  # nothing to save, or the call changed the quantizer: the next one may differ
    nbytes = out.numel() * out.element_size()
    entry = _entry_for(quantizer, entry, weight)
    _drop_out(entry)
    if _cached_bytes + nbytes <= CACHE_BYTES:
        _keep_out(entry, out.detach(), state, nbytes)
    return out


def _entry_for(quantizer: nn.Module, entry: _Entry | None, weight: torch.Tensor) -> _Entry:
    """The quantizer's entry, reset when the weight is not the one it describes."""
    if entry is None:
        entry = _entries[quantizer] = _Entry()
    if not _same_weight(entry, weight):
        _drop_out(entry)
        entry.calib = None
        entry.weight, entry.fingerprint = _weight_key(weight), _fingerprint(weight)
    return entry


def _keep_out(entry: _Entry, out: torch.Tensor, state: tuple, nbytes: int) -> None:
    global _cached_bytes
    _cached_bytes += nbytes
    entry.out, entry.state = out, state
    entry.release = weakref.finalize(entry, _release, nbytes)


def quantized_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The ``weight`` dynamic-attribute callback of a per-expert ``QuantLinear``: modelopt's
    ``_get_quantized_weight`` with the weight quantizer's result reused (:func:`quantize_weight`)."""
    from modelopt.torch.quantization.utils import is_torch_export_mode

    if module._enable_weight_quantization or is_torch_export_mode():
        return quantize_weight(module, weight)
    return weight


#: What a fake-quantizing input quantizer's forward does not read: its calibrator (each has its own).
_NOT_READ_QUANTIZING = frozenset({"_calibrator"})


def gate_up(gate: nn.Module, up: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(gate(x), up(x))`` for one expert's two ``QuantLinear`` s, with their common input
    fake-quantized once instead of twice: when both input quantizers are fake-quantizing and equal in
    every value their forward reads (calibrated on the same tokens, they are), the two results are the
    same tensor. Everything else is what modelopt's ``QuantLinear.forward`` runs (weight quantization on,
    ``F.linear``, the output quantizer), so the outputs are bit for bit modelopt's. None (the usual two
    calls) whenever anything could differ: calibrating, hooks, a patched forward, real-quant GEMMs,
    SVDQuant, export or compile, quantizers of another type or state."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.utils import is_torch_export_mode

    from ..core.experts import global_forward_hooks

    if not (ENABLED and _direct(gate) and _direct(up)):
        return None
    a, b = gate.input_quantizer, up.input_quantizer
    if (
        type(a) is not TensorQuantizer
        or type(b) is not TensorQuantizer
        or a._if_calib
        or b._if_calib
        or a._disabled
        or not a._if_quant
        or a._forward_hooks
        or a._forward_pre_hooks
        or b._forward_hooks
        or b._forward_pre_hooks
        or global_forward_hooks()
        or is_torch_export_mode()
        or torch.compiler.is_compiling()
        or _in_onnx_export()
        or not _same(_snapshot(a, _NOT_READ_QUANTIZING), _snapshot(b, _NOT_READ_QUANTIZING))
    ):
        return None
    shared = a(x)
    return _quantized_linear(gate, shared), _quantized_linear(up, shared)


def _direct(linear: nn.Module) -> bool:
    """A per-expert ``QuantLinear`` whose forward is modelopt's plain one: input quantizer, weight
    through :func:`quantized_weight`, ``F.linear``, output quantizer, and nothing else."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    d = linear.__dict__
    holder = _modelopt_callback(linear)
    out = d["_modules"].get("output_quantizer")
    return (
        holder is not None
        and holder.callback is quantized_weight
        and type(linear) is _plain_quant_linear()
        and "forward" not in d
        and "_forward_pre_dm" not in d
        and "_hf_hook" not in d
        and not linear._forward_hooks
        and not linear._forward_pre_hooks
        and not getattr(linear, "_should_run_real_quant_gemm", False)
        and getattr(d["_modules"].get("weight_quantizer"), "svdquant_lora_a", None) is None
        and type(out) is TensorQuantizer
        and not out._forward_hooks
        and not out._forward_pre_hooks
    )


_PLAIN: list[type] = []


def _plain_quant_linear() -> type:
    """modelopt's ``QuantLinear`` class for ``nn.Linear`` itself (not for ``LinearExact``, whose forward differs)."""
    if not _PLAIN:
        from modelopt.torch.quantization.nn import QuantModuleRegistry

        _PLAIN.append(QuantModuleRegistry[nn.Linear])
    return _PLAIN[0]


def _quantized_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``QuantLinear.forward`` after its input quantizer: weight quantization on, the linear, the output quantizer."""
    linear._enable_weight_quantization = True  # what modelopt's quantize_weight() context does
    try:
        out = nn.functional.linear(x, linear.weight, linear.bias)
    finally:
        linear._enable_weight_quantization = False
    return linear.output_quantizer(out)


def _modelopt_callback(module: nn.Module) -> Any | None:
    """The callback object holding ``QuantLinearConvBase._get_quantized_weight`` for ``weight``, or None."""
    from modelopt.torch.quantization.nn.modules.quant_module import QuantLinearConvBase

    if not isinstance(module, QuantLinearConvBase):
        return None
    manager = module._get_dm_attribute_manager()
    level = manager._da_cb_all[-1] if manager._da_cb_all else {}
    holder = level.get("weight")
    func = getattr(holder, "callback", None)
    if func in (QuantLinearConvBase._get_quantized_weight, quantized_weight):
        return holder
    return None


def _record_collect(quantizer: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook on a per-expert weight quantizer: note the amax its calibrator holds once it has
    seen a weight, also when modelopt calls it directly (the weight-only pass of max calibration),
    so the calibration forward that follows skips collecting that weight again."""
    weight = args[0] if args else None
    if (
        ENABLED
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.device.type != "meta"
        and weight.numel()
        and _plain_max_calibration(quantizer)
    ):
        entry = _entry_for(quantizer, _entries.get(quantizer), weight)
        entry.calib = (quantizer._calibrator, quantizer._calibrator._calib_amax)


def install(model: nn.Module) -> int:
    """Give every per-expert ``QuantLinear`` of every unfused experts module the caching callback,
    and its weight quantizer the :func:`_record_collect` hook (not for accelerate-offloaded linears).

    Called by modelopt after it converts a model (a post-conversion plugin, so restores too); other
    linears keep modelopt's own. Returns how many linears were set up.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    from ..core.experts import ExpertMLP, UnfusedExpertsMixin

    count = 0
    for experts in model.modules():
        if not isinstance(experts, UnfusedExpertsMixin):
            continue
        for expert in experts.modules():
            if isinstance(expert, ExpertMLP):
                expert.share_gate_up(gate_up)
        for linear in experts.modules():
            holder = _modelopt_callback(linear)
            if holder is None:
                continue
            holder.callback = quantized_weight
            count += 1
            quantizer = linear.weight_quantizer
            if (
                type(quantizer) is TensorQuantizer
                and "_hf_hook" not in linear.__dict__
                and _record_collect not in quantizer._forward_hooks.values()
            ):
                quantizer.register_forward_hook(_record_collect)
    return count


_installed = False


def install_plugin() -> None:
    """Register :func:`install` with modelopt's post-conversion plugins (idempotent)."""
    global _installed
    if _installed:
        return
    from modelopt.torch.quantization.plugins.custom import CUSTOM_POST_CONVERSION_PLUGINS

    CUSTOM_POST_CONVERSION_PLUGINS.add(install)
    _installed = True


# ----------------------------------------------------------------------------------------------
# bulk conversion


_ATOMIC = (bool, int, float, complex, str, bytes, type, torch.dtype, torch.device, types.FunctionType)


def _atomic(value: Any) -> bool:
    return value is None or isinstance(value, _ATOMIC)


def _clone_value(value: Any) -> Any:
    """A copy of one attribute of a freshly converted module, sharing nothing mutable with it
    (``copy.deepcopy`` semantics; flat containers of plain values are copied directly, since a
    generic deepcopy of a quantizer's ~40 attributes would cost most of a conversion)."""
    if _atomic(value):
        return value
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, nn.Module):
        return _clone_module(value)
    kind = type(value)
    if kind in (dict, OrderedDict) and all(_atomic(k) and _atomic(v) for k, v in value.items()):
        return kind(value)
    if kind in (list, set, frozenset, tuple) and all(_atomic(v) for v in value):
        return value if kind in (tuple, frozenset) else kind(value)
    return copy.deepcopy(value)


def _clone_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of a fresh quantizer, without deepcopy's generic per-object overhead."""
    clone = object.__new__(type(module))
    for k, v in module.__dict__.items():
        if k in ("_parameters", "_buffers", "_modules"):
            clone.__dict__[k] = type(v)((n, _clone_value(t)) for n, t in v.items())
        else:
            clone.__dict__[k] = _clone_value(v)
    return clone


def _plain(linear: nn.Module) -> bool:
    """A per-expert linear as :func:`~moe_unfuse.core.experts.linear_over` built it: nothing attached."""
    d = linear.__dict__
    return (
        not d["_modules"]
        and not d["_buffers"]
        and "forward" not in d
        and "_hf_hook" not in d
        and not any(d[k] for k in _MODULE_INTERNALS if k in d and k.endswith(("hooks", "_hooks_with_kwargs")))
    )


def convert_linears(linears: list[nn.Module]) -> int:
    """Convert per-expert linears to modelopt ``QuantLinear`` s in bulk, in place, before modelopt's
    recursive replacement reaches them (it then finds them converted and leaves them).

    The first plain linear of each (class, attribute set) is converted by modelopt itself; the others
    take a copy of what that conversion added (quantizers, attribute manager, parallel state, class)
    over their own parameters. A conversion costs ~1 ms per linear in Python (three quantizers, each
    set up from a config); a copy a fraction of it. Linears with hooks or a patched forward
    (accelerate offload) are left for modelopt. Returns how many were copied.
    """
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.nn.modules.quant_linear import _QuantLinear
    from modelopt.torch.utils.distributed import ParallelState

    if not ENABLED:
        return 0
    protos: dict[tuple, tuple[nn.Module, frozenset]] = {}
    copied = 0
    for linear in linears:
        if not isinstance(linear, nn.Linear) or type(linear) not in QuantModuleRegistry or not _plain(linear):
            continue
        key = (type(linear), frozenset(linear.__dict__))
        proto = protos.get(key)
        if proto is None:
            before = frozenset(linear.__dict__)
            QuantModuleRegistry.convert(linear)
            if isinstance(linear, _QuantLinear) and type(linear.__dict__.get("_parallel_state")) is ParallelState:
                protos[key] = (linear, before)
            else:
                protos[key] = (None, before)  # not modelopt's plain QuantLinear: convert each as usual
            continue
        source, before = proto
        if source is None:
            continue
        added = {k: _clone_value(v) for k, v in source.__dict__.items() if k not in before}
        added["_parallel_state"] = ParallelState(data_parallel_group=None)  # as QuantModule.convert makes
        modules = type(source._modules)((n, _clone_module(m)) for n, m in source._modules.items())
        linear.__class__ = type(source)
        linear.__dict__.update(added)
        linear.__dict__["_modules"] = modules
        copied += 1
    return copied
