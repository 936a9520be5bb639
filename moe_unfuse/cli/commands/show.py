"""Print a spec, resolved (its extends chain merged in), as YAML: ARCH or a spec file path."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arch", metavar="ARCH", help="an arch name (moe-unfuse list) or a spec .yaml file")


def is_path(arch_or_path: str) -> bool:
    path = Path(arch_or_path)
    return path.suffix in (".yaml", ".yml") or path.is_file()


def resolve_spec(arch_or_path: str):
    """The spec named ``arch_or_path``, or loaded from that file (extends searched next to it and in the built-in specs)."""
    from ...plugins.manager import registry
    from ...spec.catalog import get_spec, load_spec

    if is_path(arch_or_path):
        dirs = tuple(dict.fromkeys(p.parent if p.is_file() else p for p in registry().spec_paths))
        return load_spec(Path(arch_or_path), dirs)
    return get_spec(arch_or_path)


def resolved(arch_or_path: str) -> tuple[str, str, dict]:
    """(arch, source, merged mapping) of a spec. A built-in arch is read without the plugin
    registry (see ``list.light_specs``: no torch, no transformers), anything else through it."""
    from .list import light_specs

    light = None if is_path(arch_or_path) else light_specs()
    if light is None:
        spec = resolve_spec(arch_or_path)
        return spec.arch, spec.source, dict(spec.raw)
    if arch_or_path not in light:
        from ...base.errors import UnknownArchError

        raise UnknownArchError(arch_or_path, list(light))
    source, raw = light[arch_or_path]
    return arch_or_path, source, raw


def run(args: argparse.Namespace) -> int:
    import yaml

    arch, source, raw = resolved(args.arch)
    print(f"# {arch}: resolved from {source}")
    print(yaml.safe_dump(raw, sort_keys=False, default_flow_style=None, width=120), end="")
    return 0
