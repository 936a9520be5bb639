"""Layer-by-layer quantization: peak memory of about one decoder layer, the whole-model path's checkpoint.

The model comes from transformers with every module offloaded to disk (:func:`load_offloaded`):
accelerate's hooks read a module's weights from the checkpoint's safetensors files (or from an
offload folder, where a load-time conversion rewrote them) only for that module's forward, and our
expert offload hooks read one expert's rows at a time (:mod:`moe_unfuse.core.offload`). modelopt's max
calibration runs over every quantizer exactly as in the whole-model path; only its forward loop
differs (:func:`calibrate_layerwise`): for each decoder layer in turn, the model's own forward runs
on each batch up to that layer, with the layers before it standing in by returning the previous
layer's cached outputs, so the parent computes everything it passes to a layer (masks, rotary
embeddings, per-layer inputs) as it always does; the layer's inputs are captured, the layer's
weights are loaded once (modelopt's ``persistent_materialization``: a module that reads a child's
weight directly, as LongCat's router does, sees it too), the layer is calibrated on its inputs
(token counts and forced routing as in the whole-model path), and its outputs are kept for the next
layer. Max calibration depends only on each quantizer's inputs, which are the same
tensors as in a whole-model pass, so every amax is identical. modelopt's ``export_hf_checkpoint``
then streams the offloaded model to disk one decoder layer at a time.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..base.errors import MoeUnfuseError
from ..base.memory import available_memory, release_free_memory
from .calibration import RoutingStats, calibrate
from .resume import ResumeState, load_calibration, save_calibration
from .streaming import decoder_layer_list, owner_children_materialized

#: Shard size of a layer-by-layer export: modelopt's streaming writer holds one shard in memory.
LAYERWISE_SHARD_SIZE = "256MB"


class _Stop(Exception):
    """Ends a capture forward once the layer being captured has its inputs."""


#: Bytes of cached layer inputs and outputs kept on the execution device when it is the CPU (a GPU
#: keeps a quarter of its free memory); ``MOE_UNFUSE_ACTIVATIONS_DEVICE_BYTES`` overrides either.
ACTIVATIONS_ON_CPU_DEVICE = 1 << 30
TIERS = ("device", "host", "disk")


@dataclass
class ActivationBudget:
    """Where one run's cached layer inputs and outputs go (calibration sets of thousands of long
    samples are tens of GB per layer): on the execution ``device`` up to ``device_bytes``, then in
    (pinned, when CUDA) host memory up to ``host_bytes``, then one file per batch under ``folder``.
    On a CPU both memory tiers are host memory; the code is the same on every device."""

    device: torch.device
    device_bytes: int
    host_bytes: int
    folder: Path
    used: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))

    @classmethod
    def default(cls, device: torch.device, folder: Path) -> "ActivationBudget":
        """A quarter of the GPU's free memory and a quarter of the host memory left (CUDA), or
        ``ACTIVATIONS_ON_CPU_DEVICE`` and nothing more in memory (CPU: both tiers are the same memory);
        ``MOE_UNFUSE_ACTIVATIONS_DEVICE_BYTES`` / ``MOE_UNFUSE_ACTIVATIONS_HOST_BYTES`` override them."""
        if device.type == "cuda":
            on_device, on_host = torch.cuda.mem_get_info(device)[0] // 4, available_memory() // 4
        else:
            on_device, on_host = ACTIVATIONS_ON_CPU_DEVICE, 0
        on_device = int(os.environ.get("MOE_UNFUSE_ACTIVATIONS_DEVICE_BYTES", on_device))
        on_host = int(os.environ.get("MOE_UNFUSE_ACTIVATIONS_HOST_BYTES", on_host))
        return cls(device, on_device, on_host, folder)

    def take(self, size: int) -> str:
        """The tier a value of ``size`` bytes goes to (its bytes counted there until :meth:`give`)."""
        for tier, room in (("device", self.device_bytes), ("host", self.host_bytes)):
            if self.used[tier] + size <= room:
                self.used[tier] += size
                return tier
        return "disk"

    def give(self, tier: str, size: int) -> None:
        if tier != "disk":
            self.used[tier] -= size


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` (a layer's (args, kwargs) or its output: nested tuples, lists, dicts) with ``fn``
    applied to every tensor; a tensor reached twice maps to one result; other objects stay as they are."""
    memo: dict[int, torch.Tensor] = {}

    def walk(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if id(v) not in memo:
                memo[id(v)] = fn(v)
            return memo[id(v)]
        if isinstance(v, tuple):
            items = [walk(x) for x in v]
            return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            out = copy.copy(v)
            for k, x in v.items():
                out[k] = walk(x)
            return out
        return v

    return walk(value)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor (pinned, so copying it back is a DMA), or the tensor itself on a CPU."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
    return host.copy_(t)


class _Activations:
    """One layer's per-batch values (captured inputs, or outputs), each in the first tier of ``budget``
    with room: the execution device, host memory, or a file (``torch.save``: read back bit for bit;
    a value pickle cannot write stays in host memory). :meth:`get` returns it on the execution device."""

    def __init__(self, budget: ActivationBudget, name: str, count: int):
        self.budget, self.name = budget, name
        self.items: list[Any] = [None] * count
        self.where: list[str | None] = [None] * count
        self.sizes = [0] * count
        self.borrowed: set[int] = set()  # files another owner keeps (a resumed run's saved outputs)

    def _free(self, b: int) -> None:
        if self.where[b] == "disk" and b not in self.borrowed:
            Path(self.items[b]).unlink(missing_ok=True)
        elif self.where[b] is not None:
            self.budget.give(self.where[b], self.sizes[b])
        self.items[b], self.where[b] = None, None
        self.borrowed.discard(b)

    def put(self, b: int, value: Any) -> None:
        """Batch ``b``'s value; a second put (the forced-routing pass recomputes batch 0) replaces it."""
        self._free(b)
        size = _nbytes(value)
        tier = self.budget.take(size)
        if tier == "disk":
            path = self.budget.folder / f"{self.name}-{b}.pt"
            try:
                torch.save(map_tensors(value, lambda t: t.cpu()), path)
            except (pickle.PicklingError, TypeError, AttributeError):
                path.unlink(missing_ok=True)
                tier, value = "host", map_tensors(value, _to_host)
                self.budget.used["host"] += size
            else:
                self.items[b], self.where[b] = path, "disk"
                return
        elif tier == "host":
            value = map_tensors(value, _to_host)
        self.items[b], self.where[b], self.sizes[b] = value, tier, size

    def borrow(self, b: int, path: Path) -> None:
        """Batch ``b``'s value is in ``path``, a file this store reads but never removes."""
        self._free(b)
        self.items[b], self.where[b] = path, "disk"
        self.borrowed.add(b)

    def get(self, b: int) -> Any:
        device = self.budget.device
        if self.where[b] == "disk":
            return torch.load(self.items[b], map_location=device, weights_only=False)  # written by moe_unfuse
        if self.where[b] == "host":
            return map_tensors(self.items[b], lambda t: t.to(device, non_blocking=True))
        return self.items[b]

    def save(self, b: int, path: Path) -> None:
        """Write batch ``b``'s value to ``path`` (a hard link when it already is a file)."""
        if self.where[b] == "disk":
            try:
                os.link(self.items[b], path)
                return
            except OSError:
                pass
        torch.save(map_tensors(self.get(b), lambda t: t.cpu()), path)

    def drop(self) -> None:
        for b in range(len(self.items)):
            self._free(b)
        self.items, self.where, self.sizes = [], [], []


def _nbytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) layer input or output, each storage once."""
    seen: dict[int, int] = {}

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    walk(value)
    return sum(seen.values())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, found as modelopt's streaming export finds them, with the list the
    config names where modelopt finds none (:func:`moe_unfuse.quant.streaming.decoder_layer_list`), so
    calibration and export walk the same layers."""
    layers = decoder_layer_list(model)
    if not layers:
        raise MoeUnfuseError(
            f"{type(model).__name__}: no decoder layer list that modelopt can walk layer by layer; fix: pass --no-layerwise"
        )
    return layers


