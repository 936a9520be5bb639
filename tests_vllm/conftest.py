"""The engine loader tests run in their own environment (``.venv-vllm``: vLLM brings its own torch), over
exports the main environment wrote (``tests_vllm/make_exports.py DIR``); see the README's "CI" section."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--exports",
        default=os.environ.get("MOE_UNFUSE_ENGINE_EXPORTS"),
        help="folder written by tests_vllm/make_exports.py (default: $MOE_UNFUSE_ENGINE_EXPORTS)",
    )
    parser.addoption(
        "--update-results",
        action="store_true",
        help="write moe_unfuse/tools/engine_loads.json from this run instead of comparing with it",
    )


def manifest(config: pytest.Config) -> dict:
    folder = config.getoption("--exports")
    if not folder or not (Path(folder) / "manifest.json").is_file():
        raise pytest.UsageError(
            f"--exports {folder!r}: no manifest.json there; fix: run `.venv/bin/python tests_vllm/make_exports.py DIR` "
            "in the main environment and pass DIR (or set MOE_UNFUSE_ENGINE_EXPORTS)"
        )
    data = json.loads((Path(folder) / "manifest.json").read_text())
    data["root"] = folder
    return data


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "entry" in metafunc.fixturenames:
        data = manifest(metafunc.config)
        entries = [dict(e, root=data["root"]) for e in data["entries"]]
        metafunc.parametrize("entry", entries, ids=[e["path"].replace("/", "-") for e in entries])
