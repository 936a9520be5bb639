"""The README's export table is the one the specs generate."""

from __future__ import annotations

from pathlib import Path

from moe_unfuse.export_table import END, START, markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_export_table_is_current() -> None:
    text = README.read_text()
    section = START + text.split(START, 1)[1].split(END, 1)[0] + END
    assert section == markdown(), "stale: run `python -m moe_unfuse.export_table --write README.md`"
    assert "| gemma4 | per-expert (hub is fused) | `model.layers.0.experts.0.gate_proj.weight`" in section
    assert "| gpt_oss | fused (hub layout) | `model.layers.0.mlp.experts.gate_up_proj`" in section
    assert "| mixtral | per-expert | `model.layers.0.block_sparse_moe.experts.0.w1.weight`" in section