def check_layerwise(model: nn.Module) -> None:
    """Refuse, before anything changes, a model the layer-by-layer path cannot produce the
    whole-model checkpoint for: one without a decoder layer list to walk."""
    decoder_layers(model)


class _Stand(nn.Module):
    """Takes a decoder layer's place in its list during a capture forward: returns ``output`` (the
    previous layer's real output for this batch), or, for the layer being captured, records its
    arguments and stops the forward. Attributes the parent reads (``attention_type`` ...) come from
    the layer it stands for, which is not a child, so no hook loads its weights."""

    def __init__(self, layer: nn.Module, output: Any = None, capture: list | None = None):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_output", output)
        object.__setattr__(self, "_capture", capture)
        object.__setattr__(self, "calls", 0)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        object.__setattr__(self, "calls", self.calls + 1)
        if self._capture is not None:
            self._capture.append((args, kwargs))
            raise _Stop
        return self._output


class _Replay(nn.Module):
    """One decoder layer under its path in the model (``model.layers.3``), run on its captured inputs:
    ``forward(index=b)`` is batch ``b``. Its output is kept for the next layer's capture."""

    def __init__(self, path: str, layer: nn.Module, inputs: _Activations, outputs: _Activations):
        super().__init__()
        node: nn.Module = self
        parts = path.split(".")
        for part in parts[:-1]:
            child = nn.Module()
            node._modules[part] = child
            node = child
        node._modules[parts[-1]] = layer
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "outputs", outputs)

    def forward(self, index: torch.Tensor, use_cache: bool = False) -> Any:
        b = int(index)
        args, kwargs = self.inputs.get(b)
        out = self._layer(*args, **kwargs)
        self.outputs.put(b, out)
        return out


