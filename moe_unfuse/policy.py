"""What stays unquantized, written once for ``quantize``, ``audit``, ``export`` and ``verify``.

Routers, the output head, and every non-text tower and projector stay in their original dtype:
engines load them unquantized (``../shared/reference/field_notes.md``). A module stays unquantized
when one component of its path is one of :data:`KEEP_UNQUANTIZED_MODULES` (``model.visual.blocks``
does, ``model.visual_proj`` does not), both as modelopt ``quant_cfg`` globs and as a regex on names.
"""

from __future__ import annotations

import re
from typing import Iterable

KEEP_UNQUANTIZED_MODULES = (
    "router", "lm_head", "vision_tower", "embed_vision", "audio_tower", "embed_audio",
    "multi_modal_projector", "vision_model", "visual", "mm_projector",
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
