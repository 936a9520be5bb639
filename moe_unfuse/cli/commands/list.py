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


def light_specs() -> dict[str, tuple[str, dict]] | None:
    """arch -> (source, merged and schema-checked mapping) of the built-in specs, read without the
    plugin registry, whose import loads torch and transformers (seconds) for what listing does not
    need. None when the registry is already loaded or plugins are installed: then only the
    registry knows every spec. The test-suite checks both give the same specs."""
    from importlib.metadata import entry_points

    from ...plugins import manager as plugins

    if plugins.loaded() or entry_points(group="moe_unfuse"):
        return None
    return read_builtin_specs()


def read_builtin_specs() -> dict[str, tuple[str, dict]]:
    """arch -> (source, mapping) of every built-in spec: merged as the registry merges them and
    checked against the JSON Schema (the kinds' declarations need the plugins: not checked here)."""
    import jsonschema

    from ...base.errors import SpecError
    from ...default_plugins.builtin_specs import builtin_spec_dir
    from ...spec.extends import merged_raw
    from ...spec.validation import schema, schema_error
    from ...spec.yaml_reader import read_yaml

    directory = builtin_spec_dir()
    validator = jsonschema.Draft202012Validator(schema())
    found: dict[str, tuple[str, dict]] = {}
    for path in sorted(directory.glob("*.yaml")):
        if read_yaml(path).get("abstract"):
            continue
        raw = merged_raw(path, (directory,))
        errors = sorted(
            validator.iter_errors(raw), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)))
        )
        if errors:
            raise schema_error(str(path), errors[0])
        if raw["arch"] in found:
            raise SpecError(
                str(path),
                "arch",
                f"{raw['arch']!r} is already defined by {found[raw['arch']][0]}",
                "rename one of the two specs",
            )
        found[raw["arch"]] = (str(path), raw)
    return dict(sorted(found.items()))


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
    """One row per spec (built-in and from plugins), sorted by arch; ``status`` as in
    :func:`moe_unfuse.core.drift.status`. Only a spec that is neither verified on the installed
    transformers nor missing from it needs the drift check, which imports its class."""
    from ...base import versions
    from ...core import drift

    version = versions.installed_version()
    light = light_specs()
    if light is None:
        from ...spec.catalog import specs as list_specs

        rows = []
        for arch, spec in list_specs().items():
            present = spec.resolve_class() is not None
            rows.append(_row(arch, spec.source, spec.raw, present, drift.status(spec, present), version))
        return rows
    rows = []
    for arch, (source, raw) in light.items():
        present = drift.class_present(raw["target"]["class"])
        verified = versions.verified_versions(raw)
        if not present:
            status = drift.MISSING
        elif version in verified:
            status = drift.VERIFIED
        elif not verified:
            status = drift.UNPROVEN
        else:
            from ...spec.catalog import get_spec

            status = drift.status(get_spec(arch), present)
        rows.append(_row(arch, source, raw, present, status, version))
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
