"""The lock on ``--out`` is taken before anything is loaded: a second run to the same ``--out`` fails
at once, before loading or calibrating (asserted on the order of events, never on time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_unfuse.base.errors import MoeUnfuseError
from moe_unfuse.cli.main import main
from moe_unfuse.quant import quantize
from moe_unfuse.quant.out_dir import out_lock

pytestmark = pytest.mark.arch("gemma4")


def test_second_quantize_to_a_locked_out_fails_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")  # loading it would fail with another message
    events: list[str] = []
    for name in ("load_model", "load_offloaded", "tiny_gemma4"):
        monkeypatch.setattr(quantize, name, lambda *a, _n=name, **k: events.append(_n))
    out = tmp_path / "out"
    with out_lock(out):  # the first run, still going
        for args in ([str(model), "--device-map", "cpu"], []):  # a folder, and the built-in model
            assert main(["quantize", *args, "--qformat", "fp8", "--out", str(out), "--no-progress"]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "another moe-unfuse run is writing it" in err, err
    assert events == [] and not out.exists()


def test_a_refused_run_leaves_the_holders_lock_in_place(tmp_path: Path) -> None:
    """Before, a refused run removed the lock file on its way out, and a third run then locked a new
    file next to the holder's: two runs writing one --out."""
    out = tmp_path / "out"
    with out_lock(out):
        for _ in range(2):  # the second refusal proves the first left the lock as it was
            with pytest.raises(MoeUnfuseError, match="another moe-unfuse run"):
                with out_lock(out):
                    pass
        assert (tmp_path / "out.lock").exists()
    assert not (tmp_path / "out.lock").exists()
    with out_lock(out):  # released: free again
        pass
