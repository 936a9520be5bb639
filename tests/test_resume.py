"""Layer by layer at scale: a run killed for real (SIGKILL, at several points) and started again with
the same command resumes from its last committed layer and writes the uninterrupted run's checkpoint
byte for byte; state from another model, data or options is discarded in one line; cached
activations through all three tiers (device, host, disk) give the whole-model checkpoint; the
device is chosen and checked; the report summarizes long expert lists.

The kills are the test hook ``MOE_UNFUSE_TEST_SIGKILL`` in a forked copy of this process (no
interpreter start-up per run), at fixed points, so nothing depends on timing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_same_checkpoint, killed_at, same_files, save_tiny
from test_layerwise import CALIB

from moe_unfuse.cli.main import main

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.arch("gemma4")]


def test_killed_runs_resume_to_the_uninterrupted_checkpoint(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    model = save_tiny("gemma4", tmp_path / "model")
    run = ["quantize", str(model), "--qformat", "nvfp4", "--layerwise", *CALIB]
    assert main([*run, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    args = [*run, "--out", str(out)]
    state = tmp_path / "out.resume" / "state"

    killed_at("after-layer:1", args)
    assert sorted(p.name for p in state.iterdir()) == ["fingerprint.json", "layer-0", "layer-1"]
    assert not (state / "layer-0" / "outputs").exists() and (state / "layer-1" / "outputs").is_dir()
    capfd.readouterr()
    killed_at("mid-save:2", args)  # resumes after layer 1, dies while committing layer 2
    assert "decoder layers 0-1 of 4 were calibrated by an earlier run" in capfd.readouterr().err
    assert (state / "layer-2.tmp").is_dir() and not (state / "layer-2").exists()
    killed_at("before-export", args)  # the half-written layer 2 is not taken: layers 2 and 3 run again
    assert "decoder layers 0-1 of 4" in capfd.readouterr().err
    assert not out.exists()

    assert main(args) == 0  # every layer restored: straight to the export
    captured = capfd.readouterr()
    assert "decoder layers 0-3 of 4 were calibrated by an earlier run" in captured.err
    assert "layers 0-3 resumed" in captured.out
    same_files(tmp_path / "ref", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "ref"], "OUT.resume is removed"


def test_state_of_other_data_is_discarded_in_one_line(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    model = save_tiny("gemma4", tmp_path / "model")
    out = tmp_path / "out"
    base = ["quantize", str(model), "--qformat", "fp8", "--layerwise", "--out", str(out), "--no-progress"]
    killed_at("after-layer:0", [*base, "--calib-size", "4", "--seq-len", "32"])
    capfd.readouterr()
    assert main([*base, "--calib-size", "2", "--seq-len", "32"]) == 0
    said = [line for line in capfd.readouterr().err.splitlines() if "discarded" in line]
    assert len(said) == 1 and "the calibration data differ; starting from layer 0" in said[0]
    assert not (tmp_path / "out.resume").exists()


def test_activations_through_every_tier_give_the_whole_model_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Budgets small enough that a layer's cached values land on the execution device, in host memory
    and on disk (the same code as on a GPU, where the first two differ): the whole-model checkpoint,
    and no file left."""
    import moe_unfuse.quant.layerwise as layerwise

    model = save_tiny("gemma4", tmp_path / "model")
    whole = ["quantize", str(model), "--qformat", "nvfp4", "--out", str(tmp_path / "whole"), "--no-layerwise"]
    assert main([*whole, *CALIB]) == 0
    monkeypatch.setenv("MOE_UNFUSE_ACTIVATIONS_DEVICE_BYTES", "30000")  # one captured input of 29 kB fits
    monkeypatch.setenv("MOE_UNFUSE_ACTIVATIONS_HOST_BYTES", "30000")
    tiers: list[str] = []
    put = layerwise._Activations.put

    def record(self: layerwise._Activations, b: int, value: object) -> None:
        put(self, b, value)
        tiers.append(self.where[b])

    monkeypatch.setattr(layerwise._Activations, "put", record)
    lw = ["quantize", str(model), "--qformat", "nvfp4", "--out", str(tmp_path / "lw"), "--layerwise"]
    assert main([*lw, *CALIB]) == 0
    assert set(tiers) == {"device", "host", "disk"}, tiers
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "lw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lw", "model", "whole"]


def test_device_defaults_to_this_ranks_gpu_and_bad_devices_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from moe_unfuse.quant import distributed

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert distributed.execution_device() == torch.device("cuda", 2)
    assert distributed.execution_device("cuda") == torch.device("cuda", 2)
    assert distributed.execution_device("cuda:1") == torch.device("cuda", 1)
    assert distributed.execution_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 0)
    assert distributed.execution_device() == torch.device("cpu")
    for device, why in (("gpu0", "not a device"), ("cuda:0", "no such CUDA GPU here"), ("meta", "only cpu and cuda")):
        out = tmp_path / device
        assert main(["quantize", "--qformat", "fp8", "--out", str(out), "--device", device, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and "fix:" in err[0] and not out.exists()


def test_report_summarizes_long_expert_lists() -> None:
    """At 128 experts the report lists no expert numbers beyond 16: a count and ranges instead."""
    from moe_unfuse.quant.report import expert_list

    idle = [0, 1, 2, 3, 7, *range(9, 41)]
    assert expert_list(idle, 128) == "37 of 128 experts (0-3, 7, 9-40)"
    assert expert_list([3, 5, 8]) == "#3,5,8"
    many = list(range(0, 128, 2))
    assert expert_list(many, 128) == "64 of 128 experts (0, 2, 4, 6, 8, 10, ...)"
