"""accelerate CPU/disk offload: per-expert linears read their weights from the experts module's hook.

With offload, accelerate keeps each fused tensor in the experts module's ``AlignDevicesHook``
``weights_map`` (keyed by parameter name, e.g. ``gate_up_proj``) and leaves a meta tensor on the
module. Once unfused, those names are gone from the module, so that hook loads nothing and the
per-expert linears would compute on meta tensors. Each per-expert linear therefore gets its own
offload hook whose weights map reads *one expert's slice* of the fused tensor through the spec's
layout ops: a zero-copy view of a CPU-resident tensor, or only that expert's bytes of a
disk-offloaded one. Nothing is loaded while unfusing, and a forward holds one projection at a time.
Writes (modelopt's writeback after weight calibration) go through to the fused tensor, so the
hook's map stays the single source of truth and ``refuse`` just restores the fused meta parameters
(unless the hooks were removed meanwhile: then the materialized experts are fused back as usual).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base.layout import Layout
from ..spec.model import Spec


@dataclass(frozen=True)
class _Slice:
    """Where one per-expert tensor lives: rows ``[start, stop)`` of ``source[key]``, then ``layout`` part ``part``."""

    source: Mapping
    key: str
    start: int
    stop: int
    layout: Layout
    part: int


def offload_hook(module: nn.Module) -> Any | None:
    """The module's accelerate ``AlignDevicesHook`` that offloads its weights, or None."""
    try:
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:  # accelerate is a dependency, but a missing one just means: no hooks
        return None
    hook = getattr(module, "_hf_hook", None)
    for h in hook.hooks if isinstance(hook, SequentialHook) else (hook,):
        if isinstance(h, AlignDevicesHook) and h.offload and h.weights_map is not None:
            return h
    return None


def set_execution_device(model: nn.Module, device: torch.device | str) -> None:
    """Make ``model``'s accelerate offload hooks compute on ``device``, as ``dispatch_model`` does for a
    ``main_device``: each hook's execution device, the buffers its ``init_hook`` placed there, and the
    offloaded-weights loader's device (safetensors tensors are then read straight onto it). transformers
    dispatches a model offloaded whole to disk with the CPU as main device; this moves it, on a CPU
    a no-op, so the layer-by-layer path is the same code on every device."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook
    from accelerate.utils import set_module_tensor_to_device
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    device = torch.device(device)
    loaders: dict[int, OffloadedWeightsLoader] = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in hook.hooks if isinstance(hook, SequentialHook) else (hook,):
            if not isinstance(h, AlignDevicesHook) or h.execution_device is None:
                continue
            h.execution_device = device
            store = h.weights_map
            while isinstance(store, PrefixedDataset):
                store = store.dataset
            if isinstance(store, OffloadedWeightsLoader):
                loaders[id(store)] = store
            resident = list(module.named_buffers(recurse=h.place_submodules))
            if not h.offload:
                resident += list(module.named_parameters(recurse=h.place_submodules))
            for name, tensor in resident:
                if tensor is not None and not tensor.is_meta and tensor.device != device:
                    set_module_tensor_to_device(module, name, device)
    for store in loaders.values():
        store.device = str(device)  # safetensors takes a device name


def _resolve(source: Mapping, key: str) -> tuple[Mapping, str]:
    """Unwrap accelerate's ``PrefixedDataset`` layers down to the real store and its full key."""
    from accelerate.utils.offload import PrefixedDataset

    while isinstance(source, PrefixedDataset):
        key, source = source.prefix + key, source.dataset
    return source, key


def _on_disk(store: Mapping, key: str) -> bool:
    from accelerate.utils.offload import OffloadedWeightsLoader

    return isinstance(store, OffloadedWeightsLoader) and key not in store.state_dict and key in store.index


def _holds(source: Mapping, key: str) -> bool:
    """``key in source`` without loading it (Mapping's default ``in`` reads the tensor)."""
    from accelerate.utils.offload import OffloadedWeightsLoader

    store, full = _resolve(source, key)
    if isinstance(store, OffloadedWeightsLoader):
        return full in store.state_dict or full in store.index
    return full in store


