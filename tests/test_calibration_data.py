"""``--calib-dataset``: calibration data streamed from what users have (a JSONL or text file, a
``save_to_disk`` folder or a dataset name through ``datasets``), chat records rendered with the
tokenizer's template, and only as much read as the samples need."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from moe_unfuse.base.errors import MoeUnfuseError
from moe_unfuse.hub.tiny import byte_tokenizer
from moe_unfuse.quant.calibration import calibration_batches, read_calibration_texts

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def _tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _decode(batches) -> str:
    tok = byte_tokenizer()
    return "".join(tok.decode(row.tolist()) for b in batches for row in b["input_ids"])


def test_jsonl_text_and_chat_records(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    records = [
        {"text": "plain text record"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tok = _tokenizer()
    texts = list(read_calibration_texts(path, tok))
    assert texts == ["plain text record", "<user>hi\n<assistant>hello\n"]
    batches = calibration_batches(tok, iter(texts), calib_size=2, seq_len=64, batch_size=1)
    assert _decode(batches) == "<bos>plain text record<eos><user>hi\n<assistant>hello\n<eos>"


def test_only_what_the_samples_need_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"record number {i} " * 4}) + "\n" for i in range(10_000)))
    read = []

    def counted():
        for text in read_calibration_texts(path):
            read.append(text)
            yield text

    batches = calibration_batches(byte_tokenizer(), counted(), calib_size=4, seq_len=32, batch_size=2)
    assert sum(b["input_ids"].shape[0] for b in batches) == 4
    assert len(read) < 10  # 4 samples of 31 tokens: a few records, not 10,000


def test_text_file_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("first paragraph\nstill first\n\nsecond\n")
    assert list(read_calibration_texts(path)) == ["first paragraph\nstill first\n", "second\n"]


@pytest.mark.parametrize(
    "content, name, needle",
    [
        ('{"text": "ok"}\nnot json\n', "c.jsonl", "line 2 is not JSON"),
        ('{"text": "a dict"}', "c.json", "top level is not a list"),
        ("", "c.txt", "contains no text"),
    ],
)
def test_bad_files_are_one_line(tmp_path: Path, content: str, name: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MoeUnfuseError, match=needle) as err:
        list(read_calibration_texts(path))
    assert len(str(err.value).splitlines()) == 1 and "fix:" in str(err.value)


def test_missing_file_and_missing_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MoeUnfuseError, match="no such file or folder"):
        list(read_calibration_texts(tmp_path / "nope.jsonl"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(MoeUnfuseError, match="needs the datasets package"):
        list(read_calibration_texts("some-org/some-dataset"))


def test_save_to_disk_folder_and_dataset_name_go_through_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in ``datasets`` module: the folder is read with ``load_from_disk`` (its train split of a
    DatasetDict), a name with ``load_dataset(..., streaming=True)``."""
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda p: (
        calls.append(("disk", p)) or {"test": [{"text": "no"}], "train": [{"text": "from disk"}]}
    )
    fake.load_dataset = lambda name, split, streaming: (
        calls.append(("hub", name, split, streaming)) or iter([{"text": "from hub"}])
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    folder = tmp_path / "saved"
    folder.mkdir()
    assert list(read_calibration_texts(folder)) == ["from disk"]
    assert list(read_calibration_texts("org/name")) == ["from hub"]
    assert calls == [("disk", str(folder)), ("hub", "org/name", "train", True)]


@pytest.mark.arch("gemma4")
@pytest.mark.usefixtures("one_thread")
def test_quantize_with_a_calibration_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moe_unfuse.cli.main import main

    path = tmp_path / "calib.jsonl"
    path.write_text(
        "".join(
            json.dumps({"text": f"sample {i}: the quick brown fox jumps over the lazy dog"}) + "\n" for i in range(50)
        )
    )
    argv = [
        "quantize",
        "--qformat",
        "fp8",
        "--out",
        str(tmp_path / "o"),
        "--calib-dataset",
        str(path),
        "--calib-size",
        "4",
        "--seq-len",
        "32",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "calibrate  4 samples, 128 tokens" in capsys.readouterr().out
