"""A checkpoint folder's JSON read strictly, and what may be built from its config.json, bounded.

The verifier reads files someone else wrote: every value it uses is checked for its type here first,
and a wrong one is one :class:`MoeUnfuseError` line naming the file, the key and the fix (never a
``TypeError`` deep in a check). A config.json is only a description of a model: before anything is
built from it, its layer and expert counts and sizes are checked against the tensors the checkpoint
actually holds (:func:`check_config_bounds`), and while the model is built on the meta device, the
parameters it registers are counted against the checkpoint's own element count
(:func:`parameter_budget`), so a config claiming a million experts is refused at once instead of
growing a meta model for minutes.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ..base.errors import MoeUnfuseError

REEXPORT = "re-export the checkpoint (moe-unfuse quantize)"
#: Integer config fields that count layers or experts (``num_hidden_layers``, ``n_routed_experts``, ...).
COUNT_KEY_RE = re.compile(r"(layers|experts)$")
#: Integer config fields that are a tensor dimension (hidden, intermediate and vocabulary sizes, head_dim).
SIZE_KEY_RE = re.compile(r"(^|_)(hidden|intermediate|vocab)_size$|^head_dim$")
_INDEX_SEGMENT_RE = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")
#: Parameters a meta model may register per element the checkpoint holds: NVFP4 packs two weights a
#: byte, tied embeddings register twice before tying, and unquantized exports stay close to 1.
PARAMS_PER_ELEMENT = 8
PARAMS_SLACK = 1 << 24


@dataclass(frozen=True)
class QuantMetadata:
    """The quantization fields verify reads, each of its checked type."""

    hf_quant: dict | None  # hf_quant_config.json
    quant: dict  # its "quantization" object ({} when absent)
    qc: dict | None  # config.json quantization_config
    algo: str | None  # quant_algo (hf_quant_config.json first, else config.json)
    kv_algo: str | None  # kv_cache_quant_algo (either file)
    excludes: list[str]  # exclude_modules, else config.json's ignore


def _bad(file: str, key: str, value: Any, want: str, fix: str = REEXPORT) -> MoeUnfuseError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return MoeUnfuseError(f"{file}: {key} is {shown} ({type(value).__name__}), expected {want}; fix: {fix}")


def _optional_str(file: str, obj: Mapping, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(file, f"{where}{key}", value, "a string or null")
    return value


def _optional_str_list(file: str, obj: Mapping, key: str, where: str) -> list[str] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad(file, f"{where}{key}", value, "a list of module names")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(file, f"{where}{key}[{i}]", item, "a module name (string)")
    return value


def read_quant_metadata(folder: str, hf_quant: Any, config: Any) -> QuantMetadata:
    """The quantization fields of ``hf_quant_config.json`` and ``config.json`` (already parsed; None
    when the file is absent), every one of its expected type or a one-line error."""
    hq_file, cfg_file = f"{folder}/hf_quant_config.json", f"{folder}/config.json"
    if hf_quant is not None and not isinstance(hf_quant, dict):
        raise _bad(hq_file, "the file", hf_quant, "a JSON object")
    if config is not None and not isinstance(config, dict):
        raise _bad(cfg_file, "the file", config, "a JSON object")
    quant: dict = {}
    if hf_quant is not None and "quantization" in hf_quant:
        quant = hf_quant["quantization"]
        if not isinstance(quant, dict):
            raise _bad(hq_file, "quantization", quant, "an object with quant_algo")
        for key in ("quant_algo", "kv_cache_quant_algo"):
            _optional_str(hq_file, quant, key, "quantization.")
        _optional_str_list(hq_file, quant, "exclude_modules", "quantization.")
        group = quant.get("group_size")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group <= 0):
            raise _bad(hq_file, "quantization.group_size", group, "a positive integer")
    qc = (config or {}).get("quantization_config")
    if qc is not None:
        if not isinstance(qc, dict):
            raise _bad(cfg_file, "quantization_config", qc, "an object (or no key)")
        for key in ("quant_algo", "kv_cache_quant_algo", "quant_method"):
            _optional_str(cfg_file, qc, key, "quantization_config.")
        for key in ("ignore", "exclude_modules"):
            _optional_str_list(cfg_file, qc, key, "quantization_config.")
    if config is not None:
        _optional_str_list(cfg_file, config, "architectures", "")
    algo = quant.get("quant_algo")
    if algo is None and qc is not None:
        algo = qc.get("quant_algo")
    kv_algo = quant.get("kv_cache_quant_algo")
    if kv_algo is None and qc is not None:
        kv_algo = qc.get("kv_cache_quant_algo")
    excludes = quant.get("exclude_modules") or (qc or {}).get("ignore") or []
    return QuantMetadata(hf_quant, quant, qc, algo, kv_algo, list(excludes))


def check_weight_map(file: str, index: Any) -> dict[str, str]:
    """A shard index's ``weight_map``: tensor name -> shard file name, both strings."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise MoeUnfuseError(f"{file}: no weight_map object; fix: {REEXPORT}")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise _bad(file, f"weight_map[{key!r}]", shard, "a shard file name")
    return weight_map


