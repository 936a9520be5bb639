"""Print the coverage table: every spec's arch, class, layout kind and golden-test status.

Everything in it is derived from the specs (layout kind from params, gate and forward; what the
golden test covers from golden; the transformers versions it passed on from verified_on) and, in
the status column only, from the installed transformers. The status column says, by default,
where each spec stands on the installed transformers (verified on it, fits it unverified,
drifted, or class not in it: as `moe-unfuse list`); --run runs each spec's golden checks now
(slow: about a second or more per spec); --results FILE reads the outcomes a test run recorded:

  pytest -p moe_unfuse.tools.golden_results --golden-results golden.json
  moe-unfuse coverage --results golden.json

--write README.md replaces the section between <!-- coverage:start --> and <!-- coverage:end -->
with the markdown table without the status column: the README section depends on the specs only,
never on the installed versions, so it is current on every transformers the suite runs on (the
test-suite checks that README's table matches the specs).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

START = "<!-- coverage:start -->"
END = "<!-- coverage:end -->"
COLUMNS = ("arch", "class", "layout", "golden test", "verified on", "status")
#: The README's columns: no status, which depends on the installed transformers.
README_COLUMNS = COLUMNS[:-1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (the README format)")
    parser.add_argument(
        "--write",
        type=Path,
        metavar="FILE",
        help=f"replace the section between {START} and {END} in FILE with the markdown table",
    )
    parser.add_argument("--run", action="store_true", help="status: run each spec's golden checks now")
    parser.add_argument("--no-modelopt", action="store_true", help="with --run: skip the modelopt checks (faster)")
    parser.add_argument(
        "--results",
        type=Path,
        metavar="FILE",
        help="status: read from a results file (pytest -p moe_unfuse.tools.golden_results --golden-results FILE)",
    )
    parser.add_argument("--arch", help="only these archs (comma-separated)")


def layout_kind(spec: Any) -> str:
    """A short name for how the spec's experts are stored and computed, e.g. ``standard`` or
    ``transposed, interleaved, bias``; derived from params, gate, forward and linear."""
    parts: list[str] = []
    axes = [p.axes for p in spec.params]
    if any(a[0].startswith("expert*") for a in axes):
        parts.append("flattened")
    if any(list(a) == ["expert", "in", "out"] or (a[0].startswith("expert*") and a[-1] == "out") for a in axes):
        parts.append("transposed")
    if any(p.packing == "interleaved" and len(p.into) == 2 for p in spec.params):
        parts.append("interleaved")
    projections = spec.projection_names()
    if "gate_proj" in projections and not any(set(p.into) == {"gate_proj", "up_proj"} for p in spec.params):
        parts.append("separate gate/up")
    if any(p.bias for p in spec.params):
        parts.append("bias")
    if "gate_proj" not in projections and "linear" not in projections:
        parts.append("non-gated")
    if spec.forward_kind != "routed":
        parts.append(spec.forward_kind.replace("_", " "))
    options = getattr(spec, "forward_options", {}) or {}
    if (
        any(getattr(p, "extra_experts", None) is not None for p in spec.params)
        or options.get("identity_experts") is not None
    ):
        parts.append("zero experts")
    if getattr(spec, "post_expert_norm", None):
        parts.append("post-expert norm")
    kind = spec.gate.get("kind", "glu")
    if kind not in ("glu", "none"):
        parts.append(
            f"own `{spec.gate.get('method', '_apply_gate')}`" if kind == "module_method" else kind.replace("_", " ")
        )
    linear = getattr(spec, "linear", {}) or {}
    if linear.get("compute_dtype"):
        parts.append(f"{linear['compute_dtype'].replace('float', 'fp')} compute")
    accumulate = options.get("accumulate")
    if accumulate == "float32":
        parts.append("fp32 sum")
    elif accumulate not in (None, "input"):
        parts.append(f"sum in {accumulate} dtype")
    return ", ".join(parts) or "standard"


def golden_scope(spec: Any) -> str:
    """What the spec's golden test exercises (from its golden section)."""
    golden = spec.golden or {}
    if not golden:
        return "none"
    parts = ["exact"]
    if golden.get("implementations"):
        parts.append("/".join(i.removesuffix("_mm") for i in golden["implementations"]))
    parts.append("modelopt")
    if golden.get("model"):
        parts.append("whole model")
    return ", ".join(parts)


def _status_from_results(arch: str, results: dict[str, Any]) -> str:
    entry = results["archs"].get(arch)
    if entry is None:
        return "not run"
    if entry["failed"]:
        return f"FAIL ({len(entry['failed'])}: {', '.join(entry['failed'][:2])})"
    if entry["passed"]:
        return f"pass ({entry['passed']} tests)" + (f", {entry['skipped']} skipped" if entry["skipped"] else "")
    return "skipped"


