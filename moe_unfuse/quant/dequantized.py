"""A dequantized copy of a modelopt-format FP8/NVFP4 checkpoint: its own bytes, read one tensor at a
time, dequantized by the reference (:mod:`moe_unfuse.quant.dequant`) and written back as a plain
checkpoint under the hub's names (experts the hub stores fused are re-fused through the spec's
layout reverse, a fused export is unfused to dequantize it), which transformers loads like the
original. The evaluation (:mod:`moe_unfuse.quant.evaluate`) loads it as its twin of the original.
It is in quant/, not hub/, because it re-stacks per-expert tensors as the export does
(:mod:`moe_unfuse.quant.export`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base.errors import MoeUnfuseError
from ..hub.checkpoint import shard_files
from .dequant import FP8, dequantize, tensor_format


class CheckpointReader:
    """A checkpoint folder's tensors by name, read one at a time."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        files, _ = shard_files(path)
        self.where: dict[str, Any] = {}
        for f in files:
            fh = safe_open(f, "pt")  # kept open: memory-mapped, tensors read one at a time
            for k in fh.keys():
                self.where[k] = fh

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


_SCALE_LEAVES = (
    "weight_scale_2",
    "weight_scale",
    "input_scale",
    "pre_quant_scale",
    "output_scale",
    "k_scale",
    "v_scale",
)


def _is_scale(key: str) -> bool:
    """A quantization scale: ``a.weight_scale`` next to ``a.weight``, or ``a.w_weight_scale`` next to a fused ``a.w``."""
    return key.rsplit(".", 1)[-1] in _SCALE_LEAVES or any(key.endswith("_" + s) for s in _SCALE_LEAVES)


def _scale_prefix(key: str) -> str:
    """Where a weight's scale keys start: ``a.weight`` -> ``a.``; a fused ``a.w`` -> ``a.w_``."""
    return key[: -len("weight")] if key.endswith(".weight") else key + "_"


@dataclass
class QuantizedWeights:
    """The quantized weights and input scales of a checkpoint, by weight key."""

    formats: dict[str, str] = field(default_factory=dict)  # weight key -> fp8 / nvfp4
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # weight key -> input_scale


def _dequantized(reader: CheckpointReader, key: str, dtype: torch.dtype, q: QuantizedWeights) -> torch.Tensor | None:
    """The tensor ``key`` dequantized (None when it is a scale)."""
    if _is_scale(key):
        return None
    t = reader.get(key)
    scales = _scales(reader, key, t, q)
    if scales is None:
        return t
    _, scale, scale_2 = scales
    return dequantize(t, scale, scale_2, dtype)


def _scales(
    reader: CheckpointReader, key: str, t: torch.Tensor, q: QuantizedWeights
) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
    """``key``'s format, weight scale and ``weight_scale_2`` (its input scale recorded in ``q``), or
    None when it is not a quantized weight."""
    prefix = _scale_prefix(key)
    if prefix + "weight_scale" not in reader:
        return None
    scale = reader.get(prefix + "weight_scale")
    fmt = tensor_format(t, scale)
    if fmt is None:
        return None
    q.formats[key] = fmt
    if prefix + "input_scale" in reader:
        q.input_scales[key] = reader.get(prefix + "input_scale").float()
    scale_2 = reader.get(prefix + "weight_scale_2") if prefix + "weight_scale_2" in reader else None
    return fmt, scale, scale_2


