"""Bad input to ``moe-unfuse quantize``: one line naming the file and the fix, exit 2, nothing written;
and stdout carries the report alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_unfuse.cli.main import main
from moe_unfuse.hub.tiny import byte_tokenizer, tiny_gemma4

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("quantize_bad_input")]
QUICK = ["--qformat", "fp8", "--calib-size", "2", "--seq-len", "32", "--device-map", "cpu", "--no-progress"]


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "fix:" in err[0] and "Traceback" not in captured.err, captured.err
    assert all(n in err[0] for n in needles), err[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "model"
    tiny_gemma4().save_pretrained(path)
    return path


def test_folder_without_tokenizer(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _one_line_exit_2(
        ["quantize", str(model_dir), "--out", str(tmp_path / "o"), *QUICK], capsys, "tokenizer", str(model_dir)
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"model_type": "no_such_model"}'])
def test_corrupt_config(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: str) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(content)
    _one_line_exit_2(["quantize", str(src), "--out", str(tmp_path / "o"), *QUICK], capsys, "config.json")


def test_forward_failure_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A model whose vocabulary is smaller than the tokenizer's ids: the embedding lookup fails."""
    src = tmp_path / "m"
    tiny_gemma4(vocab_size=64, vocab_size_per_layer_input=64).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    _one_line_exit_2(["quantize", str(src), "--out", str(tmp_path / "o"), *QUICK], capsys, "forward failed")


def test_stdout_is_the_report_alone(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    byte_tokenizer().save_pretrained(tmp_path / "m")
    for f in model_dir.iterdir():
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    assert main(["quantize", str(tmp_path / "m"), "--out", str(tmp_path / "o"), *QUICK]) == 0
    captured = capsys.readouterr()
    heads = {line.split()[0] for line in captured.out.splitlines() if line and not line.startswith(" ")}
    assert heads <= {"model", "coverage", "calibrate", "scales", "export", "size", "verify", "checkpoint"}, captured.out
    assert (
        "Inserted" not in captured.out
        and "Writing model shards" not in captured.err
        and "Loading weights" not in captured.err
    )


def test_dense_model_says_there_are_no_experts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    src = tmp_path / "dense"
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=272,
    )
    config.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    assert main(["quantize", str(src), "--out", str(tmp_path / "o"), *QUICK, "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "no fused expert modules in this model" in out and "(no experts modules: nothing to count)" in out
    assert "every expert received tokens" not in out and json.loads((tmp_path / "r.json").read_text())["verify"]["ok"]
