"""A seeded corrupter over a good export: every corruption ends in a report that fails (or, for the
few harmless ones, passes) or in one-line :class:`MoeUnfuseError`, never another exception.
Bounded: 60 corruptions of a tiny checkpoint, about 20 s."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moe_unfuse
from moe_unfuse.errors import MoeUnfuseError
from moe_unfuse.quantize import quantize_model
from moe_unfuse.tiny import tiny_gemma4

pytestmark = [pytest.mark.arch("gemma4"), pytest.mark.usefixtures("one_thread")]
SEED, CASES = 1234, 60
HARMLESS = {
    "drop-metadata",
    "garbage-metadata",
}  # moe_unfuse.json is provenance; the contract is computed from config.json
# (Unquantized tensors cast to another float dtype are not corrupted: engines cast them on load; the
# corrupter casts quantized weights and scales, which an engine would misread.)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_gemma4(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    ids = {"input_ids": torch.randint(4, 200, (2, 32), generator=torch.Generator().manual_seed(0))}
    result = quantize_model(model, "fp8", [ids], progress=False)
    out = tmp_path_factory.mktemp("good") / "ckpt"
    _, report = moe_unfuse.export_checkpoint(model, out, specs=result.specs, qformat="fp8", progress=False)
    assert report.ok, str(report)
    return out


def _tensors(path: Path, edit: Callable[[dict, random.Random], None], rng: random.Random) -> None:
    f = path / "model.safetensors"
    with safe_open(f, "pt") as fh:
        data = {k: fh.get_tensor(k) for k in fh.keys()}
    edit(data, rng)
    save_file(data, str(f), metadata={"format": "pt"})


def _pick(data: dict, rng: random.Random, suffix: str | tuple[str, ...] = "") -> str:
    return rng.choice(sorted(k for k in data if k.endswith(suffix)))


def _pick_quantized(data: dict, rng: random.Random) -> str:
    """A quantized weight or a scale: what an engine reads by dtype."""
    return rng.choice(
        sorted(
            k
            for k in data
            if k.endswith(("weight_scale", "weight_scale_2", "input_scale"))
            or k.endswith(".weight")
            and k[: -len("weight")] + "weight_scale" in data
        )
    )


CORRUPTIONS: dict[str, Callable[[Path, random.Random], None]] = {
    "truncate": lambda p, r: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[: r.randrange(1, 4000)]
    ),
    "flip-header": lambda p, r: _flip(p / "model.safetensors", r, 8, 400),
    "drop-config": lambda p, r: (p / "config.json").unlink(),
    "drop-quant-config": lambda p, r: (p / "hf_quant_config.json").unlink(),
    "drop-weights": lambda p, r: (p / "model.safetensors").unlink(),
    "drop-metadata": lambda p, r: (p / "moe_unfuse.json").unlink(),
    "garbage-json": lambda p, r: (p / r.choice(["config.json", "hf_quant_config.json"])).write_text(
        r.choice(["{", "[]", "3", "null", "\xff\xfe", "[" * 5000])
    ),
    "garbage-metadata": lambda p, r: (p / "moe_unfuse.json").write_text(r.choice(["{", "[]", "3", "null", "[" * 5000])),
    "drop-tensor": lambda p, r: _tensors(p, lambda d, r: d.pop(_pick(d, r)), r),
    "rename-tensor": lambda p, r: _tensors(p, lambda d, r: d.__setitem__(_pick(d, r) + "_x", d.pop(_pick(d, r))), r),
    "nan-scale": lambda p, r: _tensors(
        p,
        lambda d, r: d.__setitem__(
            k := _pick(d, r, ("weight_scale", "weight_scale_2", "input_scale")), torch.full_like(d[k], float("nan"))
        ),
        r,
    ),
    "zero-scale": lambda p, r: _tensors(
        p, lambda d, r: d.__setitem__(k := _pick(d, r, "input_scale"), torch.zeros_like(d[k])), r
    ),
    "wrong-dtype": lambda p, r: _tensors(
        p,
        lambda d, r: d.__setitem__(
            k := _pick_quantized(d, r),
            d[k].to(r.choice([t for t in (torch.float32, torch.bfloat16, torch.float16) if t != d[k].dtype])),
        ),
        r,
    ),
    "transpose": lambda p, r: _tensors(
        p, lambda d, r: d.__setitem__(k := _pick(d, r, "k_proj.weight"), d[k].t().contiguous()), r
    ),
    "extra-tensor": lambda p, r: _tensors(
        p, lambda d, r: d.__setitem__(f"model.extra_{r.randrange(99)}.weight", torch.zeros(3)), r
    ),
    "exclude-all": lambda p, r: _json(
        p, "hf_quant_config.json", lambda j: j["quantization"].__setitem__("exclude_modules", ["*"])
    ),
    "relabel": lambda p, r: _json(
        p, "hf_quant_config.json", lambda j: j["quantization"].__setitem__("quant_algo", "NVFP4")
    ),
}


def _flip(f: Path, rng: random.Random, lo: int, hi: int) -> None:
    data = bytearray(f.read_bytes())
    for _ in range(4):
        i = rng.randrange(lo, min(hi, len(data)))
        data[i] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))


def _json(path: Path, name: str, edit: Callable[[dict], None]) -> None:
    j = json.loads((path / name).read_text())
    edit(j)
    (path / name).write_text(json.dumps(j))


def test_corrupted_checkpoints_fail_cleanly(good: Path, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    counts = {"failed": 0, "error": 0, "accepted": 0}
    accepted = []
    for i in range(CASES):
        kind = rng.choice(sorted(CORRUPTIONS))
        path = tmp_path / f"c{i}"
        shutil.copytree(good, path)
        CORRUPTIONS[kind](path, rng)
        try:
            report = moe_unfuse.verify_checkpoint(path)
        except MoeUnfuseError as exc:
            assert len(str(exc).splitlines()) == 1 and "fix:" in str(exc), (kind, str(exc))
            counts["error"] += 1
            continue
        if report.ok:
            counts["accepted"] += 1
            accepted.append(kind)
        else:
            counts["failed"] += 1
    assert set(accepted) <= HARMLESS, accepted
    assert counts["failed"] + counts["error"] == CASES - len(accepted) and counts["failed"] and counts["error"]
