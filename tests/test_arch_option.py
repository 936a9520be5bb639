"""``pytest --arch``: selects one architecture's tests; an unknown name is a usage error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_S

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S
    )


@pytest.mark.arch("gemma4")
def test_unknown_arch_is_a_usage_error_listing_known_ones():
    result = run_pytest("--arch", "gemma4,nosuchmoe", "--collect-only", "-q")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "unknown arch nosuchmoe" in result.stderr and "gemma4" in result.stderr


@pytest.mark.arch("gemma4")
def test_arch_selects_only_that_architecture():
    result = run_pytest("--arch", "gemma4", "--collect-only", "-q", "tests/test_golden.py", "tests/test_layout.py")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert ids and all(re.search(r"[\[-]gemma4\]$", i) for i in ids), ids
    assert not any("test_layout" in i for i in ids)