def _forward_standing_in(
    model: nn.Module,
    layers: nn.ModuleList,
    count: int,
    batches: Sequence[dict[str, torch.Tensor]],
    previous: _Activations | None,
    inputs: _Activations | None = None,
) -> list[int]:
    """The model's own forward on every batch with its first ``count`` layers standing in by returning
    ``previous`` (the last real layer's output for the batch). With ``inputs``, layer ``count``'s
    (args, kwargs) go there and the forward stops at it; without, the forward runs to the end.
    Returns the standing-in layers the forward called more than once (a looped layer)."""
    from ..core.offload import input_device

    originals = list(layers)[: count + (inputs is not None)]
    device = input_device(model)
    looped: set[int] = set()
    with owner_children_materialized(model, layers):  # the owner may read one's weights directly
        try:
            for b, batch in enumerate(batches):
                output = previous.get(b) if previous is not None else None
                captured: list[tuple[tuple, dict]] = []
                for j in range(count):
                    layers[j] = _Stand(originals[j], output=output)
                if inputs is not None:
                    layers[count] = _Stand(originals[count], capture=captured)
                with torch.no_grad():
                    try:
                        model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
                    except _Stop:
                        pass
                looped.update(j for j in range(count) if layers[j].calls > 1)
                if inputs is None:
                    continue
                if not captured:
                    raise MoeUnfuseError(
                        f"{type(model).__name__}: the forward did not reach decoder layer {count}; fix: pass --no-layerwise"
                    )
                inputs.put(b, captured[0])
        finally:
            for j, layer in enumerate(originals):
                layers[j] = layer
    return sorted(looped)


