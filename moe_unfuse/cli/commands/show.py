"""Print a spec, resolved (its extends chain merged in), as YAML: ARCH or a spec file path."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arch", metavar="ARCH", help="an arch name (moe-unfuse list) or a spec .yaml file")


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..spec_lookup import resolve_spec

    spec = resolve_spec(args.arch)
    print(f"# {spec.arch}: resolved from {spec.source}")
    print(yaml.safe_dump(dict(spec.raw), sort_keys=False, default_flow_style=None, width=120), end="")
    return 0
