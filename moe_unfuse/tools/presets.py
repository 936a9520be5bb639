"""modelopt's quantization presets, replayed from its ``modelopt_recipes`` YAML files, and how each
stores a quantized weight: the audit's quantize/exclude decisions and sizes, without importing modelopt
(which costs more than the whole audit)."""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from ..base.errors import MoeUnfuseError


@cache
def recipes_root() -> Path:
    found = importlib.util.find_spec("modelopt_recipes")
    if found is None or not found.submodule_search_locations:
        raise MoeUnfuseError(
            "modelopt_recipes is not installed; fix: install nvidia-modelopt>=0.47, which ships the quantization presets"
        )
    return Path(next(iter(found.submodule_search_locations)))


def preset_names() -> list[str]:
    return sorted(p.stem for p in (recipes_root() / "configs/ptq/presets/model").glob("*.yaml"))


def _load_recipe(rel: str) -> tuple[dict, Any]:
    """(imports, body) of a recipe file: one document, or an ``imports`` document then the body."""
    docs = [d for d in yaml.safe_load_all((recipes_root() / f"{rel}.yaml").read_text()) if d is not None]
    if len(docs) > 1:
        return dict(docs[0].get("imports", {})), docs[1]
    body = docs[0]
    imports = body.pop("imports", {}) if isinstance(body, dict) else {}
    return dict(imports), body


def _is_import(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"$import"}


def _resolve(node: Any, imports: dict) -> Any:
    if _is_import(node):
        sub_imports, body = _load_recipe(imports[node["$import"]])
        return _resolve(body, sub_imports)
    if isinstance(node, dict):
        return {k: _resolve(v, imports) for k, v in node.items()}
    if isinstance(node, list):
        out: list = []
        for item in node:
            value = _resolve(item, imports)
            out.extend(value) if _is_import(item) and isinstance(value, list) else out.append(value)
        return out
    return node


@cache
def preset_rules(qformat: str) -> tuple[dict, ...]:
    """The ``quant_cfg`` entries of modelopt preset ``qformat``, imports spliced in, in order."""
    if qformat not in preset_names():
        raise MoeUnfuseError(
            f"unknown qformat {qformat!r}; fix: use bf16 or a modelopt preset: {', '.join(preset_names())}"
        )
    imports, body = _load_recipe(f"configs/ptq/presets/model/{qformat}")
    return tuple(_resolve(body["quant_cfg"], imports))


@dataclass(frozen=True)
class Numerics:
    """How a quantized weight is stored: element bits, block scales, per-channel or per-tensor scale."""

    bits: int
    block: int | None = None
    scale_bits: int = 32
    per_channel: bool = False

    @staticmethod
    def from_cfg(cfg: Any) -> "Numerics":
        if isinstance(cfg, list):  # e.g. W4A8: a chain of quantizers; the first stores the weight
            cfg = cfg[0]
        blocks = cfg.get("block_sizes") or {}
        block = blocks.get(-1) or blocks.get("-1")
        return Numerics(
            _bits(cfg.get("num_bits", 8)),
            int(block) if block else None,
            _bits(blocks.get("scale_bits", "fp32")) if block else 32,
            cfg.get("axis") is not None,
        )

    def describe(self) -> str:
        name = {8: "8-bit", 4: "4-bit"}.get(self.bits, f"{self.bits}-bit")
        if self.block:
            return f"{name}, {self.scale_bits}-bit scale per {self.block}"
        return f"{name}, per-{'channel' if self.per_channel else 'tensor'} scale"

    def weight_bytes(self, shape: tuple[int, ...]) -> float:
        """Stored bytes of one quantized weight: elements, block or channel scales, the fp32 per-tensor scale."""
        numel = math.prod(shape)
        rows = shape[0]
        stored = numel * self.bits / 8
        if self.block:
            stored += rows * math.ceil(numel // rows / self.block) * self.scale_bits / 8
        if self.per_channel:
            stored += rows * 4
        else:
            stored += 4  # FP8 weight_scale / NVFP4 weight_scale_2
        return stored


def _bits(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        return 1 + int(value[0]) + int(value[1])
    if isinstance(value, str):
        m = re.fullmatch(r"e(\d+)m(\d+)", value)
        if m:
            return 1 + int(m[1]) + int(m[2])
        if value == "fp32":
            return 32
        raise MoeUnfuseError(
            f"modelopt preset: num_bits {value!r} is not understood; fix: audit with bf16, fp8 or nvfp4"
        )
    return int(value)
