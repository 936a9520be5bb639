"""Fuzz the spec loader: every mutant of a built-in spec is accepted or fails with one SpecError line.

The mutants come from a seeded mutator (tests/spec_fuzz.py), so a failure names its seed and
index. Before the loader was hardened, 1,500 mutants gave 177 tracebacks (16 of them a SIGSEGV
in the C YAML loader, 29 RecursionErrors, UnicodeDecodeErrors, multi-kilobyte error lines).
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import spec_fuzz

from moe_unfuse import SpecError, load_spec

pytestmark = pytest.mark.arch("gemma4")

SEED = 0
#: A fixed count, never a time budget: the same mutants run on any machine, however slow or loaded.
COUNT = 500


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_every_mutant_is_accepted_or_one_spec_error_line(tmp_path):
    counts: collections.Counter[str] = collections.Counter()
    bad = []
    for mutant in spec_fuzz.mutants(SEED, COUNT):
        path = write(tmp_path / "mutant.yaml", mutant.data)
        kind, detail = spec_fuzz.outcome(path)
        counts[kind] += 1
        if kind == "traceback":
            bad.append(f"{mutant.name}: {detail}")
    tried = sum(counts.values())
    print(
        f"spec fuzz: tried {tried}, clean {counts['clean']}, traceback {counts['traceback']}, accepted {counts['accepted']}"
    )
    assert tried == COUNT and counts["clean"] and counts["accepted"], counts
    assert not bad, f"{len(bad)} of {tried} mutants escaped as non-SpecError: " + "; ".join(bad[:5])


def test_registry_mode_is_as_strict(tmp_path):
    """``check_import=False`` (how the registry loads) still refuses the hostile mutants cleanly."""
    for mutant in spec_fuzz.mutants(SEED + 1, 200):
        path = write(tmp_path / "mutant.yaml", mutant.data)
        kind, detail = spec_fuzz.outcome(path, check_import=False)
        assert kind != "traceback", f"{mutant.name}: {detail}"


def test_1300_long_extends_chain(tmp_path):
    last = spec_fuzz.extends_chain(tmp_path, 1300)
    with pytest.raises(SpecError) as err:
        load_spec(last)
    assert err.value.field == "extends" and "chain longer than" in str(err.value) and "\n" not in str(err.value)
