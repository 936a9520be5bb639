"""What an export keeps of the source checkpoint it was quantized from: its config.json (all but the
quantization entries) and generation_config.json, each unquantized tensor's dtype, and the tensors the
model places nowhere (a hub's MTP head), copied as they are.

It reads and writes checkpoint folders only: the export (:mod:`moe_unfuse.quant.export`) calls it
on its staging folder.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ..base.errors import MoeUnfuseError
from .checkpoint import shard_files
from .checkpoint_reader import Checkpoint
from .naming import NamingContract, unplaced_source_keys

#: The config.json entries an export changes: modelopt's ``quantization_config`` (written by its export,
#: its exclude list fixed by :func:`moe_unfuse.quant.exclusions.fix_exclusions`). Every other field is the source's.
QUANT_CONFIG_KEYS = ("quantization_config",)
#: Files of the source folder an export carries over as they are (transformers v5 would re-serialize them).
SOURCE_CONFIG_FILES = ("generation_config.json",)


def source_dtypes(source: Path, contract: NamingContract) -> dict[str, torch.dtype]:
    """Each hub name's dtype in the source checkpoint's safetensors (headers only; empty when it
    has none). Per-expert names an export expands from a fused hub tensor take that tensor's dtype."""
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    try:
        stored = Checkpoint(source).dtype
    except MoeUnfuseError:  # no safetensors (a .bin checkpoint): nothing to compare with
        return {}
    out = {k: names[d] for k, d in stored.items() if d in names}
    for e in contract.experts.values():
        fused = {out.get(k) for k, _ in e.hub_fused_names}
        if len(fused) == 1 and None not in fused:
            out.update(dict.fromkeys(e.names, fused.pop()))
    return out


def keep_source_config(path: Path, source: Path) -> None:
    """Write the source's config.json back with only :data:`QUANT_CONFIG_KEYS` taken from the export:
    transformers v5's ``save_pretrained`` (which modelopt's export calls) rewrites fields hub
    checkpoints spell otherwise (``architectures``: the hub's ``PhiMoEForCausalLM`` becomes the class
    name ``PhimoeForCausalLM``, which vLLM's registry does not know; ``torch_dtype``, ``auto_map`` ...)."""
    src = source / "config.json"
    exported = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in json.loads(src.read_text()).items() if k not in QUANT_CONFIG_KEYS}
    config.update({k: exported[k] for k in QUANT_CONFIG_KEYS if k in exported})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in SOURCE_CONFIG_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, path / name)


#: Bytes per shard of carried source tensors (an MTP head can be tens of GB: never all in memory).
CARRY_SHARD_BYTES = 2 * 1024**3
#: safetensors dtype name -> bytes per element (sizes the carried shards).
_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "BF16": 2,
    "F16": 2,
    "I16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U8": 1,
    "I8": 1,
    "BOOL": 1,
}


def carry_source_tensors(path: Path, source: Path, contract: NamingContract) -> list[str]:
    """Copy into the export at ``path`` every tensor of the ``source`` checkpoint the model places
    nowhere (:func:`~moe_unfuse.hub.naming.unplaced_source_keys`: a hub's MTP head, AXK1's dense-layer
    ``post_mlp_layernorm``), as it is, unless the export holds it already (modelopt 0.48 carries them
    itself; 0.47 does not) or it belongs to an experts module. Written into ``model-carried-N.safetensors``
    shards listed in the index (made when the export had none). Returns every carried name the export
    now holds, for ``moe_unfuse.json``, where ``verify`` reads which names a checkpoint carries."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if contract.model is None or not any(source.glob("*.safetensors")):
        return []
    have = Checkpoint(source)
    unplaced = [k for k in unplaced_source_keys(contract.model, have.where) if not contract.expert_owned(k)]
    files, weight_map = shard_files(path)
    if weight_map is None:
        weight_map = {}
        for f in files:
            with safe_open(f, "pt") as fh:
                weight_map.update(dict.fromkeys(fh.keys(), f.name))
    todo = [k for k in unplaced if k not in weight_map]
    batches: list[list[str]] = [[]]
    size = 0
    for k in todo:
        n = math.prod(have.shape[k]) * _DTYPE_BYTES.get(have.dtype[k], 4)
        if batches[-1] and size + n > CARRY_SHARD_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(k)
        size += n
    for i, keys in enumerate(b for b in batches if b):
        name = f"model-carried-{i + 1:05d}.safetensors"
        tensors = {}
        for k in keys:
            with safe_open(have.where[k], "pt") as fh:
                tensors[k] = fh.get_tensor(k)
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if todo:
        total = sum(f.stat().st_size for f in {path / n for n in weight_map.values()})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(k for k in unplaced if k in weight_map)
