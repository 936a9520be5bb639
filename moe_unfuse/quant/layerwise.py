"""Layer-by-layer quantization: peak memory of about one decoder layer, the whole-model path's checkpoint.

The model comes from transformers with every module offloaded to disk (:func:`load_offloaded`):
accelerate's hooks read a module's weights from the checkpoint's safetensors files (or from an
offload folder, where a load-time conversion rewrote them) only for that module's forward, and our
expert offload hooks read one expert's rows at a time (:mod:`moe_unfuse.core.offload`). modelopt's max
calibration runs over every quantizer exactly as in the whole-model path; only its forward loop
differs (:func:`calibrate_layerwise`). It walks the forward's decoder-layer *calls* (a looped layer
is called once per pass), one at a time: the model's own forward runs on each batch up to that call,
with every layer standing in and answering each earlier call with that call's cached outputs, so the
parent computes everything it passes to a layer (masks, rotary embeddings, per-layer inputs, block
residuals, a loop's messages) as it always does; the call's inputs are captured, its layer's weights
are loaded once (modelopt's ``persistent_materialization``: a module that reads a child's weight
directly, as LongCat's router does, sees it too), the layer is calibrated on its inputs (token counts
and forced routing as in the whole-model path), and its outputs are kept for as long as a later call
reads them. Which calls a forward makes, and which earlier outputs each call reads, is found once
with random answers (:func:`plan_calls`): a plain decoder stack reads only the last call, so one
call's outputs are cached at a time, as before; Inkling2's block residuals read many. Max
calibration depends only on each quantizer's inputs, which are the same tensors as in a whole-model
pass, so every amax is identical. modelopt's ``export_hf_checkpoint`` then streams the offloaded
model to disk one decoder layer at a time.
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
from .calibration import RoutingStats, count_tokens, force_uncovered
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


class _Calls:
    """The decoder-layer calls of one forward, in the order the model makes them, answered by the
    standing-in layers: call ``c`` returns ``answer(c)``; call ``capture`` records its (args, kwargs)
    and stops the forward. ``expected`` (a :class:`CallPlan`'s layers) checks that the forward calls
    the layers in the planned order; ``seen`` (optional) gets each call's (args, kwargs)."""

    def __init__(
        self,
        answer: Callable[[int], Any] | None = None,
        capture: int | None = None,
        expected: Sequence[int] | None = None,
        seen: Callable[[int, tuple, dict], None] | None = None,
    ):
        self.answer, self.capture, self.expected, self.seen = answer, capture, expected, seen
        self.layers: list[int] = []
        self.captured: tuple[tuple, dict] | None = None

    def __call__(self, j: int, args: tuple, kwargs: dict) -> Any:
        c = len(self.layers)
        self.layers.append(j)
        if self.expected is not None and (c >= len(self.expected) or self.expected[c] != j):
            planned = f"decoder layer {self.expected[c]}" if c < len(self.expected) else "no further layer"
            raise MoeUnfuseError(
                f"layer by layer: call {c} of the forward ran decoder layer {j} where the first batch's forward "
                f"ran {planned} (the order of the layers depends on the data); fix: pass --no-layerwise"
            )
        if self.seen is not None:
            self.seen(c, args, kwargs)
        if c == self.capture:
            self.captured = (args, kwargs)
            raise _Stop
        assert self.answer is not None, "a forward with no answers stops at its capture"
        return self.answer(c)


class _Stand(nn.Module):
    """Takes decoder layer ``index``'s place in its list while the model's own forward runs: its
    calls go to the forward's :class:`_Calls`. Attributes the parent reads (``attention_type`` ...)
    come from the layer it stands for, which is not a child, so no hook loads its weights."""

    def __init__(self, layer: nn.Module, index: int):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "calls", None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.calls(self._index, args, kwargs)


@contextmanager
def _standing_in(model: nn.Module, layers: nn.ModuleList) -> Iterator[Callable[[dict, _Calls], Any]]:
    """Every decoder layer replaced by a :class:`_Stand` for the duration; yields ``forward(batch,
    calls)``: the model's forward on one batch, its layer calls answered by ``calls`` (None when it
    stopped at the capture)."""
    from ..core.offload import input_device

    originals = list(layers)
    stands = [_Stand(layer, j) for j, layer in enumerate(originals)]
    device = input_device(model)

    def forward(batch: dict[str, torch.Tensor], calls: _Calls) -> Any:
        for stand in stands:
            object.__setattr__(stand, "calls", calls)
        with torch.no_grad():
            try:
                return model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            except _Stop:
                return None

    with owner_children_materialized(model, layers):  # the owner may read one's weights directly
        try:
            for j, stand in enumerate(stands):
                layers[j] = stand
            yield forward
        finally:
            for j, layer in enumerate(originals):
                layers[j] = layer


@dataclass
class CallPlan:
    """One forward's decoder-layer calls: ``layers[c]`` is the layer call ``c`` runs (a looped layer
    once per pass), and ``last_use[c]`` the last call whose inputs call ``c``'s outputs reach
    (``len(layers)``: the forward's end). A plain decoder stack is ``last_use[c] == c + 1``; Inkling's
    block residuals read outputs from many layers back, and a loop's second pass restarts from an
    output before the loop."""

    layers: list[int]
    last_use: list[int]

    @property
    def looped(self) -> bool:
        return len(set(self.layers)) < len(self.layers)

    def calls_of(self, j: int) -> list[int]:
        return [c for c, layer in enumerate(self.layers) if layer == j]


def _digest(value: Any) -> bytes:
    """A hash of every tensor's shape, dtype and bytes in a (nested) value: equal values, equal digests.
    A CPU tensor's bytes are hashed as they are; an accelerator's are first reduced where they are
    (:func:`_bit_sums`), so that planning does not copy every activation to the host."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach()
            h.update(repr((tuple(t.shape), t.dtype)).encode())
            if t.is_complex():
                t = torch.view_as_real(t)
            raw = t.contiguous().reshape(-1)
            if raw.dtype == torch.bool:
                raw = raw.to(torch.uint8)
            if not raw.numel():
                return
            if raw.device.type == "cpu":
                h.update(memoryview(raw.view(torch.uint8).numpy()))
            else:
                h.update(_bit_sums(raw).cpu().numpy().tobytes())
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for k, x in v.items():
                h.update(repr(k).encode())
                walk(x)

    walk(value)
    return h.digest()


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # elements per step: a few 32 MB temporaries on the device


def _bit_sums(flat: torch.Tensor) -> torch.Tensor:
    """Three position-weighted sums of a flat tensor's bit patterns, in int64 (exact, wrapping:
    the same bits give the same sums on every run; a changed element changes them)."""
    ints = flat.view(_INTS[flat.element_size()])
    total = torch.zeros(3, dtype=torch.int64, device=flat.device)
    for start in range(0, ints.numel(), _CHUNK):
        chunk = ints[start : start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + chunk.numel(), device=flat.device, dtype=torch.int64)
        total += torch.stack([chunk.sum(), (chunk * (pos % 65521 + 1)).sum(), (chunk * (pos % 1021 + 3)).sum()])
    return total


@contextmanager
def _calibration_paused(model: nn.Module, layers: nn.ModuleList) -> Iterator[None]:
    """The quantizers outside the decoder layers collect nothing for the duration (the planning
    forwards feed the parent random layer outputs)."""
    paused = [q for _, q in _quantizers_outside(model, layers) if getattr(q, "_if_calib", False)]
    for q in paused:
        q.disable_calib()
    try:
        yield
    finally:
        for q in paused:
            q._if_calib = True


def plan_calls(model: nn.Module, layers: nn.ModuleList, batch: dict[str, torch.Tensor], output: Any) -> CallPlan:
    """The :class:`CallPlan` of the model's forward on ``batch``, found with every layer standing in
    and answering with random values shaped as ``output`` (a real layer output): two random sets, so
    that changing one call's answer shows which later calls' inputs (and the model's output) it reaches.
    A few forwards (two per bit of the call count) tell whether every call reads only the one before;
    when one does not, one forward per call finds how long each output is read. No layer computes
    and no quantizer collects: the forwards cost the parent's own work (embeddings, masks, rotary).
    A quantizer of the parent's own (outside the layers) that reads a call's output keeps that output
    to the end: every capture forward runs the parent again up to its call, and the quantizer collects
    each time, so it must see the real value each time."""
    answers = [
        map_tensors(output, lambda t, s=seed: _random_as(t, s) if t.is_floating_point() else t) for seed in (1, 2)
    ]
    readers = [q for _, q in _quantizers_outside(model, layers)]

    def run(forward: Callable, changed: Callable[[int], bool], expected: Sequence[int] | None) -> tuple:
        digests: list[bytes] = []  # each call's inputs, then the model's output
        read: list[bytes] = []  # what the parent's quantizers read, in order
        calls = _Calls(
            answer=lambda c: map_tensors(answers[changed(c)], torch.clone),  # the parent may write into it
            expected=expected,
            seen=lambda c, args, kwargs: digests.append(_digest((args, kwargs))),
        )
        hooks = [q.register_forward_pre_hook(lambda m, args: read.append(_digest(args))) for q in readers]
        try:
            digests.append(_digest(forward(batch, calls)))
        finally:
            for hook in hooks:
                hook.remove()
        return calls.layers, digests, read

    with _standing_in(model, layers) as forward, _calibration_paused(model, layers):
        order, base, base_read = run(forward, lambda c: False, None)
        count = len(order)
        chain = True
        for bit in range(max(1, (count - 1).bit_length())):
            for value in (0, 1):
                changed = lambda c, bit=bit, value=value: (c >> bit) & 1 == value  # noqa: E731
                _, digests, read = run(forward, changed, order)
                chain &= read == base_read
                for k in range(1, count + 1):
                    if digests[k] != base[k] and not changed(k - 1):
                        chain = False  # call k reads an earlier call than k - 1
        last_use = [c + 1 for c in range(count)]
        if not chain:
            for m in range(count):
                _, digests, read = run(forward, lambda c, m=m: c == m, order)
                readers_of_m = [k for k in range(m + 1, count + 1) if digests[k] != base[k]]
                last_use[m] = count if read != base_read else max([m + 1, *readers_of_m])
    return CallPlan(order, last_use)


def _random_as(t: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=t.device).manual_seed(seed)
    return torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32).to(t.dtype)


class _Replay(nn.Module):
    """One decoder layer under its path in the model (``model.layers.3``), run on captured inputs:
    ``forward(index=b)`` is ``inputs``' batch ``b``, its output kept in ``outputs`` (when given)."""

    def __init__(self, path: str, layer: nn.Module, inputs: Any, outputs: _Activations | None):
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
        if self.outputs is not None:
            self.outputs.put(b, out)
        return out


class _Slots:
    """The first batch of each store, read as one: a layer's first-batch inputs of each of its calls
    (the current call's from its inputs), for its forced pass."""

    def __init__(self, stores: Sequence[_Activations]):
        self.stores = stores

    def get(self, i: int) -> Any:
        return self.stores[i].get(0)


def _capture(
    forward: Callable[[dict, _Calls], Any],
    batches: Sequence[dict[str, torch.Tensor]],
    k: int,
    plan: CallPlan | None,
    kept: dict[int, _Activations],
    inputs: _Activations | None,
) -> int:
    """Call ``k``'s (args, kwargs) for every batch into ``inputs`` (or, ``k == len(plan.layers)``, the
    forward run to its end): each earlier call answers with its kept outputs, or with the last call's
    when nothing after it reads them (the plan says which). Returns the layer call ``k`` runs."""
    layer = -1
    for b, batch in enumerate(batches):
        memo: dict[int, Any] = {}

        def answer(c: int) -> Any:
            store = kept.get(c) or kept[k - 1]
            if id(store) not in memo:
                memo[id(store)] = store.get(b)
            return memo[id(store)]

        calls = _Calls(answer, capture=k if inputs is not None else None, expected=plan.layers if plan else None)
        forward(batch, calls)
        if inputs is None:
            continue
        if calls.captured is None:
            raise MoeUnfuseError(
                f"layer by layer: the forward made {k} decoder-layer calls, not {k + 1}; fix: pass --no-layerwise"
            )
        inputs.put(b, calls.captured)
        layer = calls.layers[k]
    return layer


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
    """:func:`moe_unfuse.quant.calibration.calibrate`, one decoder-layer call at a time (see the module
    docstring); a looped layer is calibrated once per pass, its token counts summed over the passes and
    its forced pass run on each pass's first batch, as a whole-model forward does.

    Modules outside the decoder layers see the model's forward up to each call (the embeddings: once
    per call, the same tensors each time, so max calibration gives the same amax); modules after the
    last call (lm_head, excluded by default) get one more forward per batch only when one of them has
    an enabled quantizer that is still uncalibrated. Everything runs on the device the model's offload
    hooks execute on (:func:`moe_unfuse.core.offload.set_execution_device`). Cached inputs and outputs
    go to the tiers of ``budget`` (default :meth:`ActivationBudget.default`, its files in a temporary
    folder under ``spill_dir``, removed at the end); a call's outputs are kept as long as the
    :class:`CallPlan` says a later call reads them (the last call's only, for a plain stack).
    ``resume``: calls it has committed are restored instead of calibrated, and each new one is
    committed (:mod:`moe_unfuse.quant.resume`).
    """
    from modelopt.torch.quantization.utils.core_utils import persistent_materialization
    from tqdm.auto import tqdm

    from ..core.offload import input_device

    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    device = input_device(model)
    stats = RoutingStats()
    tokens = sum(b["input_ids"].numel() for b in batches if "input_ids" in b)
    with tempfile.TemporaryDirectory(prefix="moe-unfuse-activations-", dir=spill_dir) as folder:
        budget = budget or ActivationBudget.default(device, Path(folder))
        kept: dict[int, _Activations] = {}  # outputs of calls a later call (or the end) reads
        pending: dict[int, list[_Activations]] = {}  # layer -> first-batch inputs of its calls so far
        sums: dict[int, RoutingStats] = {}  # layer -> token counts of its calls so far
        plan: CallPlan | None = None
        start = 0
        if resume is not None and resume.completed():
            start, plan, routings = _restore(model, layers, resume, batches[0], device, stats)
            kept, pending, sums = _restored_values(resume, plan, routings, budget, len(batches))
        bar = tqdm(
            total=len(plan.layers) if plan else len(layers),
            initial=start,
            desc="layer by layer",
            unit="layer",
            disable=not progress,
        )
        began = time.perf_counter()
        k = start
        while plan is None or k < len(plan.layers):
            inputs = _Activations(budget, f"in{k}", len(batches))
            with _standing_in(model, layers) as forward:
                j = _capture(forward, batches, k, plan, kept, inputs)
            released = [m for m in kept if plan is not None and m < k and plan.last_use[m] <= k]
            for m in released:
                kept.pop(m).drop()
            outputs = _Activations(budget, f"out{k}", len(batches))
            replay = _Replay(names[id(layers[j])], layers[j], inputs, outputs)
            with persistent_materialization(layers[j], writeback=False):
                call_stats = count_tokens(
                    replay, [{"index": torch.tensor(b)} for b in range(len(batches))], False, sum_counts
                )
                if plan is None:
                    plan = plan_calls(model, layers, batches[0], outputs.get(0))
                    bar.total = len(plan.layers)
                    bar.refresh()
                    _check_first_call(model, plan, j)
                total = sums.pop(j, RoutingStats())  # the layer's counts over its calls so far
                total.add(call_stats)
                last = k == plan.calls_of(j)[-1]
                if not last:
                    sums[j] = total
                    if force_routing:  # the layer's forced pass, after its last call, runs on this batch too
                        first = _Activations(budget, f"first{k}", 1)
                        first.put(0, inputs.get(0))
                        pending.setdefault(j, []).append(first)
                elif force_routing:
                    slots = _Slots([*pending.get(j, []), inputs])
                    forced = RoutingStats(total.counts)
                    force_uncovered(
                        _Replay(names[id(layers[j])], layers[j], slots, None),
                        [{"index": torch.tensor(s)} for s in range(len(slots.stores))],
                        forced,
                        chunk_tokens,
                        False,
                        sum_counts,
                        forced_here,
                    )
                    call_stats.forced = forced.forced
            inputs.drop()
            kept[k] = outputs
            del replay, inputs
            release_free_memory()
            stats.add(call_stats)
            keep_first = not last and force_routing
            if resume is not None:
                firsts = plan.calls_of(j)[:-1] if last and force_routing else []
                resume.commit(
                    k,
                    lambda d, j=j: _write_call(d, model, layers, j, call_stats, outputs, pending, keep_first),
                    release=[
                        *(resume.layer(m) / "outputs" for m in released),
                        *(resume.layer(m) / "first.pt" for m in firsts),
                    ],
                )
            if last:
                for first in pending.pop(j, []):
                    first.drop()
            bar.update(1)
            rate = tokens * (k + 1 - start) / max(time.perf_counter() - began, 1e-9)
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=True)
            k += 1
        bar.close()
        if _uncalibrated_after_layers(model, layers):
            # modules after the layers (a final projection, an MTP head) calibrate on what they see in
            # a whole-model pass
            with _standing_in(model, layers) as forward:
                _capture(forward, batches, len(plan.layers), plan, kept, None)
        for store in kept.values():
            store.drop()
    return stats


