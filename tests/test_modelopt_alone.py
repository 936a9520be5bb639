"""What plain modelopt does with every spec's whole tiny model, measured beside moe_unfuse
(:mod:`moe_unfuse.tools.modelopt_alone`): the README's table is that measurement on the pinned modelopt
(regenerate: ``python -m moe_unfuse.tools.modelopt_alone --write README.md``); on any other version the
same run must still hold what the README's opening claims of every release."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

from moe_unfuse.tools.modelopt_alone import END, PINNED_MODELOPT, START, Row, markdown, measure

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[Row]:
    return measure(work=tmp_path_factory.mktemp("modelopt-alone"))


def test_readme_table_is_the_measurement_on_the_pinned_modelopt(rows: list[Row]) -> None:
    installed = version("nvidia-modelopt")
    section = START + README.read_text().split(START, 1)[1].split(END, 1)[0] + END
    assert f"nvidia-modelopt {PINNED_MODELOPT}" in section, "the README's table names the pinned modelopt"
    if installed != PINNED_MODELOPT:
        pytest.skip(f"the README's table is generated on modelopt {PINNED_MODELOPT}; installed: {installed}")
    current = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    generated = {
        line.split("|")[1].strip(): line for line in markdown(rows, installed).splitlines() if line.startswith("| ")
    }
    # a family whose class the installed transformers lacks keeps the row another version generated
    stale = [arch for arch in generated if current.get(arch) != generated[arch]]
    assert not stale, f"stale rows {stale}: run `python -m moe_unfuse.tools.modelopt_alone --write README.md`"


def test_measurement_on_the_installed_modelopt(rows: list[Row]) -> None:
    """What holds on every modelopt release the suite runs on (the README's opening relies on it)."""
    by_arch = {r.arch: r for r in rows}
    assert all(r.projections > 0 for r in rows), "moe_unfuse quantized every family's experts"
    # families modelopt recognizes by the standard layout: same names, same bytes
    for arch in ("gemma4", "qwen3_moe", "mixtral"):
        row = by_arch[arch]
        assert row.error is None and row.same_keys, row
        assert row.plain_quantized == row.identical == row.projections, row
    # and some family plain modelopt misses or gets wrong (names, bytes, or an error)
    assert any(
        r.error or not r.same_keys or r.plain_quantized < r.projections or r.identical < r.plain_quantized for r in rows
    ), "plain modelopt matched moe_unfuse on every family: the README's opening must say so"
