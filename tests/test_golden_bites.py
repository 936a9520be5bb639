"""The golden test can fail: deliberately broken Gemma 4 specs must not pass it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import moe_unfuse
from moe_unfuse import golden, load_spec
from moe_unfuse.spec import merged_raw

pytestmark = pytest.mark.arch("gemma4")


def broken_spec(tmp_path: Path, edit) -> moe_unfuse.Spec:
    raw = copy.deepcopy(merged_raw(Path(moe_unfuse.get_spec("gemma4").source)))
    edit(raw)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_spec(path)


def test_swapped_gate_and_up_fails_exactness(tmp_path):
    spec = broken_spec(tmp_path, lambda r: r["params"]["gate_up_proj"].update(into=["up_proj", "gate_proj"]))
    for dtype in (torch.float32, torch.bfloat16):
        result = golden.check_exact(spec, dtype)
        assert not result.ok, result.detail
    assert not all(r.ok for r in golden.check_implementations(spec, torch.float32))


def test_interleaved_instead_of_concatenated_fails(tmp_path):
    spec = broken_spec(tmp_path, lambda r: r["params"]["gate_up_proj"].update(packing="interleaved"))
    assert not golden.check_exact(spec, torch.float32).ok


def test_wrong_orientation_fails(tmp_path):
    # Transposed axes with no shape to catch it early: the views get the wrong shapes and the
    # golden check cannot even run the forward.
    def edit(r):
        for p in r["params"].values():
            p["axes"] = ["expert", "in", "out"]
            p.pop("shape")

    spec = broken_spec(tmp_path, edit)
    with pytest.raises((RuntimeError, moe_unfuse.SpecError)):
        golden.check_exact(spec, torch.float32)


def test_wrong_activation_fails(tmp_path):
    spec = broken_spec(tmp_path, lambda r: r.update(activation={"name": "silu"}))
    assert not golden.check_exact(spec, torch.float32).ok


def test_correct_spec_passes_every_check():
    results = golden.run_golden(moe_unfuse.get_spec("gemma4"), modelopt=False)
    assert results and all(r.ok for r in results), [(r.name, r.detail) for r in results if not r.ok]