def _status_run(spec: Any, modelopt: bool) -> str:
    import contextlib
    import io

    from ...base.errors import MoeUnfuseError
    from ...tools.golden import run_golden

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # modelopt prints per conversion; keep the table clean
            results = run_golden(spec, modelopt=modelopt)
    except MoeUnfuseError as exc:
        return f"FAIL ({str(exc).split(': ', 1)[-1][:80]})"
    except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, on one line
        return f"FAIL (crashed: {type(exc).__name__})"
    failed = [r.name for r in results if not r.ok]
    return f"FAIL ({', '.join(failed)})" if failed else f"pass ({len(results)} checks)"


def _status_default(spec: Any, version: str) -> str:
    """Where the spec stands on the installed transformers, in words (``drift.status``)."""
    from ...core import drift

    return {
        drift.VERIFIED: f"verified on transformers {version}",
        drift.FITS: f"fits transformers {version} (not verified on it)",
        drift.DRIFTED: f"DRIFTED on transformers {version} (moe-unfuse check {spec.source})",
        drift.UNPROVEN: f"unproven (in transformers {version}, no verified_on)",
    }[drift.status(spec, present=True)]


def rows(
    archs: list[str] | None = None, run: bool = False, modelopt: bool = True, results: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """One row per spec: the table's columns, as strings."""
    from ...base import versions
    from ...spec.catalog import specs as list_specs

    version = versions.installed_version()
    out = []
    for arch, spec in list_specs().items():
        if archs and arch not in archs:
            continue
        present = spec.resolve_class() is not None
        if not present:
            status = f"class not in transformers {version}"
        elif results is not None:
            status = _status_from_results(arch, results)
        elif run:
            status = _status_run(spec, modelopt)
        else:
            status = _status_default(spec, version)
        out.append(
            {
                "arch": arch,
                "class": spec.class_name,
                "layout": layout_kind(spec),
                "golden test": golden_scope(spec),
                "verified on": ", ".join(spec.verified_on.get("transformers", ())) or "-",
                "status": status,
            }
        )
    return out


def markdown(table: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in table:
        cells = [f"`{r[c]}`" if c == "class" else r[c] for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_section(table: list[dict[str, str]]) -> str:
    """The generated README section, markers included: from the specs alone (no status column,
    no installed version), so it is the same on every transformers the suite runs on."""
    head = (
        f'{len(table)} specs. "verified on" lists the transformers versions each spec\'s golden test passed on. '
        "Generated from `specs/` by `moe-unfuse coverage --markdown --write README.md`; do not edit by hand "
        "(`tests/test_coverage_table.py` fails when it is stale). Each spec's golden test is "
        "`pytest --arch ARCH`; `moe-unfuse coverage --run` runs them on the installed transformers and shows the result, "
        "`moe-unfuse list` where each spec stands on it."
    )
    return f"{START}\n{head}\n\n{markdown(table, README_COLUMNS)}\n{END}"


def replace_section(text: str, section: str, source: str) -> str:
    """``text`` with the marked section replaced; one-line error when the markers are missing."""
    from ...base.errors import MoeUnfuseError

    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise MoeUnfuseError(
            f"{source}: no {START} ... {END} section; fix: add the two markers where the table belongs"
        )
    return text[:start] + section + text[end + len(END) :]


def plain(table: list[dict[str, str]]) -> str:
    widths = {c: max([len(c)] + [len(r[c]) for r in table]) for c in COLUMNS}
    lines = ["  ".join(f"{c:{widths[c]}}" for c in COLUMNS)]
    lines += ["  ".join(f"{r[c]:{widths[c]}}" for c in COLUMNS) for r in table]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ...base.errors import MoeUnfuseError
    from ...tools.golden_results import read_results

    if args.run and args.results:
        raise MoeUnfuseError("--run and --results both set the status column; fix: pass one of them")
    if args.write and (args.run or args.results or args.arch):
        raise MoeUnfuseError(
            "--write writes the README table, which lists every spec with the default status; fix: drop --run/--results/--arch"
        )
    results = read_results(args.results) if args.results else None
    archs = args.arch.split(",") if args.arch else None
    if archs:
        from ...spec.catalog import specs as list_specs

        unknown = sorted(set(archs) - set(list_specs()))
        if unknown:
            raise MoeUnfuseError(f"--arch: unknown arch {', '.join(unknown)}; fix: pick from moe-unfuse list")
    table = rows(archs, run=args.run, modelopt=not args.no_modelopt, results=results)
    if args.write:
        fix = f"fix: pass the README.md that holds the {START} ... {END} section"
        try:
            text = args.write.read_text()
        except OSError as exc:
            raise MoeUnfuseError(f"{args.write}: cannot be read ({exc.strerror}); {fix}") from None
        new = replace_section(text, readme_section(table), str(args.write))
        try:
            args.write.write_text(new)
        except OSError as exc:
            raise MoeUnfuseError(f"{args.write}: cannot be written ({exc.strerror}); fix: make it writable") from None
        print(f"wrote the coverage table ({len(table)} specs) to {args.write}")
        return 0
    print(markdown(table) if args.markdown else plain(table))
    if results is not None:
        print(
            f"\n(status from {args.results}: transformers {results.get('transformers', '?')}, torch {results.get('torch', '?')})"
        )
    failed = any(r["status"].startswith("FAIL") for r in table)
    return 1 if failed else 0
