"""Data-parallel calibration: ``torchrun --nproc-per-node 2 -m moe_unfuse quantize`` on CPU (gloo)
writes a checkpoint bit-identical to one process on the same batches, forced routing included."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_S
from safetensors.torch import load_file

from moe_unfuse.cli.main import main

pytestmark = [pytest.mark.arch("gemma4"), pytest.mark.usefixtures("one_thread")]
# 2 samples of 8 tokens: some experts get no routed token, so forced routing runs on rank 0.
ARGS = [
    "--qformat",
    "fp8",
    "--calib-size",
    "2",
    "--seq-len",
    "8",
    "--batch-size",
    "1",
    "--no-progress",
    "--force-routing",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def test_two_ranks_write_the_single_process_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["quantize", *ARGS, "--out", str(one)]) == 0
    assert "forced routing calibrated them" in capsys.readouterr().out  # the forced path is exercised
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "moe_unfuse", "quantize", *ARGS, "--out", str(two)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sum(line.startswith("checkpoint ") for line in run.stdout.splitlines()) == 1  # rank 0 alone reports
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(_bits(a[k]), _bits(b[k]))] == []
    assert json.loads((one / "moe_unfuse.json").read_text()) == json.loads((two / "moe_unfuse.json").read_text())


def test_modelopt_sync_is_replaced() -> None:
    from moe_unfuse.quant import distributed

    assert distributed.without_modelopt_sync({"quant_cfg": [], "algorithm": "max"})["algorithm"] == {
        "method": "max",
        "distributed_sync": False,
    }
    assert distributed.Group(1, 3).shard(list(range(8))) == [1, 4, 7] and not distributed.Group(1, 3).writer


def test_two_ranks_layer_by_layer_write_the_single_process_whole_model_checkpoint(tmp_path: Path) -> None:
    """Both scale paths at once: 2 ranks, each calibrating its batches one decoder layer at a time
    from a disk-offloaded model, against one process holding the whole model."""
    from moe_unfuse.hub.tiny import byte_tokenizer, tiny_gemma4

    model, one, two = tmp_path / "model", tmp_path / "one", tmp_path / "two"
    tiny_gemma4().save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    assert main(["quantize", str(model), *ARGS, "--no-layerwise", "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "moe_unfuse", "quantize", str(model), *ARGS, "--layerwise",
           "--out", str(two)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mode       layer by layer" in run.stdout
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(_bits(a[k]), _bits(b[k]))] == []
    assert json.loads((one / "moe_unfuse.json").read_text()) == json.loads((two / "moe_unfuse.json").read_text())

    # a process with no batch of its own has no forward to plan the layer calls on: one line, nothing written
    cmd[cmd.index("--calib-size") + 1] = "1"
    cmd[cmd.index("--master-port") + 1] = str(_free_port())
    cmd[-1] = str(tmp_path / "three")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_S)
    said = [line for line in run.stderr.splitlines() if "error: --calib-size" in line]
    assert run.returncode != 0 and said and all("1 calibration batch(es) for 2 processes" in line for line in said)
    assert not (tmp_path / "three").exists() and not (tmp_path / "three.resume").exists()
