"""What is quantized and what stays unquantized, written once for ``quantize``, ``audit``,
``export`` and ``verify``: the modelopt config of a format, and the checkpoint size it gives.

Routers, the output head (or a classifier's label head), and every non-text tower and projector stay in their original dtype:
engines load them unquantized (``../shared/reference/field_notes.md``). A module stays unquantized
when one component of its path is one of :data:`KEEP_UNQUANTIZED_MODULES` (``model.visual.blocks``
does, ``model.visual_proj`` does not), both as modelopt ``quant_cfg`` globs and as a regex on names.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from typing import Any, Iterable

import torch
from torch import nn

from ..base.errors import MoeUnfuseError
from ..base.options import QFORMATS, check_algorithm
from ..core.coverage import expert_count, find_fused_params

KEEP_UNQUANTIZED_MODULES = (
    "router",
    "lm_head",
    "vision_tower",
    "embed_vision",
    "audio_tower",
    "embed_audio",
    "multi_modal_projector",
    "vision_model",
    "visual",
    "mm_projector",
    "score",  # the label head of *ForSequenceClassification / *ForTokenClassification (vLLM builds it unquantized)
    "classifier",
)
#: Searched in a module name: one path component is a module that stays unquantized.
KEEP_UNQUANTIZED_RE = re.compile(r"(^|\.)(" + "|".join(KEEP_UNQUANTIZED_MODULES) + r")(\.|$)")


def keep_unquantized(module: str) -> bool:
    return KEEP_UNQUANTIZED_RE.search(module) is not None


def keep_unquantized_globs() -> tuple[str, ...]:
    """Quantizer-name globs for the same modules: the component at the start or after a dot."""
    return tuple(g for name in KEEP_UNQUANTIZED_MODULES for g in (f"{name}.*", f"*.{name}.*"))


def disable_entries(exclude: Iterable[str] = ()) -> list[dict]:
    """modelopt ``quant_cfg`` entries that disable the quantizers of :data:`KEEP_UNQUANTIZED_MODULES`
    and of the user's ``exclude`` module globs (appended after a preset's own entries, so they win)."""
    return [
        *({"quantizer_name": g, "enable": False} for g in keep_unquantized_globs()),
        *({"quantizer_name": f"{p}*quantizer", "enable": False} for p in exclude),
    ]


def build_quant_config(
    qformat: str, exclude: Iterable[str] = (), algorithm: str = "max", quantize: Iterable[str] = ()
) -> dict | None:
    """The modelopt config for ``qformat`` with :mod:`moe_unfuse.hub.policy`'s modules and ``exclude``
    (module-name globs) disabled, calibrated by modelopt's ``algorithm``; None for ``none``.
    ``quantize``: names of :data:`KEEP_UNQUANTIZED_MODULES` whose weight and input quantizers stay on
    (an engine that builds them quantized, a spec's ``export.engines.E.quantized``)."""
    import modelopt.torch.quantization as mtq

    if qformat not in QFORMATS:
        raise MoeUnfuseError(f"unknown --qformat {qformat!r}; fix: use one of {', '.join(QFORMATS)}")
    name = QFORMATS[qformat]
    if name is None:
        return None
    check_algorithm(qformat, algorithm)
    cfg = copy.deepcopy(getattr(mtq, name))
    if algorithm != "max":
        cfg["algorithm"] = {"method": algorithm}  # modelopt's own defaults for the method's options
    entries = disable_entries(exclude)
    for name in quantize:
        if name not in KEEP_UNQUANTIZED_MODULES:
            raise MoeUnfuseError(
                f"quantize {name!r}: not a module kept unquantized; fix: use one of {', '.join(KEEP_UNQUANTIZED_MODULES)}"
            )
        entries.extend(
            {"quantizer_name": f"{prefix}{name}.{q}_quantizer", "enable": True}
            for prefix in ("", "*.")
            for q in ("weight", "input")
        )
    quant_cfg = cfg["quant_cfg"]
    if isinstance(quant_cfg, list):
        quant_cfg.extend(entries)
    else:  # the older dict form
        quant_cfg.update({e["quantizer_name"]: {"enable": False} for e in entries})
    return cfg


class QuantRules:
    """modelopt's list-form ``quant_cfg`` semantics, written once (audit's plan, export's size estimate): every quantizer starts enabled (8-bit); entries apply in
    order, each to the quantizers whose name fnmatches and, if given, whose parent class matches."""

    def __init__(self, entries: Iterable[dict]):
        self.entries = [(re.compile(fnmatch.translate(e["quantizer_name"])), e) for e in entries]
        # names that differ only in whole numeric components (layers.3 / layers.17) match alike
        # unless a pattern has ? or [...], or a digit run that can touch such a component
        self.digit_blind = not any(
            re.search(r"[?\[]|(^|[.*])\d|\d($|[.*])", e["quantizer_name"]) for _, e in self.entries
        )

    def state(self, quantizer: str, classes: set[str]) -> tuple[bool, Any, str]:
        enabled, cfg, reason = True, {"num_bits": 8}, "modelopt default"
        for rx, e in self.entries:
            parent = e.get("parent_class")
            if parent and parent.rsplit(".", 1)[-1] not in classes:
                continue
            if not rx.match(quantizer):
                continue
            if "cfg" in e and e["cfg"] is not None:
                cfg = e["cfg"]
                enabled = bool(e.get("enable", True)) and not (isinstance(cfg, dict) and cfg.get("enable") is False)
            elif "enable" in e:
                enabled = bool(e["enable"])
            reason = e["quantizer_name"]
        return enabled, cfg, reason


#: The classes a per-expert linear (and a plain one) match in ``parent_class`` entries.
LINEAR_CLASSES = frozenset({"Linear", "Module"})


def estimate_tensor_bytes(model: nn.Module, qformat: str, exclude: Iterable[str] = ()) -> int:
    """Bytes of tensors an export of ``model`` in ``qformat`` holds, without quantizing anything:
    ``model`` may live on the meta device (a full-size config costs no memory). Linears (fused
    experts counted per expert) whose weight quantizer the qformat's config enables take FP8
    (1 B/weight + weight/input scale) or NVFP4 (0.5 B/weight + one FP8 scale per 16 + two fp32
    scalars); everything else keeps its dtype; tied weights count once."""
    cfg = build_quant_config(qformat, exclude)
    rules = QuantRules(cfg["quant_cfg"] if cfg else [{"quantizer_name": "*", "enable": False}])
    fp4 = "fp4" in qformat
    weight_only = qformat.startswith("w4a16")

    def linear_bytes(qname: str, out_f: int, in_f: int, dtype_size: int) -> int:
        if not rules.state(f"{qname}.weight_quantizer", LINEAR_CLASSES)[0]:
            return out_f * in_f * dtype_size
        scalars = (0 if weight_only else 1) + (
            1 if fp4 else 1
        )  # input_scale; weight_scale_2 (fp4) or weight_scale (fp8)
        if fp4:
            return out_f * in_f // 2 + out_f * (in_f // 16) + 4 * scalars
        return out_f * in_f + 4 * scalars

    fused = {f.path: f for f in find_fused_params(model)}
    total = 0
    for name, p in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        size = p.element_size()
        f = fused.get(name)
        if f is not None and f.spec is not None:
            ps = f.spec.param(leaf)
            parts = ps.layout(expert_count(f.module) or p.shape[0]).unfuse(torch.empty(p.shape, device="meta"))
            for proj, experts in zip(ps.into, parts):
                for e, w in enumerate(experts):
                    total += linear_bytes(f"{module_path}.{e}.{proj}", w.shape[0], w.shape[1], size)
            continue
        owner = model.get_submodule(module_path) if module_path else model
        if isinstance(owner, nn.Linear) and leaf == "weight":
            total += linear_bytes(module_path, p.shape[0], p.shape[1], size)
        else:
            total += p.numel() * size
    for path, module in model.named_modules():
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                total += b.numel() * b.element_size()
    return total
