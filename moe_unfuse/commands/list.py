"""List the available specs: arch, target class, and whether the installed transformers has that class.

A spec whose class is missing (older or newer transformers) still loads; it simply matches nothing.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def spec_rows() -> list[dict]:
    """One row per spec (built-in and from plugins), sorted by arch."""
    import transformers

    from .. import list_specs

    return [
        {
            "arch": arch,
            "target_class": spec.target_class,
            "available": spec.resolve_class() is not None,
            "transformers": transformers.__version__,
            "source": spec.source,
            "verified_on": {k: list(v) for k, v in spec.verified_on.items()},
            "description": spec.description,
        }
        for arch, spec in list_specs().items()
    ]


def run(args: argparse.Namespace) -> int:
    rows = spec_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(r["arch"]) for r in rows), default=4)
    version = rows[0]["transformers"] if rows else ""
    print(f"{'arch':{width}}  {'in transformers ' + version:22}  target class")
    for r in rows:
        print(f"{r['arch']:{width}}  {'yes' if r['available'] else 'NO':22}  {r['target_class']}")
    missing = sum(not r["available"] for r in rows)
    print(f"{len(rows)} specs, {len(rows) - missing} with their class in the installed transformers")
    return 0
