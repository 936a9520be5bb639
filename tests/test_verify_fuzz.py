"""The project's own checkpoint fuzz: seeded corruptions of good FP8 (one file) and NVFP4 (sharded)
exports, every kind at least once, in five categories (safetensors headers, shard index, config
metadata, names, shapes). Each must end in a report whose named check fails, or one
:class:`MoeUnfuseError` line with a fix; a few kinds are harmless and may pass. Zero tracebacks.

Zero hangs by construction, not by a timeout: verify bounds what it builds from a config before
building it (``moe_unfuse.hub.checkpoint_input``), so a config claiming 10^9 experts or layers is refused
at once; the huge-count kinds are in the table. Bounded work: ``len(KINDS) + RANDOM_CASES`` verifies
of tiny checkpoints."""

from __future__ import annotations

import json
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moe_unfuse
from moe_unfuse.base.errors import MoeUnfuseError
from moe_unfuse.hub.tiny import tiny_gemma4
from moe_unfuse.quant.quantize import quantize_model

pytestmark = [pytest.mark.arch("gemma4"), pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("verify_fuzz")]
SEED, RANDOM_CASES = 1234, 20
HUGE = 10**9


@pytest.fixture(scope="module")
def goods(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"fp8": one safetensors file, "nvfp4": sharded with an index}, each verified ok."""
    out = {}
    for qformat, shard in (("fp8", None), ("nvfp4", "300KB")):
        model = tiny_gemma4(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
        ids = {"input_ids": torch.randint(4, 200, (2, 32), generator=torch.Generator().manual_seed(0))}
        result = quantize_model(model, qformat, [ids], progress=False)
        path = tmp_path_factory.mktemp(qformat) / "ckpt"
        _, report = moe_unfuse.export_checkpoint(
            model, path, specs=result.specs, qformat=qformat, progress=False, max_shard_size=shard
        )
        assert report.ok, str(report)
        out[qformat] = path
    assert (out["nvfp4"] / "model.safetensors.index.json").is_file()
    return out


# --- corrupting a folder ------------------------------------------------------------------------


def _files(p: Path) -> list[Path]:
    return sorted(p.glob("*.safetensors"))


def _file_of(p: Path, suffix: str | tuple[str, ...], rng: random.Random) -> tuple[Path, str]:
    """A (file, key) with a key ending in ``suffix``."""
    found = []
    for f in _files(p):
        with safe_open(f, "pt") as fh:
            found.extend((f, k) for k in fh.keys() if k.endswith(suffix))
    return rng.choice(sorted(found))


def _tensors(p: Path, suffix: str | tuple[str, ...], rng: random.Random, edit: Callable[[dict, str], None]) -> None:
    """Rewrite the file holding a key ending in ``suffix`` with ``edit(tensors, key)`` applied."""
    f, key = _file_of(p, suffix, rng)
    with safe_open(f, "pt") as fh:
        data = {k: fh.get_tensor(k) for k in fh.keys()}
    edit(data, key)
    save_file(data, str(f), metadata={"format": "pt"})
    index = p / "model.safetensors.index.json"
    if index.is_file():  # keep the index in step with the file (names corruptions are about names)
        j = json.loads(index.read_text())
        wm = {k: v for k, v in j["weight_map"].items() if v != f.name}
        wm.update({k: f.name for k in data})
        j["weight_map"] = wm
        index.write_text(json.dumps(j))


def _header(p: Path, rng: random.Random, edit: Callable[[dict], Any]) -> None:
    """Rewrite one safetensors header (the JSON after the 8-byte length), data left as is."""
    f = rng.choice(_files(p))
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    body = edit(header)
    text = body if isinstance(body, bytes) else json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _any_tensor(header: dict, rng: random.Random) -> dict:
    return header[rng.choice(sorted(k for k in header if k != "__metadata__"))]


def _json(p: Path, name: str, edit: Callable[[Any], Any]) -> None:
    j = json.loads((p / name).read_text())
    new = edit(j)  # a list replaces the whole file; anything else: ``j`` was edited in place
    (p / name).write_text(json.dumps(new if isinstance(new, list) else j))


def _quant(p: Path, key: str, value: Any) -> None:
    _json(p, "hf_quant_config.json", lambda j: j["quantization"].__setitem__(key, value))


def _config(p: Path, key: str, value: Any) -> None:
    _json(p, "config.json", lambda j: j.__setitem__(key, value))


def _index(p: Path, edit: Callable[[dict], Any]) -> None:
    _json(p, "model.safetensors.index.json", edit)


def _first(d: dict) -> str:
    return sorted(d["weight_map"])[0]


def _flip(f: Path, rng: random.Random, lo: int, hi: int) -> None:
    data = bytearray(f.read_bytes())
    for _ in range(4):
        i = rng.randrange(lo, min(hi, len(data)))
        data[i] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))


@dataclass(frozen=True)
class Kind:
    category: str
    base: str  # "fp8" (one file) or "nvfp4" (sharded)
    corrupt: Callable[[Path, random.Random], Any]
    #: what must happen: "error" (one MoeUnfuseError line), a check name that must fail, or "harmless"
    #: (may pass: engines read it the same); "error|CHECK": either.
    expect: str


def _half_blocks(d: dict, k: str) -> None:
    d[k] = d[k][:, : d[k].shape[1] // 2].contiguous()


KINDS: dict[str, Kind] = {
    # safetensors headers
    "truncate": Kind(
        "headers",
        "fp8",
        lambda p, r: (f := r.choice(_files(p))).write_bytes(f.read_bytes()[: r.randrange(1, 4000)]),
        "error",
    ),  # fmt: skip
    "flip-header-bytes": Kind("headers", "fp8", lambda p, r: _flip(r.choice(_files(p)), r, 8, 400), "error|hub-names"),
    "header-length-huge": Kind(
        "headers",
        "fp8",
        lambda p, r: (f := r.choice(_files(p))).write_bytes(struct.pack("<Q", 2**62) + f.read_bytes()[8:]),
        "error",
    ),  # fmt: skip
    "header-not-json": Kind("headers", "nvfp4", lambda p, r: _header(p, r, lambda h: b"{" * 50), "error"),
    "header-unknown-dtype": Kind(
        "headers", "fp8", lambda p, r: _header(p, r, lambda h: _any_tensor(h, r).__setitem__("dtype", "Q7")), "error"
    ),  # fmt: skip
    "header-huge-shape": Kind(
        "headers",
        "fp8",
        lambda p, r: _header(p, r, lambda h: _any_tensor(h, r).__setitem__("shape", [HUGE, HUGE])),
        "error",
    ),  # fmt: skip
    "header-offsets-out-of-file": Kind(
        "headers",
        "nvfp4",
        lambda p, r: _header(p, r, lambda h: _any_tensor(h, r).__setitem__("data_offsets", [0, 2**40])),
        "error",
    ),  # fmt: skip
    "header-metadata-garbage": Kind(
        "headers",
        "fp8",
        lambda p, r: _header(p, r, lambda h: h.__setitem__("__metadata__", {"format": 3})),
        "error|harmless",
    ),  # fmt: skip
    "empty-file": Kind("headers", "nvfp4", lambda p, r: r.choice(_files(p)).write_bytes(b""), "error"),
    # shard index
    "index-value-null": Kind(
        "index", "nvfp4", lambda p, r: _index(p, lambda j: j["weight_map"].__setitem__(_first(j), None)), "error"
    ),  # fmt: skip
    "index-value-int": Kind(
        "index", "nvfp4", lambda p, r: _index(p, lambda j: j["weight_map"].__setitem__(_first(j), 7)), "error"
    ),  # fmt: skip
    "index-outside-folder": Kind(
        "index",
        "nvfp4",
        lambda p, r: _index(p, lambda j: j["weight_map"].__setitem__(_first(j), "../x.safetensors")),
        "shards",
    ),  # fmt: skip
    "index-no-weight-map": Kind("index", "nvfp4", lambda p, r: _index(p, lambda j: j.pop("weight_map")), "error"),
    "index-is-a-list": Kind("index", "nvfp4", lambda p, r: _index(p, lambda j: [j]), "error"),
    "index-not-json": Kind(
        "index", "nvfp4", lambda p, r: (p / "model.safetensors.index.json").write_text("{"), "error"
    ),  # fmt: skip
    "index-ghost-tensor": Kind(
        "index",
        "nvfp4",
        lambda p, r: _index(p, lambda j: j["weight_map"].__setitem__("model.ghost.weight", j["weight_map"][_first(j)])),
        "shards",
    ),  # fmt: skip
    "index-wrong-shard": Kind(
        "index",
        "nvfp4",
        lambda p, r: _index(
            p, lambda j: j["weight_map"].__setitem__(_first(j), sorted(set(j["weight_map"].values()))[-1])
        ),
        "shards",
    ),  # fmt: skip
    "index-missing-shard": Kind("index", "nvfp4", lambda p, r: r.choice(_files(p)).unlink(), "error"),
    "index-drops-tensor": Kind(
        "index", "nvfp4", lambda p, r: _index(p, lambda j: j["weight_map"].pop(_first(j))), "shards"
    ),  # fmt: skip
    # config metadata (hf_quant_config.json, config.json, moe_unfuse.json)
    "quantization-null": Kind(
        "metadata",
        "fp8",
        lambda p, r: _json(p, "hf_quant_config.json", lambda j: j.__setitem__("quantization", None)),
        "error",
    ),  # fmt: skip
    "quantization-list": Kind(
        "metadata",
        "nvfp4",
        lambda p, r: _json(p, "hf_quant_config.json", lambda j: j.__setitem__("quantization", [j["quantization"]])),
        "error",
    ),  # fmt: skip
    "quant-algo-int": Kind("metadata", "fp8", lambda p, r: _quant(p, "quant_algo", 8), "error"),
    "quant-algo-list": Kind("metadata", "nvfp4", lambda p, r: _quant(p, "quant_algo", ["NVFP4"]), "error"),
    "quant-algo-dict": Kind("metadata", "fp8", lambda p, r: _quant(p, "quant_algo", {"a": "FP8"}), "error"),
    "relabel-algo": Kind("metadata", "fp8", lambda p, r: _quant(p, "quant_algo", "NVFP4"), "hub-names"),
    "exclude-int": Kind("metadata", "fp8", lambda p, r: _quant(p, "exclude_modules", 3), "error"),
    "exclude-holds-dicts": Kind(
        "metadata", "nvfp4", lambda p, r: _quant(p, "exclude_modules", [{"a": 1}, "lm_head"]), "error"
    ),  # fmt: skip
    "exclude-all": Kind("metadata", "fp8", lambda p, r: _quant(p, "exclude_modules", ["*"]), "unquantized-excluded"),
    "group-size-string": Kind("metadata", "nvfp4", lambda p, r: _quant(p, "group_size", "16"), "error"),
    "kv-algo-int": Kind("metadata", "fp8", lambda p, r: _quant(p, "kv_cache_quant_algo", 8), "error"),
    "architectures-ints": Kind("metadata", "fp8", lambda p, r: _config(p, "architectures", [1, 2]), "error"),
    "architectures-unknown": Kind(
        "metadata", "fp8", lambda p, r: _config(p, "architectures", ["NoSuchModel"]), "hub-names"
    ),  # fmt: skip
    "quantization-config-list": Kind(
        "metadata", "nvfp4", lambda p, r: _config(p, "quantization_config", [1]), "error"
    ),  # fmt: skip
    "ignore-int": Kind(
        "metadata",
        "fp8",
        lambda p, r: _json(p, "config.json", lambda j: j["quantization_config"].__setitem__("ignore", 5)),
        "error",
    ),  # fmt: skip
    "huge-num-experts": Kind("metadata", "fp8", lambda p, r: _config(p, "num_experts", HUGE), "error"),
    "huge-num-layers": Kind("metadata", "nvfp4", lambda p, r: _config(p, "num_hidden_layers", HUGE), "error"),
    "huge-vocab": Kind("metadata", "fp8", lambda p, r: _config(p, "vocab_size", HUGE), "error"),
    "huge-hidden": Kind("metadata", "nvfp4", lambda p, r: _config(p, "hidden_size", 10**6), "error"),
    "bigger-model": Kind("metadata", "fp8", lambda p, r: _config(p, "num_hidden_layers", 3), "hub-names"),
    "config-not-object": Kind("metadata", "fp8", lambda p, r: (p / "config.json").write_text("[]"), "error"),
    "drop-config": Kind("metadata", "nvfp4", lambda p, r: (p / "config.json").unlink(), "error|hub-names"),
    "drop-quant-config": Kind("metadata", "fp8", lambda p, r: (p / "hf_quant_config.json").unlink(), "quant-config"),
    "metadata-engine-int": Kind(
        "metadata", "fp8", lambda p, r: _json(p, "moe_unfuse.json", lambda j: j.__setitem__("engine", 3)), "error"
    ),  # fmt: skip
    "drop-metadata": Kind("metadata", "nvfp4", lambda p, r: (p / "moe_unfuse.json").unlink(), "harmless"),
    "kv-algo-without-scales": Kind(
        "metadata", "nvfp4", lambda p, r: _quant(p, "kv_cache_quant_algo", "NVFP4"), "kv-cache-scales"
    ),  # fmt: skip
    "kv-algo-fp8-without-scales": Kind(
        "metadata", "fp8", lambda p, r: _quant(p, "kv_cache_quant_algo", "FP8"), "kv-cache-scales"
    ),  # fmt: skip
    # names
    "drop-tensor": Kind("names", "fp8", lambda p, r: _tensors(p, ".weight", r, lambda d, k: d.pop(k)), "hub-names"),
    "rename-tensor": Kind(
        "names", "nvfp4", lambda p, r: _tensors(p, "", r, lambda d, k: d.__setitem__(k + "_x", d.pop(k))), "hub-names"
    ),  # fmt: skip
    "extra-tensor": Kind(
        "names",
        "fp8",
        lambda p, r: _tensors(p, "", r, lambda d, k: d.__setitem__("model.extra.weight", torch.zeros(3))),
        "hub-names",
    ),  # fmt: skip
    "undeclared-k-scale": Kind(
        "names",
        "fp8",
        lambda p, r: _tensors(
            p, "k_proj.weight", r, lambda d, k: d.__setitem__(k[: -len("weight")] + "k_scale", torch.tensor(0.5))
        ),
        "kv-cache-scales",
    ),  # fmt: skip
    "undeclared-v-scale": Kind(
        "names",
        "nvfp4",
        lambda p, r: _tensors(
            p, "v_proj.weight", r, lambda d, k: d.__setitem__(k[: -len("weight")] + "v_scale", torch.tensor(0.5))
        ),
        "kv-cache-scales",
    ),  # fmt: skip
    "dense-input-scale-dropped": Kind(
        "names",
        "nvfp4",
        lambda p, r: _tensors(p, "self_attn.q_proj.input_scale", r, lambda d, k: d.pop(k)),
        "input-scales",
    ),  # fmt: skip
    "fp8-dense-input-scale-dropped": Kind(
        "names", "fp8", lambda p, r: _tensors(p, "mlp.down_proj.input_scale", r, lambda d, k: d.pop(k)), "input-scales"
    ),  # fmt: skip
    "expert-scale-dropped": Kind(
        "names", "nvfp4", lambda p, r: _tensors(p, "weight_scale_2", r, lambda d, k: d.pop(k)), "hub-names"
    ),  # fmt: skip
    # shapes (and dtypes)
    "weight-scale-half-blocks": Kind(
        "shapes", "nvfp4", lambda p, r: _tensors(p, ".weight_scale", r, _half_blocks), "scale-shapes"
    ),  # fmt: skip
    "fp8-weight-scale-per-column": Kind(
        "shapes",
        "fp8",
        lambda p, r: _tensors(
            p, "self_attn.o_proj.weight_scale", r, lambda d, k: d.__setitem__(k, d[k].reshape(1).repeat(64))
        ),
        "scale-shapes",
    ),  # fmt: skip
    "input-scale-vector": Kind(
        "shapes",
        "nvfp4",
        lambda p, r: _tensors(
            p, "mlp.up_proj.input_scale", r, lambda d, k: d.__setitem__(k, d[k].reshape(1).repeat(2))
        ),
        "scale-shapes",
    ),  # fmt: skip
    "weight-scale-2-vector": Kind(
        "shapes",
        "nvfp4",
        lambda p, r: _tensors(
            p, "self_attn.k_proj.weight_scale_2", r, lambda d, k: d.__setitem__(k, d[k].reshape(1).repeat(4))
        ),
        "scale-shapes",
    ),  # fmt: skip
    "transpose": Kind(
        "shapes",
        "fp8",
        lambda p, r: _tensors(
            p, "mlp.gate_proj.weight", r, lambda d, k: d.__setitem__(k, d[k][:, :64].t().contiguous())
        ),
        "hub-names",
    ),  # fmt: skip
    "wrong-dtype": Kind(
        "shapes",
        "nvfp4",
        lambda p, r: _tensors(p, ".weight_scale", r, lambda d, k: d.__setitem__(k, d[k].float())),
        "hub-names",
    ),  # fmt: skip
    "nan-scale": Kind(
        "shapes",
        "fp8",
        lambda p, r: _tensors(p, "input_scale", r, lambda d, k: d.__setitem__(k, torch.full_like(d[k], float("nan")))),
        "scales",
    ),  # fmt: skip
    "empty-global-scale": Kind(
        "shapes",
        "nvfp4",
        lambda p, r: _tensors(p, "experts.0.up_proj.weight_scale_2", r, lambda d, k: d.__setitem__(k, torch.zeros(0))),
        "scales",
    ),  # fmt: skip
}
CATEGORIES = ("headers", "index", "metadata", "names", "shapes")


def _outcome(path: Path) -> tuple[str, str]:
    """("error", line) | ("failed", names of the failed checks) | ("ok", "") | ("traceback", what)."""
    try:
        report = moe_unfuse.verify_checkpoint(path)
    except MoeUnfuseError as exc:
        msg = str(exc)
        if len(msg.splitlines()) != 1 or "fix:" not in msg or len(msg) > 2000:
            return "traceback", f"not one line with a fix: {msg[:300]!r}"
        return "error", msg
    except Exception as exc:  # noqa: BLE001 - the thing this test exists to catch
        return "traceback", f"{type(exc).__name__}: {exc}"[:300]
    return ("ok", "") if report.ok else ("failed", ",".join(c.name for c in report.failed))


def _fits(expect: str, kind: str, detail: str) -> bool:
    for want in expect.split("|"):
        if want == "harmless" and kind == "ok":
            return True
        if want == "error" and kind == "error":
            return True
        if kind == "failed" and want in detail.split(","):
            return True
    return False


def test_every_kind_is_named_in_a_category() -> None:
    assert {k.category for k in KINDS.values()} == set(CATEGORIES)
    assert {k.base for k in KINDS.values()} == {"fp8", "nvfp4"}


def test_corrupted_checkpoints_fail_cleanly(goods: dict[str, Path], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    # every kind once, then seeded repeats (other tensors, other files)
    plan = sorted(KINDS) + [rng.choice(sorted(KINDS)) for _ in range(RANDOM_CASES)]
    wrong, tallies = [], {c: {"error": 0, "failed": 0, "ok": 0, "traceback": 0} for c in CATEGORIES}
    for i, name in enumerate(plan):
        kind = KINDS[name]
        path = tmp_path / f"c{i}"
        shutil.copytree(goods[kind.base], path)
        kind.corrupt(path, random.Random(f"{SEED}-{i}"))
        outcome, detail = _outcome(path)
        tallies[kind.category][outcome] += 1
        if not _fits(kind.expect, outcome, detail):
            wrong.append(f"{name} (case {i}): {outcome} {detail[:200]}, expected {kind.expect}")
        shutil.rmtree(path)
    print({c: t for c, t in tallies.items()})
    assert all(t["traceback"] == 0 for t in tallies.values()) and not wrong, "\n".join(wrong)