def _check_first_call(model: nn.Module, plan: CallPlan, j: int) -> None:
    if plan.layers[0] != j:
        raise MoeUnfuseError(
            f"{type(model).__name__}: the planning forward first called decoder layer {plan.layers[0]}, the first "
            f"batch's forward layer {j}; fix: pass --no-layerwise"
        )


def _layer_quantizers(model: nn.Module, layers: nn.ModuleList, i: int) -> list[tuple[str, nn.Module]]:
    """(name, module) of the quantizers layer ``i`` holds, and of those outside every decoder layer."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    own = {id(m) for m in layers[i].modules()}
    return [(n, m) for n, m in model.named_modules() if id(m) in own or id(m) not in inside]


def _write_call(
    folder: Path,
    model: nn.Module,
    layers: nn.ModuleList,
    j: int,
    stats: RoutingStats,
    outputs: _Activations,
    pending: dict[int, list[_Activations]],
    keep_first: bool,
) -> None:
    """One committed call: the calibration state of its layer's quantizers (and those outside the
    layers), its token counts, its outputs, and (a looped layer's call before its last) its first
    batch's inputs for the layer's forced pass."""
    save_calibration(folder / "calibration.pt", _layer_quantizers(model, layers, j))
    routing = {"layer": j, "counts": stats.counts, "forced": stats.forced}
    (folder / "routing.json").write_text(json.dumps(routing) + "\n")
    (folder / "outputs").mkdir()
    for b in range(len(outputs.items)):
        outputs.save(b, folder / "outputs" / f"{b}.pt")
    if keep_first:
        pending[j][-1].save(0, folder / "first.pt")


def _restore(
    model: nn.Module,
    layers: nn.ModuleList,
    resume: ResumeState,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    stats: RoutingStats,
) -> tuple[int, CallPlan, list[dict[str, Any]]]:
    """The calls ``resume`` committed, restored: their layers' calibration state in commit order (a
    looped layer's last committed call holds what all its calls collected; the modules outside the
    layers as of the last call) and their token counts into ``stats``. Returns how many, the plan
    (found from the last committed call's outputs) and each call's saved ``routing.json``."""
    count = resume.completed()
    routings = [json.loads((resume.layer(m) / "routing.json").read_text()) for m in range(count)]
    layer_of = [routing["layer"] for routing in routings]
    for m, routing in enumerate(routings):
        load_calibration(resume.layer(m) / "calibration.pt", _layer_quantizers(model, layers, routing["layer"]), device)
        stats.add(RoutingStats(routing["counts"], routing["forced"]))
    last = torch.load(resume.layer(count - 1) / "outputs" / "0.pt", map_location=device, weights_only=False)
    plan = plan_calls(model, layers, batch, last)
    if plan.layers[:count] != layer_of:
        raise MoeUnfuseError(
            f"{resume.folder}: the saved calls ran decoder layers {layer_of}, the model's forward runs "
            f"{plan.layers[:count]}; fix: remove {resume.folder.parent}"
        )
    count = min(count, len(plan.layers))
    resume.restored(count, len(plan.layers))
    return count, plan, routings[:count]


def _restored_values(
    resume: ResumeState,
    plan: CallPlan,
    routings: list[dict[str, Any]],
    budget: ActivationBudget,
    num_batches: int,
) -> tuple[dict[int, _Activations], dict[int, list[_Activations]], dict[int, RoutingStats]]:
    """What the calls after the restored ones read: the outputs the plan says they still need (the
    last restored call's always), and for a looped layer with calls still to come, its earlier calls'
    first-batch inputs and token counts."""
    count = len(routings)
    kept: dict[int, _Activations] = {}
    for m in range(count):
        if m == count - 1 or plan.last_use[m] >= count:
            kept[m] = _Activations(budget, f"out{m}", num_batches)
            for b in range(num_batches):
                kept[m].borrow(b, resume.layer(m) / "outputs" / f"{b}.pt")
    pending: dict[int, list[_Activations]] = {}
    sums: dict[int, RoutingStats] = {}
    for m in range(count):
        j = plan.layers[m]
        if plan.calls_of(j)[-1] < count:
            continue
        sums.setdefault(j, RoutingStats()).add(RoutingStats(routings[m]["counts"], routings[m]["forced"]))
        first = resume.layer(m) / "first.pt"
        if first.is_file():
            store = _Activations(budget, f"first{m}", 1)
            store.borrow(0, first)
            pending.setdefault(j, []).append(store)
    return kept, pending, sums


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
