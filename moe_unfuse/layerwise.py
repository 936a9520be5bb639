"""Layer-by-layer quantization: peak memory of about one decoder layer, the whole-model path's checkpoint.

The model comes from transformers with every module offloaded to disk (:func:`load_offloaded`):
accelerate's hooks read a module's weights from the checkpoint's safetensors files (or from an
offload folder, where a load-time conversion rewrote them) only for that module's forward, and our
expert offload hooks read one expert's rows at a time (:mod:`moe_unfuse.offload`). modelopt's max
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

import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .calibration import RoutingStats, calibrate
from .errors import MoeUnfuseError
from .memory import available_memory, release_free_memory

#: Shard size of a layer-by-layer export: modelopt's streaming writer holds one shard in memory.
LAYERWISE_SHARD_SIZE = "256MB"


class _Stop(Exception):
    """Ends a capture forward once the layer being captured has its inputs."""


#: Bytes of one layer's cached inputs (and, apart, of its outputs) kept in memory; beyond that each
#: batch's values go to a file (calibration sets of thousands of long samples: tens of GB per layer).
ACTIVATIONS_IN_MEMORY = 512 << 20


class _Activations:
    """One layer's per-batch values (captured inputs, or outputs): in memory up to
    ``ACTIVATIONS_IN_MEMORY`` bytes, then each further batch in its own file under ``folder``
    (``torch.save``: read back bit for bit). A value pickle cannot write stays in memory."""

    def __init__(self, folder: Path, name: str, count: int):
        self.folder, self.name = folder, name
        self.items: list[Any] = [None] * count
        self.files: set[int] = set()
        self.bytes = 0

    def put(self, b: int, value: Any) -> None:
        """Batch ``b``'s value; a second put (the forced-routing pass recomputes batch 0) replaces it."""
        if b in self.files:
            self.files.discard(b)
            Path(self.items[b]).unlink(missing_ok=True)
        elif self.items[b] is not None:
            self.bytes -= _nbytes(self.items[b])
        size = _nbytes(value)
        if self.bytes + size > ACTIVATIONS_IN_MEMORY:
            path = self.folder / f"{self.name}-{b}.pt"
            try:
                torch.save(value, path)
            except (pickle.PicklingError, TypeError, AttributeError):
                path.unlink(missing_ok=True)
            else:
                self.items[b] = path
                self.files.add(b)
                return
        self.items[b] = value
        self.bytes += size

    def get(self, b: int) -> Any:
        if b in self.files:
            return torch.load(self.items[b], weights_only=False)  # written by this process just now
        return self.items[b]

    def drop(self) -> None:
        for b in self.files:
            Path(self.items[b]).unlink(missing_ok=True)
        self.items, self.files = [], set()


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
    """The model's decoder layers, found as modelopt's streaming export finds them (so calibration
    and export walk the same layers)."""
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    layers = LayerActivationCollector.get_decoder_layers(model)
    if not layers:
        raise MoeUnfuseError(
            f"{type(model).__name__}: no decoder layer list that modelopt can walk layer by layer; fix: pass --no-layerwise"
        )
    return layers


def check_layerwise(model: nn.Module) -> None:
    """Refuse, before anything changes, a model the layer-by-layer path cannot produce the
    whole-model checkpoint for: no decoder layer list modelopt can walk, or a conversion mapping
    that splits hub tensors on load (modelopt's streaming export reverses names one tensor at a
    time and refuses such splits; it is asked here, before calibration, rather than at export)."""
    decoder_layers(model)
    try:
        from modelopt.torch.export.unified_export_hf_streaming import _assert_no_split_rules
    except ImportError:  # a modelopt without the check: the export raises instead
        return
    try:
        _assert_no_split_rules(model)
    except NotImplementedError:
        raise MoeUnfuseError(
            f"{type(model).__name__}: layer by layer is not available: its transformers conversion mapping splits "
            "hub tensors on load, which modelopt's streaming export cannot reverse one layer at a time; fix: pass --no-layerwise"
        ) from None


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

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
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
) -> None:
    """The model's own forward on every batch with its first ``count`` layers standing in by returning
    ``previous`` (the last real layer's output for the batch). With ``inputs``, layer ``count``'s
    (args, kwargs) go there and the forward stops at it; without, the forward runs to the end."""
    from .calibration import input_device

    originals = list(layers)[: count + (inputs is not None)]
    device = input_device(model)
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
) -> RoutingStats:
    """:func:`moe_unfuse.calibration.calibrate`, one decoder layer at a time (see the module docstring).

    Modules outside the decoder layers see the model's forward up to each layer (the embeddings:
    once per layer, the same tensors each time, so max calibration gives the same amax); modules
    after the last layer (lm_head, excluded by default) get one more forward per batch only when
    one of them has an enabled quantizer that is still uncalibrated. Cached inputs and outputs beyond
    ``ACTIVATIONS_IN_MEMORY`` go to files in a temporary folder under ``spill_dir`` (default: the
    system's), removed at the end.
    """
    from modelopt.torch.quantization.utils.core_utils import persistent_materialization
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    stats = RoutingStats()
    previous: _Activations | None = None
    bar = tqdm(range(len(layers)), desc="layer by layer", unit="layer", disable=not progress, leave=False)
    with tempfile.TemporaryDirectory(prefix="moe-unfuse-activations-", dir=spill_dir) as folder:
        for i in bar:
            path = names[id(layers[i])]
            inputs = _Activations(Path(folder), f"in{i}", len(batches))
            _forward_standing_in(model, layers, i, batches, previous, inputs)
            if previous is not None:
                previous.drop()
            outputs = _Activations(Path(folder), f"out{i}", len(batches))
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
        if previous is not None and _uncalibrated_after_layers(model, layers):
            # modules after the layers (a final projection, an MTP head) calibrate on what they see
            # in a whole-model pass
            _forward_standing_in(model, layers, len(layers), batches, previous)
    return stats


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
    to disk, the job goes layer by layer too (:func:`moe_unfuse.loading.offloaded_to_disk`)."""
    if device_map not in (None, "auto", "cpu", "none"):
        return False
    room = available_memory()
    if device_map in (None, "auto") and torch.cuda.is_available():
        room += sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return whole_model_peak(checkpoint_bytes) > room
