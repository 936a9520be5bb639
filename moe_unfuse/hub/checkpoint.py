"""What an exported checkpoint folder holds, read the same way by the exporter and the verifier:
its safetensors files, the names of quantization scales, and how exclude lists are matched.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any, Collection, Container, Iterable

from ..base.errors import MoeUnfuseError
from .policy import KEEP_UNQUANTIZED_RE

#: A key under an experts module (``experts``, ``experts.``, ``shared_experts.``, ...): with 3+ dims, a fused expert tensor.
FUSED_EXPERT_KEY_RE = re.compile(r"(^|\.|_)experts?(\.|$)")
EXPERT_KEY_RE = re.compile(
    r"^(?P<prefix>.*?\.?experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?P<suffix>[A-Za-z0-9_]+)$"
)
METADATA_FILE = "moe_unfuse.json"
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "weight_scale_inv", "pre_quant_scale")
#: The scales modelopt writes next to a quantized weight (re-stacked with it in a fused export).
STACKED_SCALES = ("weight_scale", "weight_scale_2", "input_scale")


def excluded(name: str, patterns: Iterable[str]) -> bool:
    """Whether module ``name`` is covered by ``exclude_modules``: a glob match, or the name or one of
    its parents listed exactly (how vLLM and TRT-LLM read the list)."""
    for p in patterns:
        if name == p or name.startswith(p + ".") or ("*" in p or "?" in p or "[" in p) and fnmatch.fnmatchcase(name, p):
            return True
    return False


def shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, for a sharded one, its index weight_map."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / f for f in weight_map.values()}), weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MoeUnfuseError(
            f"{path}: no *.safetensors files; fix: point at a checkpoint folder written by save_pretrained/export"
        )
    return files, None


def read_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of a checkpoint folder's safetensors files, by name (small checkpoints: all in memory)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def has_scale(key: str, keys: Collection[str]) -> bool:
    """Whether the tensor ``key`` is a quantized weight: a scale sits next to it in ``keys``
    (``m.weight`` -> ``m.weight_scale``, a fused ``m.gate_up_proj`` -> ``m.gate_up_proj_weight_scale``)."""
    if key.endswith(".weight"):
        return any(f"{key[: -len('.weight')]}.{s}" in keys for s in SCALE_SUFFIXES)
    return any(f"{key}_{s}" in keys for s in SCALE_SUFFIXES)


def unquantized_modules(keys: Iterable[str]) -> set[str]:
    """Module names whose ``weight`` is in ``keys`` without any scale next to it."""
    keys = set(keys)
    return {k[: -len(".weight")] for k in keys if k.endswith(".weight") and not has_scale(k, keys)}


def fused_scale_base(key: str, keys: Container[str]) -> str | None:
    """The tensor ``key`` is a scale of when written fused (``m.gate_up_proj_weight_scale`` next to
    ``m.gate_up_proj``, as GPT-OSS exports are), else None: such a 3-D scale is not a fused weight."""
    for suffix in sorted(STACKED_SCALES, key=len, reverse=True):
        base = key[: -len(suffix) - 1]
        if key.endswith("_" + suffix) and base in keys:
            return base
    return None


def quantized_modules(keys: Iterable[str]) -> set[str]:
    """Modules that carry a quantization scale: ``m.weight_scale`` ..., or a fused one (``m.p_weight_scale``
    next to ``m.p``), whose module is ``m`` (the experts module an engine builds quantized or not)."""
    keys = set(keys)
    return {
        k.rsplit(".", 1)[0]
        for k in keys
        if "." in k and (k.rsplit(".", 1)[1] in SCALE_SUFFIXES or fused_scale_base(k, keys) is not None)
    }


def must_exclude(keys: Iterable[str]) -> set[str]:
    """Unquantized modules an engine must be told about: routers, towers, projectors, lm_head, experts."""
    return {
        m for m in unquantized_modules(keys) if KEEP_UNQUANTIZED_RE.search(m) or re.search(r"\.experts\.\d+\.", m + ".")
    }


#: Element dtypes of an unquantized (floating-point) tensor in a safetensors header.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


def is_nvfp4(algo: str | None) -> bool:
    """Whether a quantization algorithm (``quant_algo``) is NVFP4-family."""
    return algo is not None and "FP4" in algo.upper()


def required_scales(algo: str | None) -> tuple[str, ...]:
    """The scale tensors every quantized weight of ``algo`` carries."""
    if algo is None:
        return ()
    a = algo.upper()
    weight_only = "W4A16" in a or "WEIGHT_ONLY" in a or a.startswith("INT4_AWQ")
    scales = ["weight_scale"] + ([] if weight_only else ["input_scale"])
    if "NVFP4" in a:
        scales.append("weight_scale_2")
    return tuple(scales)