def _dequantize_fused(
    reader: CheckpointReader, key: str, spec_param: Any, n: int, dtype: torch.dtype, q: QuantizedWeights
) -> torch.Tensor:
    """A quantized tensor in the hub's fused layout (``export.layout: fused``): unfused per expert
    through the spec's layout, each piece dequantized, fused back. A per-expert ``weight_scale_2``
    (``[E]``) applies to expert E's rows."""
    layout = spec_param.layout(n)
    t = reader.get(key)
    scales = _scales(reader, key, t, q)  # a fused key's scales are ``key_weight_scale`` ...
    if scales is None:
        return t
    fmt, scale, scale_2 = scales
    if fmt == FP8 and scale.dim() == 0:
        return dequantize(t, scale, None, dtype)
    w_pieces, s_pieces = layout.unfuse(t), layout.unfuse(scale) if scale.dim() >= 2 else None
    out = []
    for j, row in enumerate(w_pieces):
        out_row = []
        for e, w in enumerate(row):
            s = s_pieces[j][e] if s_pieces is not None else (scale[e] if scale.dim() == 1 else scale)
            s2 = None if scale_2 is None else (scale_2[e] if scale_2.dim() == 1 else scale_2)
            out_row.append(dequantize(w.contiguous(), s.contiguous(), s2, dtype))
        out.append(out_row)
    return layout.refuse(out)


def write_dequantized(
    checkpoint: Path, out: Path, dtype: torch.dtype | None = None, original: Path | None = None
) -> tuple[QuantizedWeights, Any, list]:
    """Write ``checkpoint`` dequantized into ``out`` as a plain checkpoint under the hub's names (what
    ``save_pretrained`` writes for the model), one tensor at a time into 256 MB shards. ``original``:
    the source model's folder, whose tensors the contract marks optional and no export carries (slots
    past the routed experts, e.g. LongCat-Flash's identity experts) are copied, so that transformers
    builds the twin with the original's shapes. Returns the quantized weights found, the naming
    contract and the specs."""
    from safetensors.torch import save_file

    from ..hub.naming import build_contract, meta_model_from_config
    from ..spec.catalog import select_specs
    from .restack import Restack, restack_tensors

    config = json.loads((checkpoint / "config.json").read_text())
    meta = meta_model_from_config(config, str(checkpoint))
    if meta is None:
        raise MoeUnfuseError(
            f"{checkpoint}/config.json: architectures {config.get('architectures')} cannot be built by the installed transformers; fix: install a transformers that has the class"
        )
    specs = select_specs(meta)
    contract = build_contract(meta, specs)
    if dtype is None:
        dtype = next((p.dtype for p in meta.parameters() if p.is_floating_point()), torch.bfloat16)
    reader = CheckpointReader(checkpoint)
    q = QuantizedWeights()
    by_arch = {s.arch: s for s in specs}
    done: set[str] = set()
    pending: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    size = 0

    def put(name: str, t: torch.Tensor) -> None:
        nonlocal size, pending
        pending[name] = t.contiguous()
        size += t.numel() * t.element_size()
        if size > 256 << 20:
            flush()

    def flush() -> None:
        nonlocal size, pending
        if not pending:
            return
        fname = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(pending, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in pending})
        shards.append({})
        pending, size = {}, 0

    for e in contract.experts.values():
        spec = by_arch.get(e.arch)
        if spec is None:
            continue
        if e.layout == "fused":
            for p in spec.params:
                key = f"{e.hub}.{p.name}"
                if key + "_weight_scale" in reader:
                    put(key, _dequantize_fused(reader, key, p, e.num_experts, dtype, q))
                    done.update(k for k in reader.where if k == key or k.startswith(key + "_"))
        elif e.hub_fused and any(n in reader for n in e.names):
            target = Restack(e, spec, False, contract.to_hub, contract.hub_key)

            def get(k: str) -> torch.Tensor:
                t = _dequantized(reader, k, dtype, q)
                assert t is not None
                return t

            fused, used = restack_tensors(target, get, lambda k: k in reader)
            for k, t in fused.items():
                put(k, t)
            for k in used:
                done.add(k)
                done.update(_scale_prefix(k) + s for s in _SCALE_LEAVES)
    for key in reader.where:
        if key in done:
            continue
        t = _dequantized(reader, key, dtype, q)
        if t is not None:
            put(key, t)
    if original is not None:
        source = CheckpointReader(original)
        for key in sorted(contract.optional):
            if key in source and key not in reader:
                put(key, source.get(key).to(dtype))
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return q, contract, specs