def _read_rows(source: Mapping, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a stored tensor, reading only those bytes when it is on disk."""
    store, full = _resolve(source, key)
    if not _on_disk(store, full):
        return store[full][start:stop]
    info = store.index[full]
    if info.get("safetensors_file") is not None:
        from safetensors import safe_open

        with safe_open(info["safetensors_file"], framework="pt", device="cpu") as f:
            rows = f.get_slice(info.get("weight_name", full))[start:stop]
        if "dtype" in info:
            rows = rows.to(getattr(torch, info["dtype"]))
        return rows if store.device is None else rows.to(store.device)
    # a .dat memmap written by accelerate's offload_state_dict (bf16 stored as int16, fp8 as int8)
    import numpy as np

    dtype = info["dtype"]
    np_dtype = "int16" if dtype == "bfloat16" else "int8" if dtype.startswith("float8_") else dtype
    array = np.memmap(
        os.path.join(store.save_folder, f"{full}.dat"), dtype=np_dtype, shape=tuple(info["shape"]), mode="r"
    )
    rows = torch.from_numpy(np.array(array[start:stop]))
    return rows.view(getattr(torch, dtype)) if dtype == "bfloat16" or dtype.startswith("float8_") else rows


class ExpertSliceMap(Mapping):
    """The weights map of one per-expert linear: ``weight`` (and ``bias``) as slices of the fused tensors."""

    def __init__(self, slices: dict[str, _Slice]):
        self.slices = slices

    def __getitem__(self, name: str) -> torch.Tensor:
        s = self.slices[name]
        rows = _read_rows(s.source, s.key, s.start, s.stop)
        part = s.layout.unfuse(rows)[s.part][0]
        if _on_disk(*_resolve(s.source, s.key)) and part.is_contiguous() and part.numel() < rows.numel():
            # rows read from disk for this projection alone: keep only its part (gate's view would
            # otherwise hold up's rows too, doubling a materialized layer's gate/up memory)
            part = part.clone()
        return part

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        """Write through into the fused tensor.

        modelopt writes every materialized weight back after calibrating; an unchanged slice of a
        disk-offloaded tensor is skipped, a changed one moves that fused tensor into CPU memory
        (as modelopt's own writeback does for disk offload), so max calibration loads nothing whole.
        """
        s = self.slices[name]
        store, full = _resolve(s.source, s.key)
        if _on_disk(store, full):
            if torch.equal(self[name].cpu(), value.cpu()):
                return
            store.state_dict[full] = store[full]
        target = s.layout.unfuse(store[full][s.start : s.stop])[s.part][0]
        if target.data_ptr() != value.data_ptr():
            with torch.no_grad():
                target.copy_(value)

    def __contains__(self, name: object) -> bool:
        return name in self.slices

    def __iter__(self) -> Iterator[str]:
        return iter(self.slices)

    def __len__(self) -> int:
        return len(self.slices)


@dataclass(frozen=True)
class _Origin:
    """A fused parameter's offload hook, its key there, and the device accelerate restores it to on detach."""

    owner: nn.Module
    hook: Any
    key: str
    device: Any


def _origin(module: nn.Module, name: str) -> _Origin | None:
    """Where fused parameter ``name`` is offloaded (dotted names live in a submodule's hook), or None."""
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    hook = offload_hook(owner)
    if hook is None or not _holds(hook.weights_map, leaf):
        return None
    return _Origin(owner, hook, leaf, getattr(hook, "original_devices", {}).get(leaf))


def attach_expert_hooks(
    module: nn.Module, spec: Spec, num_experts: int, fused: Mapping[str, torch.Tensor]
) -> dict[str, _Origin] | None:
    """Give every per-expert linear of an offloaded ``module`` a hook reading its slice of the fused tensors.

    Call after the per-expert children exist and before the fused parameters' owners are detached.
    ``fused``: the fused parameters by (possibly dotted) name. Returns None, touching nothing, when
    accelerate does not offload them; else what :func:`release_expert_hooks` needs at refuse.

    The fused names leave their hook's ``original_devices`` (the module no longer has them, so a
    ``remove_hook_from_module`` would fail on them); the per-expert hooks take the device over,
    so removing the hooks materializes every expert where the fused tensor would have gone.
    """
    origins = {name: _origin(module, name) for name in fused}
    if not origins or any(o is None for o in origins.values()):
        return None
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for p in spec.params:
        rows = 1 if p.axes[0] == "expert" else fused[p.name].shape[0] // num_experts  # flattened: E*O rows
        w = origins[p.name]
        b = origins[p.bias] if p.bias else None
        for k, proj in enumerate(p.into):
            for e in range(num_experts):
                slices = {"weight": _Slice(w.hook.weights_map, w.key, e * rows, (e + 1) * rows, p.layout(1), k)}
                if b is not None:
                    slices["bias"] = _Slice(b.hook.weights_map, b.key, e, e + 1, p.bias_layout(), k)
                hook = AlignDevicesHook(
                    execution_device=w.hook.execution_device,
                    offload=True,
                    weights_map=ExpertSliceMap(slices),
                    offload_buffers=w.hook.offload_buffers,
                    skip_keys=w.hook.skip_keys,
                )
                add_hook_to_module(getattr(module._modules[str(e)], proj), hook)
                hook.original_devices = {
                    n: o.device for n, o in (("weight", w), ("bias", b)) if o is not None and o.device is not None
                }
    for o in origins.values():
        getattr(o.hook, "original_devices", {}).pop(o.key, None)
    return origins


def release_expert_hooks(origins: dict[str, _Origin] | None) -> bool:
    """At refuse: hand the fused names back to their offload hooks. True when those hooks are still
    attached (the values live in their weights maps, the fused parameters stay meta); False when
    they were removed meanwhile (the per-expert weights were materialized and hold the values)."""
    if not origins:
        return False
    if any(offload_hook(o.owner) is not o.hook for o in origins.values()):
        return False
    for o in origins.values():
        if o.device is not None:
            o.hook.original_devices[o.key] = o.device
    return True


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's device, or the device its offload hook runs it on
    (first device under a device_map)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    hook = offload_hook(emb) if isinstance(emb, nn.Module) else None
    if hook is not None and hook.execution_device is not None:
        return torch.device(hook.execution_device)
    hf_map = getattr(model, "hf_device_map", None) or {}
    for dev in hf_map.values():
        if isinstance(dev, int) or (isinstance(dev, str) and dev not in ("cpu", "disk")):
            return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return torch.device("cpu")
