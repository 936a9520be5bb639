"""``infer`` on fused layouts no library has (tests/fused_layouts.py): parameters found by structure
whatever their names, classes built from plain integer keyword arguments, sizes no attribute
holds read from the parameters; each draft then passes every golden check from YAML alone."""

from __future__ import annotations

import fused_layouts
import pytest
import yaml

from moe_unfuse import load_spec
from moe_unfuse.cli.main import main
from moe_unfuse.tools import golden
from moe_unfuse.tools.draft import draft as draft_spec

pytestmark = pytest.mark.arch("gemma4")


def test_w13_layout_is_found_by_structure():
    draft = draft_spec(fused_layouts.W13Experts)
    spec = draft.spec
    assert spec["params"] == {
        "w13": {
            "axes": ["expert", "out", "in"],
            "shape": ["num_experts", "2*intermediate", "hidden"],
            "into": ["gate_proj", "up_proj"],
            "packing": "concatenated",
            "bias": "b13",
        },
        "w2": {
            "axes": ["expert", "out", "in"],
            "shape": ["num_experts", "hidden", "intermediate"],
            "into": ["down_proj"],
            "bias": "b2",
        },
    }
    assert spec["golden"]["config_arg"] is False and spec["golden"]["module_kwargs"] == {
        "num_experts": 4,
        "hidden_size": 64,
        "intermediate_size": 40,
    }
    assert not any("unknown role" in n or "owns no" in n for n in draft.notes)


def test_transposed_layout_with_sizes_read_from_parameters():
    spec = draft_spec(fused_layouts.PackedTransposedExperts).spec
    assert spec["dims"] == {
        "num_experts": "n_experts",
        "hidden": {"param": "wi", "axis": 1},
        "intermediate": {"param": "wo", "axis": 1},
    }
    assert spec["params"]["wi"]["axes"] == ["expert", "in", "out"] and spec["params"]["wi"]["shape"] == [
        "num_experts",
        "hidden",
        "2*intermediate",
    ]
    assert spec["params"]["wo"]["into"] == ["down_proj"] and spec["forward"]["args"] == {
        "x": "hidden_states",
        "idx": "top_k_index",
        "w": "top_k_weights",
    }


@pytest.mark.parametrize("cls", ["W13Experts", "PackedTransposedExperts"])
def test_the_drafts_pass_every_golden_check(tmp_path, capsys, cls):
    code = main(["draft", f"fused_layouts.{cls}", "--out", str(tmp_path)])
    assert code == 1  # undecorated: the draft lists what to check, and is written all the same
    path = next(tmp_path.glob("*.yaml"))
    assert yaml.safe_load(path.read_text())["target"]["class"] == f"fused_layouts.{cls}"
    results = golden.run_golden(load_spec(path), modelopt=False)
    assert results and all(r.ok for r in results), [(r.name, r.detail) for r in results if not r.ok]