def calibrate_layerwise(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    force_routing: bool = False,
    chunk_tokens: int,
    progress: bool = True,
    sum_counts: Callable[[dict[str, list[int]]], None] | None = None,
    forced_here: bool = True,
    spill_dir: Path | None = None,
    budget: ActivationBudget | None = None,
    resume: ResumeState | None = None,
) -> RoutingStats:
    """:func:`moe_unfuse.quant.calibration.calibrate`, one decoder layer at a time (see the module docstring).

    Modules outside the decoder layers see the model's forward up to each layer (the embeddings:
    once per layer, the same tensors each time, so max calibration gives the same amax); modules
    after the last layer (lm_head, excluded by default) get one more forward per batch only when
    one of them has an enabled quantizer that is still uncalibrated. Everything runs on the device
    the model's offload hooks execute on (:func:`moe_unfuse.core.offload.set_execution_device`). Cached
    inputs and outputs go to the tiers of ``budget`` (default :meth:`ActivationBudget.default`, its
    files in a temporary folder under ``spill_dir``, removed at the end). ``resume``: layers it has
    committed are restored instead of calibrated, and each new one is committed (:mod:`moe_unfuse.quant.resume`).
    """
    from modelopt.torch.quantization.utils.core_utils import persistent_materialization
    from tqdm.auto import tqdm

    from ..core.offload import input_device

    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    device = input_device(model)
    stats = RoutingStats()
    previous: _Activations | None = None
    tokens = sum(b["input_ids"].numel() for b in batches if "input_ids" in b)
    with tempfile.TemporaryDirectory(prefix="moe-unfuse-activations-", dir=spill_dir) as folder:
        budget = budget or ActivationBudget.default(device, Path(folder))
        start = 0
        if resume is not None:
            start = min(resume.completed(), len(layers))
            resume.restored(start, len(layers))
            previous = _restore(model, layers, start, resume, stats, budget, len(batches), device)
        bar = tqdm(total=len(layers), initial=start, desc="layer by layer", unit="layer", disable=not progress)
        began = time.perf_counter()
        for i in range(start, len(layers)):
            path = names[id(layers[i])]
            inputs = _Activations(budget, f"in{i}", len(batches))
            _forward_standing_in(model, layers, i, batches, previous, inputs)
            if previous is not None:
                previous.drop()
            outputs = _Activations(budget, f"out{i}", len(batches))
            replay = _Replay(path, layers[i], inputs, outputs)
            with persistent_materialization(layers[i], writeback=False):
                layer_stats = calibrate(
                    replay,
                    [{"index": torch.tensor(b)} for b in range(len(batches))],
                    force_routing=force_routing,
                    chunk_tokens=chunk_tokens,
                    progress=False,
                    sum_counts=sum_counts,
                    forced_here=forced_here,
                )
            inputs.drop()
            previous = outputs
            del replay, inputs
            release_free_memory()
            stats.counts.update(layer_stats.counts)
            stats.forced.update(layer_stats.forced)
            if resume is not None:
                resume.commit(i, lambda d, i=i: _write_layer(d, model, layers, i, layer_stats, outputs))
            bar.update(1)
            rate = tokens * (i + 1 - start) / max(time.perf_counter() - began, 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=True)
        bar.close()
        if previous is not None:
            # modules after the layers (a final projection, an MTP head) calibrate on what they see in
            # a whole-model pass; else one batch shows whether a layer runs more than once per forward
            after = _uncalibrated_after_layers(model, layers)
            looped = _forward_standing_in(model, layers, len(layers), batches if after else batches[:1], previous)
            if looped:
                raise MoeUnfuseError(
                    f"{type(model).__name__}: decoder layer(s) {', '.join(map(str, looped))} run more than once per "
                    "forward (looped layers), and layer by layer calibrates each on its first pass only; "
                    "fix: pass --no-layerwise"
                )
        if previous is not None:
            previous.drop()
    return stats


