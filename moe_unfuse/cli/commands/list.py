"""List the available specs: arch, where each stands on the installed transformers, target class.

The second column: yes (verified on the installed transformers: it is in target.verified_on),
fits (not verified on it, but the drift check passes: the class still takes the mapped arguments
and has the declared parameters), DRIFTED (it does not fit: `moe-unfuse check SPEC` names what
changed), unproven (a draft with no verified_on), NO (the class is not in the installed
transformers). A spec whose class is missing still loads; it simply matches nothing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

#: The table's word for each :func:`moe_unfuse.core.drift.status`.
WORDS = {"verified": "yes", "fits": "fits", "drifted": "DRIFTED", "unproven": "unproven", "missing": "NO"}
LEGEND = {
    "verified": "verified on it",
    "fits": "not verified on it, the drift check passes",
    "drifted": "does not fit it: moe-unfuse check SPEC says what changed",
    "unproven": "no verified_on",
    "missing": "class not in it",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _row(arch: str, source: str, raw: Any, present: bool, status: str, version: str) -> dict:
    target = raw.get("target", {})
    return {
        "arch": arch,
        "target_class": target.get("class", ""),
        "available": present,
        "status": status,
        "transformers": version,
        "source": source,
        "verified_on": {k: list(v) for k, v in target.get("verified_on", {}).items()},
        "description": raw.get("description", ""),
    }


def spec_rows() -> list[dict]:
    """One row per spec of the catalog (built-in and from plugins), sorted by arch; ``status`` as in
    :func:`moe_unfuse.core.drift.status`. Class presence is read from the modeling sources, and only a
    spec neither verified on the installed transformers nor missing from it needs the drift check,
    which imports its class: listing imports neither torch nor transformers."""
    from ...base import versions
    from ...core import drift
    from ...spec.catalog import specs

    version = versions.installed_version()
    rows = []
    for arch, spec in sorted(specs().items()):
        present = drift.class_present(spec.target_class)
        rows.append(_row(arch, spec.source, spec.raw, present, drift.status(spec, present), version))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = spec_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(r["arch"]) for r in rows), default=4)
    version = rows[0]["transformers"] if rows else ""
    print(f"{'arch':{width}}  {'transformers ' + version:22}  target class")
    for r in rows:
        print(f"{r['arch']:{width}}  {WORDS[r['status']]:22}  {r['target_class']}")
    counts = {s: sum(r["status"] == s for r in rows) for s in WORDS}
    parts = [f"{counts[s]} {WORDS[s]} ({LEGEND[s]})" for s in WORDS if counts[s] or s in ("verified", "missing")]
    print(f"{len(rows)} specs on transformers {version}: " + ", ".join(parts))
    return 0
