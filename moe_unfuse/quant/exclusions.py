"""The exported checkpoint's exclude list (``exclude_modules`` in ``hf_quant_config.json``, ``ignore``
in config.json's ``quantization_config``).

Modules that must stay unquantized (routers, towers, projectors, lm_head, excluded experts) are added
under their final names, as ``prefix*`` patterns every engine version matches; the spec's renames for
the engine apply to the list as to the keys.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..hub.checkpoint import excluded, must_exclude, quantized_modules
from .renaming import rename_module


def exclude_pattern(module: str) -> str:
    """The exclude entry for a module and everything under it: ``prefix*``, which every vLLM version
    matches (0.22-0.26 expand only ``X*`` with no ``.`` before the ``*``, modelopt.py:266-285)."""
    return f"{module}*"


#: A module under one expert of an experts module: ``a.experts.3.up_proj`` (group 1: ``a.experts``).
EXPERT_ROW = re.compile(r"^(.*\.experts)\.\d+(\.|$)")


def _collapse_expert_names(names: Iterable[str]) -> list[str]:
    """``a.experts.3.up_proj`` ... -> ``a.experts*`` so a whole excluded layer is one entry."""
    out: list[str] = []
    for n in sorted(set(names)):
        m = EXPERT_ROW.match(n)
        entry = exclude_pattern(m.group(1)) if m else n
        if entry not in out:
            out.append(entry)
    return out


def fix_exclusions(
    path: Path,
    renames: Sequence[tuple[re.Pattern, str]],
    fused_back: Sequence[str],
    keys: Iterable[str],
    unquantized: Iterable[str] = (),
    hub_modules: Callable[[str], list[str]] = lambda m: [m],
) -> list[str]:
    """Rename the exclude list, write each entry in a form every engine matches, and add what must be
    excluded but is not: fused back experts, ``unquantized`` modules (fused expert tensors left
    unquantized by ``--allow-uncovered``, tensors carried from the source: an MTP head an engine would
    otherwise build quantized), lm_head (unless quantized), and every module :func:`must_exclude`
    finds. Writes both configs; returns the entries added."""
    hf_path, cfg_path = path / "hf_quant_config.json", path / "config.json"
    if not hf_path.is_file():
        return []  # not quantized: nothing is excluded from anything
    hf = json.loads(hf_path.read_text())
    quant = hf.setdefault("quantization", {})
    original = list(quant.get("exclude_modules") or [])
    final: list[str] = []
    for name in original:
        for hub in hub_modules(name):
            n = rename_module(hub, renames)
            if n.endswith(".*"):  # `a.experts.*` never matches the module `a.experts` in vLLM 0.22-0.26
                n = n[:-2] + "*"
            if n not in final:
                final.append(n)
    for name in [*fused_back, *sorted(unquantized)]:
        if not excluded(name, final):
            final.append(exclude_pattern(name))
    keys = set(keys)
    head_quantized = "lm_head" in quantized_modules(keys)  # for an engine that builds it quantized
    if not excluded("lm_head", final) and not head_quantized:
        final.append("lm_head")
    missing = sorted(m for m in must_exclude(keys) if not excluded(m, final))
    added = _collapse_expert_names(missing)
    final.extend(a for a in added if a not in final)
    added_all = [n for n in final if n not in original]
    quant["exclude_modules"] = final
    hf_path.write_text(json.dumps(hf, indent=4) + "\n")
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        qc = cfg.get("quantization_config")
        if isinstance(qc, dict):
            qc["ignore"] = list(final)
            if "exclude_modules" in qc:
                qc["exclude_modules"] = list(final)
            cfg_path.write_text(json.dumps(cfg, indent=4) + "\n")
    return added_all