def _layer_quantizers(model: nn.Module, layers: nn.ModuleList, i: int) -> list[tuple[str, nn.Module]]:
    """(name, module) of the quantizers layer ``i`` holds, and of those outside every decoder layer."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    own = {id(m) for m in layers[i].modules()}
    return [(n, m) for n, m in model.named_modules() if id(m) in own or id(m) not in inside]


def _write_layer(
    folder: Path, model: nn.Module, layers: nn.ModuleList, i: int, stats: RoutingStats, outputs: _Activations
) -> None:
    save_calibration(folder / "calibration.pt", _layer_quantizers(model, layers, i))
    (folder / "routing.json").write_text(json.dumps({"counts": stats.counts, "forced": stats.forced}) + "\n")
    (folder / "outputs").mkdir()
    for b in range(len(outputs.items)):
        outputs.save(b, folder / "outputs" / f"{b}.pt")


def _restore(
    model: nn.Module,
    layers: nn.ModuleList,
    count: int,
    resume: ResumeState,
    stats: RoutingStats,
    budget: ActivationBudget,
    num_batches: int,
    device: torch.device,
) -> _Activations | None:
    """Layers ``0..count-1`` as ``resume`` committed them: their calibration state and token counts
    (the modules outside the layers as of the last one); the last one's outputs, returned."""
    for j in range(count):
        load_calibration(resume.layer(j) / "calibration.pt", _layer_quantizers(model, layers, j), device)
        routing = json.loads((resume.layer(j) / "routing.json").read_text())
        stats.counts.update(routing["counts"])
        stats.forced.update(routing["forced"])
    if not count:
        return None
    outputs = _Activations(budget, f"out{count - 1}", num_batches)
    for b in range(num_batches):
        outputs.borrow(b, resume.layer(count - 1) / "outputs" / f"{b}.pt")
    return outputs


def _quantizers_outside(model: nn.Module, layers: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    inside = {id(m) for layer in layers for m in layer.modules()}
    return [
        (n, m)
        for n, m in model.named_modules()
        if id(m) not in inside and type(m).__name__ == "TensorQuantizer" and getattr(m, "is_enabled", False)
    ]


def _uncalibrated_after_layers(model: nn.Module, layers: nn.ModuleList) -> bool:
    return any(getattr(q, "amax", None) is None for _, q in _quantizers_outside(model, layers))


@contextmanager
def no_offload_writeback() -> Iterator[None]:
    """modelopt's max calibration first runs every weight quantizer on its weight, through
    ``enable_weight_access_and_writeback`` with a write-back that, for a disk-offloaded weight, keeps
    a copy in accelerate's CPU state dict (modelopt 0.47-0.48: "writing updates back to disk offload
    files is TODO"): the whole model would end up in memory. Max calibration never changes a weight,
    so while it runs that step reads without writing back."""
    from modelopt.torch.quantization import model_calib

    original = model_calib.enable_weight_access_and_writeback

    def read_only(module: nn.Module, root: nn.Module, names: Any = None, writeback: bool = True) -> Any:
        return original(module, root, names, writeback=False)

    model_calib.enable_weight_access_and_writeback = read_only
    try:
        yield
    finally:
        model_calib.enable_weight_access_and_writeback = original


# ----------------------------------------------------------------------------------------------
# when to go layer by layer


#: Peak host memory of the whole-model path over the checkpoint's bytes: measured 1.82 for 4
#: Gemma-4-26B-A4B-sized layers to NVFP4 (8.04 GB checkpoint, 14.62 GB peak; ``bench_memory.py``), rounded up.
WHOLE_MODEL_PEAK_RATIO = 1.85


def whole_model_peak(checkpoint_bytes: int) -> int:
    """Measured peak host memory of the whole-model path for a checkpoint of this size, beyond what the
    process already holds (the interpreter with torch, transformers and modelopt is loaded by then)."""
    return int(checkpoint_bytes * WHOLE_MODEL_PEAK_RATIO)


def needs_layerwise(checkpoint_bytes: int, device_map: str | None) -> bool:
    """Whether the whole-model path would not fit where ``device_map`` lets it go: its measured peak
    (:func:`whole_model_peak`) against the host memory left to this process (cgroup limits included),
    plus the free memory of every GPU when ``auto`` may place it there (layer by layer holds about one
    decoder layer and one export shard). A device_map naming devices explicitly (``cuda``, ``balanced``,
    ...) is the user's placement: kept. Where this says it fits but accelerate still offloads a module
    to disk, the job goes layer by layer too (:func:`moe_unfuse.hub.loading.offloaded_to_disk`)."""
    if device_map not in (None, "auto", "cpu", "none"):
        return False
    room = available_memory()
    if device_map in (None, "auto") and torch.cuda.is_available():
        room += sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return whole_model_peak(checkpoint_bytes) > room
