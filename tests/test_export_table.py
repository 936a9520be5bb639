"""The README's export table is the one the specs generate (on the installed transformers: a spec whose
class it lacks keeps the row another version generated)."""

from __future__ import annotations

from pathlib import Path

import moe_unfuse
from moe_unfuse.tools.export_table import END, START, markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def _rows(section: str) -> dict[str, str]:
    return {
        line.split("|")[1].strip(): line
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| arch")
    }


def test_readme_export_table_is_current() -> None:
    text = README.read_text()
    section = START + text.split(START, 1)[1].split(END, 1)[0] + END
    current, generated = _rows(section), _rows(markdown())
    assert current.keys() == generated.keys(), "stale: run `python -m moe_unfuse.tools.export_table --write README.md`"
    installed = {arch for arch, spec in moe_unfuse.list_specs().items() if spec.resolve_class() is not None}
    stale = [arch for arch in installed if current[arch] != generated[arch]]
    assert not stale, f"stale rows {stale}: run `python -m moe_unfuse.tools.export_table --write README.md`"
    assert "| gemma4 | per-expert (hub is fused) | `model.layers.0.experts.0.gate_proj.weight`" in section
    assert (
        "| gpt_oss | fused (hub layout); experts BF16 for vllm, sglang | `model.layers.0.mlp.experts.gate_up_proj`"
        in section
    )
    assert "| mixtral | per-expert | `model.layers.0.block_sparse_moe.experts.0.w1.weight`" in section
