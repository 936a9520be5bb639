"""Print a spec, resolved (its extends chain merged in), as YAML: ARCH or a spec file path."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arch", metavar="ARCH", help="an arch name (moe-unfuse list) or a spec .yaml file")


def resolve_spec(arch_or_path: str):
    """The spec named ``arch_or_path``, or loaded from that file (extends searched next to it and in the built-in specs)."""
    from .. import get_spec, load_spec
    from ..plugins import registry

    path = Path(arch_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        dirs = tuple(dict.fromkeys(p.parent if p.is_file() else p for p in registry().spec_paths))
        return load_spec(path, dirs)
    return get_spec(arch_or_path)


def run(args: argparse.Namespace) -> int:
    import yaml

    spec = resolve_spec(args.arch)
    print(f"# {spec.arch}: resolved from {spec.source}")
    print(yaml.safe_dump(dict(spec.raw), sort_keys=False, default_flow_style=None, width=120), end="")
    return 0
