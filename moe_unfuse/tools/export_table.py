"""The README's "Export by family" table, generated from the specs (``tests/test_export_table.py``
fails when the README's copy is stale; ``python -m moe_unfuse.tools.export_table --write README.md`` rewrites it).

Each row is computed from the spec's whole tiny model on the meta device through the same naming
contract the exporter and the verifier use, so the sample keys are the ones an export writes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from ..hub.naming import build_contract
from ..hub.tiny import tiny_model_for
from .engine_loads import engine_loads, table_cell

START, END = "<!-- export:start -->", "<!-- export:end -->"
#: Families whose export does not carry the hub names yet, and why (the export test marks them xfail).
KNOWN_EXPORT_GAPS: dict[str, str] = {}
ENGINES_CHECKED = "vllm, sglang, trtllm"


def no_model_cell(spec: Any) -> str:
    """The sample-keys cell of a spec without a whole tiny model: its ``golden.no_model`` reason if it gives one."""
    reason = (spec.golden or {}).get("no_model")
    return f"(no whole tiny model: {reason})" if reason else "(no whole tiny model in the spec)"


def rows() -> list[tuple[str, ...]]:
    """(arch, export layout, two sample expert keys, engines checked, export test, vLLM loader) per spec."""
    import torch

    from ..spec.catalog import specs as catalog_specs

    out = []
    for arch, spec in sorted(catalog_specs().items()):
        if not (spec.golden or {}).get("model") or spec.resolve_class() is None:
            out.append(
                (
                    arch,
                    spec.export_layout.replace("_", "-"),
                    no_model_cell(spec),
                    ENGINES_CHECKED,
                    "no",
                    table_cell("vllm", arch),
                )
            )
            continue
        with torch.device("meta"):
            model = tiny_model_for(spec)
        experts = next(iter(build_contract(model, [spec]).experts.values()))
        if experts.layout == "fused":
            layout = "fused (hub layout)"
            unquantized = [e for e in ("vllm", "sglang") if spec.experts_unquantized_for(e)]
            if unquantized:
                layout += f"; experts BF16 for {', '.join(unquantized)}"
            samples = [experts.weights[0], f"{experts.weights[0]}_weight_scale"]
        else:
            layout = "per-expert" + (" (hub is fused)" if experts.hub_fused else "")
            samples = [experts.weights[0], re.sub(r"\.weight$", ".weight_scale", experts.weights[-1])]
        test = f"xfail: {KNOWN_EXPORT_GAPS[arch]}" if arch in KNOWN_EXPORT_GAPS else "nvfp4, fp8, none + reload"
        out.append(
            (arch, layout, ", ".join(f"`{s}`" for s in samples), ENGINES_CHECKED, test, table_cell("vllm", arch))
        )
    return out


def markdown() -> str:
    version = engine_loads().get("vllm", {}).get("version", "?")
    lines = [
        START,
        "Generated from `specs/` by `python -m moe_unfuse.tools.export_table --write README.md`; do not edit by hand. Sample keys are "
        'those of the spec\'s whole tiny model (a real checkpoint has more layers and experts). "Engines checked" are the '
        "engines whose loader rules `verify` checks (see the export contract above), not engines this family was served on. "
        f'"vLLM {version} loader" is what vLLM\'s own model classes and weight loading did '
        "with the tiny FP8 and NVFP4 exports on a CPU (`tests_vllm/`, in CI; `moe_unfuse/tools/engine_loads.json`).",
        "",
        "| arch | export layout | sample expert keys | engines checked | export test (`tests/test_export_families.py`) "
        f"| vLLM {version} loader |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(r)} |" for r in rows()]
    lines.append(END)
    return "\n".join(lines)


def replace_section(text: str, section: str, start: str = START, end: str = END) -> str:
    """``text`` with what lies between the ``start`` and ``end`` markers (both included) replaced by ``section``."""
    if start not in text or end not in text:
        raise ValueError(f"no {start} ... {end} section")
    head, rest = text.split(start, 1)
    return head + section + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_unfuse.tools.export_table", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--write", type=Path, metavar="README", help="replace the section between the markers in this file"
    )
    args = parser.parse_args(argv)
    section = markdown()
    if args.write is None:
        print(section)
        return 0
    if not args.write.is_file():
        print(f"{args.write}: no such file; fix: pass the README to update", file=sys.stderr)
        return 2
    args.write.write_text(replace_section(args.write.read_text(), section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
