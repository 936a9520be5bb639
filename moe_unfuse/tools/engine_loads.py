"""What the serving engines' own loaders did with each family's tiny FP8 and NVFP4 exports, as data.

``engine_loads.json`` is written by the engine loader tests (``tests_vllm/``: vLLM's real model classes
and weight loading on CPU, run in CI in their own environment, which fails when a result changes) and
read by the README's export table (:mod:`moe_unfuse.tools.export_table`). Nothing here is written by hand.
``verify --engine`` refuses what a spec's ``export.engines`` records (GPT-OSS). A failing export is
triaged by the same test: when the unquantized checkpoint it was made from (the tiny model saved as the
hub has it) fails that loader too, the failure is not the quantization's ("fails unquantized too", with
that checkpoint's error: an engine limit, or a tensor the hub stores that transformers drops); otherwise
it is ours to fix ("fails").
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

LOADS_PATH = Path(__file__).with_name("engine_loads.json")
#: A recorded outcome: every tensor consumed and every parameter written; the loader failed on the
#: export's tensors while it loads the unquantized checkpoint (an export defect, or an engine rule our
#: default does not follow yet); it failed on the unquantized checkpoint as well;
#: the engine could not build the model from the tiny config on a CPU (a config field the hub's config
#: has and the tiny one lacks, or a CPU or kernel limit: says nothing about the export); or an
#: architecture its registry does not know.
LOADS, FAILS, FAILS_UNQUANTIZED, NOT_BUILT, NOT_REGISTERED = (
    "loads",
    "fails",
    "fails unquantized too",
    "model not built",
    "not registered",
)


@lru_cache(maxsize=1)
def engine_loads() -> dict[str, Any]:
    """engine -> {"version", "archs": {arch: {qformat: {"status", "reason"?, "note"?}}}}."""
    return json.loads(LOADS_PATH.read_text()) if LOADS_PATH.is_file() else {}


def load_result(engine: str, arch: str, qformat: str) -> dict[str, str] | None:
    """The recorded outcome of ``arch``'s ``qformat`` export in ``engine``'s loader, or None (not tried)."""
    return engine_loads().get(engine, {}).get("archs", {}).get(arch, {}).get(qformat)


def table_cell(engine: str, arch: str) -> str:
    """The README cell: per format what the loader did (``fp8, nvfp4: loads``, a failure with its reason)."""
    results = engine_loads().get(engine, {}).get("archs", {}).get(arch)
    if not results:
        return "not tried (no export)"
    by_text: dict[str, list[str]] = {}
    for qformat, r in sorted(results.items(), reverse=True):  # nvfp4 before fp8
        text = (
            r["status"] + (f": {r['reason']}" if r.get("reason") else "") + (f" ({r['note']})" if r.get("note") else "")
        )
        by_text.setdefault(text, []).append(qformat)
    return "; ".join(f"{', '.join(q)}: {t}" for t, q in by_text.items()).replace("|", "\\|")