def check_metadata_engine(file: str, metadata: Mapping, engines: tuple[str, ...]) -> str | None:
    """The engine ``moe_unfuse.json`` records, when it is one this package knows."""
    engine = metadata.get("engine")
    if engine is not None and engine not in engines:
        raise _bad(file, "engine", engine, f"one of {', '.join(engines)}", "re-export, or pass verify --engine")
    return engine


def checkpoint_extent(shapes: Mapping[str, list[int]]) -> tuple[int, int, int]:
    """(largest index segment + 1 in any tensor name, largest tensor dimension, elements in all tensors):
    what a config's counts and sizes are bounded by."""
    index = max((int(m) + 1 for k in shapes for m in _INDEX_SEGMENT_RE.findall(k) if len(m) < 10), default=0)
    largest = max((d for s in shapes.values() for d in s), default=0)
    elements = sum(math.prod(s) for s in shapes.values())
    return index, largest, elements


def check_config_bounds(file: str, config: Mapping, shapes: Mapping[str, list[int]]) -> None:
    """Every layer or expert count in config.json (at any depth: text_config, vision_config, ...) at
    most what the tensor names and shapes can hold, every hidden, intermediate and vocabulary size at
    most twice the largest tensor dimension (NVFP4 halves the packed one): a config describing a
    far larger model than the checkpoint holds is refused before anything is built from it."""
    index, largest, _ = checkpoint_extent(shapes)
    count_bound, size_bound = max(index, largest, 1), max(2 * largest, 1)

    def walk(obj: Any, where: str, depth: int) -> None:
        if depth > 8:
            return
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for key, value in items:
            path = f"{where}.{key}" if where else str(key)
            if isinstance(value, (dict, list)):
                walk(value, path, depth + 1)
            elif isinstance(key, str) and isinstance(value, int) and not isinstance(value, bool):
                bound = count_bound if COUNT_KEY_RE.search(key) else size_bound if SIZE_KEY_RE.search(key) else None
                if bound is not None and value > bound:
                    raise MoeUnfuseError(
                        f"{file}: {path} is {value}, more than the checkpoint's tensors can hold (at most {bound}: "
                        f"largest tensor dimension {largest}, {index} indexed layers/experts); "
                        "fix: restore the config.json the checkpoint was exported with"
                    )

    walk(dict(config), "", 0)


@contextmanager
def parameter_budget(file: str, shapes: Mapping[str, list[int]]) -> Iterator[None]:
    """While a model is built (on the meta device) inside this block: the parameters it registers may
    add up to :data:`PARAMS_PER_ELEMENT` times the checkpoint's elements (plus a small slack); one
    more is a one-line error, raised at that registration, so the build stops there."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    _, _, elements = checkpoint_extent(shapes)
    budget = PARAMS_PER_ELEMENT * elements + PARAMS_SLACK
    seen = [0]

    def count(module: Any, name: str, param: Any) -> None:
        if param is None:
            return
        seen[0] += param.numel()
        if seen[0] > budget:
            raise MoeUnfuseError(
                f"{file}: describes a model of more than {budget:,} parameters, for a checkpoint of {elements:,} "
                "elements; fix: restore the config.json the checkpoint was exported with"
            )

    handle = register_module_parameter_registration_hook(count)
    try:
        yield
    finally:
        handle.remove()
