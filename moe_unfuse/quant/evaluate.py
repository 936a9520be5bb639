"""What a modelopt-format FP8/NVFP4 checkpoint computes, measured against the original model.

The checkpoint's own bytes are dequantized by the reference (:mod:`moe_unfuse.quant.dequant`) into a
plain checkpoint under the hub's names (experts the hub stores fused are re-fused through the
spec's layout reverse, a fused export is unfused to dequantize it), which transformers loads like
the original: both models are then the same class, unfused by the same specs, with the same module
paths. Every quantized linear of the dequantized copy quantizes its input as the format does (FP8:
the exported per-tensor ``input_scale``; NVFP4 W4A4: E2M1 with dynamic E4M3 block scales under the
exported ``input_scale``), on the CPU. The original model runs on held-out samples; each experts
module, linear, embedding and other module with weights (routers, norms) hands its inputs to its twin, whose output is compared with its
own (relative error, SNR); at the end both models' logits give KL(original || quantized), top-1
agreement and both perplexities. A large model is loaded offloaded to disk on both sides
(:func:`moe_unfuse.hub.loading.load_offloaded`): accelerate then reads one module's weights at a time,
so memory stays about one module at any size.

A module whose error passes its format's limit (:data:`REL_ERROR_LIMIT`, set from the clean exports
of every spec's tiny model) or whose output is not finite fails a check that names it; one far
beyond its peers' median is named as an outlier.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..base.errors import MoeUnfuseError, first_line
from ..hub.checkpoint import shard_files
from .dequant import FP8, NVFP4, activation_quantizer, dequantize, tensor_format

#: Output relative error above which a linear fails, per format (None: unquantized, where the
#: checkpoint holds the original's bytes and the error is 0). Clean exports of the spec's whole tiny
#: models measure about 0.04 (FP8, W8A8) and 0.14 (NVFP4, W4A4) per linear (tests/test_evaluate.py);
#: every numeric corruption tested there lands at 0.5 or more.
REL_ERROR_LIMIT = {FP8: 0.12, NVFP4: 0.3, None: 0.02}
#: An experts module compounds gate, up and down (clean: about 0.07 FP8, 0.23 NVFP4): its limit is
#: the linear's times this.
EXPERTS_LIMIT_FACTOR = 1.6
#: A quantized module is an outlier when its error is this many times its peers' median (and above
#: half its format's limit): a single bad expert among hundreds of good ones.
OUTLIER_FACTOR = 4.0
#: Below this many checkpoint bytes the evaluation computes on one thread.
SMALL_MODEL_BYTES = 64 << 20
#: Built-in held-out text, for when the calibration source has nothing left after calibration.
EVAL_TEXT = (
    "The river rose overnight and by morning the lower fields were under water. Farmers moved their "
    "animals to the ridge, where the old chapel stood, and waited for the rain to stop.\n\n"
    "A compiler turns source code into machine instructions in several passes: parsing builds a tree, "
    "analysis checks types and names, and code generation lays out registers and memory.\n\n"
    "She counted the coins twice, wrote the total in the ledger, and locked the drawer before the "
    "shop opened. Prices had gone up again, and the customers would notice.\n\n"
    "In 1887 the observatory recorded a comet that returned seventy-six years later, within a few "
    "days of the date its orbit had predicted.\n\n"
    "To repair the bicycle he loosened the axle nuts, slid the wheel out of the frame, pried the tyre "
    "off the rim with two levers and found the thorn that had made the hole in the inner tube.\n\n"
    "Interest compounds: a sum that grows by five percent a year doubles in about fourteen years, and "
    "the same rule of thumb works for any rate if you divide seventy by the percentage.\n\n"
    "The choir sang the last verse without the organ, and the sound filled the stone hall so that "
    "nobody moved until the final note had faded into the rafters.\n\n"
    "def mean(values):\n    total = sum(values)\n    return total / len(values) if values else 0.0\n\n"
    "Le train de nuit part de la gare a vingt-deux heures et arrive a la mer au lever du soleil; "
    "les voyageurs dorment dans des couchettes etroites."
)


@dataclass
class ModuleFigures:
    """One module's output against the original's on the same inputs, over all samples."""

    name: str
    kind: str  # "experts", "linear", "expert_linear", "embedding" or "module" (other modules with weights)
    fmt: str | None  # fp8 / nvfp4, None when unquantized
    rel_error: float
    snr_db: float | None  # None: identical outputs
    nonfinite: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.name,
            "kind": self.kind,
            "format": self.fmt,
            "rel_error": _num(self.rel_error),
            "snr_db": _num(self.snr_db),
            "nonfinite": self.nonfinite,
        }


def _num(x: float | None) -> float | str | None:
    """A figure for JSON (which has no inf/nan)."""
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)


@dataclass
class EvalReport:
    """What :func:`evaluate` measured; ``failures`` name the modules that fail their format's limit."""

    checkpoint: str
    original: str
    samples: int
    tokens: int
    modules: list[ModuleFigures]
    kl: float
    top1: float
    ppl_original: float | None  # None: the model has no next-token head (a token classifier)
    ppl_quantized: float | None
    seconds: float
    held_out: str = ""
    failures: list[str] = field(default_factory=list)
    outliers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def by_kind(self, kind: str, fmt: str | None = "any") -> list[ModuleFigures]:
        return [m for m in self.modules if m.kind == kind and (fmt == "any" or m.fmt == fmt)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "original": self.original,
            "samples": self.samples,
            "tokens": self.tokens,
            "held_out": self.held_out,
            "kl": _num(self.kl),
            "top1": _num(self.top1),
            "ppl_original": _num(self.ppl_original),
            "ppl_quantized": _num(self.ppl_quantized),
            "seconds": round(self.seconds, 2),
            "limits": {str(k) if k else "unquantized": v for k, v in REL_ERROR_LIMIT.items()},
            "experts_limit_factor": EXPERTS_LIMIT_FACTOR,
            "failures": self.failures,
            "outliers": self.outliers,
            "modules": [m.to_dict() for m in self.modules],
        }

    def lines(self) -> list[str]:
        """The report block (one line per figure family; every module's figures are in ``to_dict``)."""
        out = [
            f"{self.samples} held-out samples, {self.tokens} tokens ({self.held_out}; {self.seconds:.0f} s); KL(original || quantized) "
            f"{self.kl:.4f}, top-1 agreement {self.top1:.1%}, "
            + (
                f"perplexity {self.ppl_original:.2f} -> {self.ppl_quantized:.2f}"
                if self.ppl_original is not None and self.ppl_quantized is not None
                else "no perplexity (the outputs are not next-token logits)"
            )
        ]
        for kind, label in (
            ("experts", "experts modules"),
            ("expert_linear", "expert linears"),
            ("linear", "other linears"),
        ):
            for fmt in (FP8, NVFP4):
                mods = self.by_kind(kind, fmt)
                if not mods:
                    continue
                errs = sorted(m.rel_error for m in mods)
                worst = max(mods, key=lambda m: m.rel_error)
                snr = [m.snr_db for m in mods if m.snr_db is not None]
                out.append(
                    f"{label} ({fmt.upper()}, {len(mods)}): relative error median {_median(errs):.4f}, max {worst.rel_error:.4f} "
                    f"({worst.name}); SNR median {_median(sorted(snr)):.1f} dB"
                )
        plain = [m for m in self.modules if m.fmt is None]
        if plain:
            worst = max(plain, key=lambda m: m.rel_error)
            out.append(f"unquantized modules ({len(plain)}): max relative error {worst.rel_error:.2g} ({worst.name})")
        out.append("outliers: " + (", ".join(self.outliers) if self.outliers else "none"))
        if self.failures:
            shown = self.failures[:8] + ([f"... ({len(self.failures) - 8} more)"] if len(self.failures) > 8 else [])
            out.extend(f"FAILED {f}" for f in shown)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _median(xs: Sequence[float]) -> float:
    return xs[len(xs) // 2] if xs else float("nan")


# ----------------------------------------------------------------------------------------------
# reading a checkpoint and writing its dequantized copy


class _Reader:
    """A checkpoint folder's tensors by name, read one at a time."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        files, _ = shard_files(path)
        self.where: dict[str, Any] = {}
        for f in files:
            fh = safe_open(f, "pt")  # kept open: memory-mapped, tensors read one at a time
            for k in fh.keys():
                self.where[k] = fh

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


_SCALE_LEAVES = (
    "weight_scale_2",
    "weight_scale",
    "input_scale",
    "pre_quant_scale",
    "output_scale",
    "k_scale",
    "v_scale",
)


def _is_scale(key: str) -> bool:
    """A quantization scale: ``a.weight_scale`` next to ``a.weight``, or ``a.w_weight_scale`` next to a fused ``a.w``."""
    return key.rsplit(".", 1)[-1] in _SCALE_LEAVES or any(key.endswith("_" + s) for s in _SCALE_LEAVES)


def _scale_prefix(key: str) -> str:
    """Where a weight's scale keys start: ``a.weight`` -> ``a.``; a fused ``a.w`` -> ``a.w_``."""
    return key[: -len("weight")] if key.endswith(".weight") else key + "_"


@dataclass
class _Quantized:
    """The quantized weights and input scales of a checkpoint, by weight key."""

    formats: dict[str, str] = field(default_factory=dict)  # weight key -> fp8 / nvfp4
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # weight key -> input_scale


def _dequantized(reader: _Reader, key: str, dtype: torch.dtype, q: _Quantized) -> torch.Tensor | None:
    """The tensor ``key`` dequantized (None when it is a scale)."""
    if _is_scale(key):
        return None
    t = reader.get(key)
    prefix = _scale_prefix(key)
    if prefix + "weight_scale" not in reader:
        return t
    scale = reader.get(prefix + "weight_scale")
    fmt = tensor_format(t, scale)
    if fmt is None:
        return t
    q.formats[key] = fmt
    if prefix + "input_scale" in reader:
        q.input_scales[key] = reader.get(prefix + "input_scale").float()
    scale_2 = reader.get(prefix + "weight_scale_2") if prefix + "weight_scale_2" in reader else None
    return dequantize(t, scale, scale_2, dtype)


def _dequantize_fused(
    reader: _Reader, key: str, spec_param: Any, n: int, dtype: torch.dtype, q: _Quantized
) -> torch.Tensor:
    """A quantized tensor in the hub's fused layout (``export.layout: fused``): unfused per expert
    through the spec's layout, each piece dequantized, fused back. A per-expert ``weight_scale_2``
    (``[E]``) applies to expert E's rows."""
    layout = spec_param.layout(n)
    t, scale = reader.get(key), reader.get(key + "_weight_scale")
    fmt = tensor_format(t, scale)
    if fmt is None:
        return t
    q.formats[key] = fmt
    if key + "_input_scale" in reader:
        q.input_scales[key] = reader.get(key + "_input_scale").float()
    scale_2 = reader.get(key + "_weight_scale_2") if key + "_weight_scale_2" in reader else None
    if fmt == FP8 and scale.dim() == 0:
        return dequantize(t, scale, None, dtype)
    w_pieces, s_pieces = layout.unfuse(t), layout.unfuse(scale) if scale.dim() >= 2 else None
    out = []
    for j, row in enumerate(w_pieces):
        out_row = []
        for e, w in enumerate(row):
            s = s_pieces[j][e] if s_pieces is not None else (scale[e] if scale.dim() == 1 else scale)
            s2 = None if scale_2 is None else (scale_2[e] if scale_2.dim() == 1 else scale_2)
            out_row.append(dequantize(w.contiguous(), s.contiguous(), s2, dtype))
        out.append(out_row)
    return layout.refuse(out)


def write_dequantized(
    checkpoint: Path, out: Path, dtype: torch.dtype | None = None, original: Path | None = None
) -> tuple[_Quantized, Any, list]:
    """Write ``checkpoint`` dequantized into ``out`` as a plain checkpoint under the hub's names (what
    ``save_pretrained`` writes for the model), one tensor at a time into 256 MB shards. ``original``:
    the source model's folder, whose tensors the contract marks optional and no export carries (slots
    past the routed experts, e.g. LongCat-Flash's identity experts) are copied, so that transformers
    builds the twin with the original's shapes. Returns the quantized weights found, the naming
    contract and the specs."""
    from safetensors.torch import save_file

    from ..hub.naming import build_contract, meta_model_from_config
    from ..spec.catalog import select_specs
    from .restack import Restack, restack_tensors

    config = json.loads((checkpoint / "config.json").read_text())
    meta = meta_model_from_config(config, str(checkpoint))
    if meta is None:
        raise MoeUnfuseError(
            f"{checkpoint}/config.json: architectures {config.get('architectures')} cannot be built by the installed transformers; fix: install a transformers that has the class"
        )
    specs = select_specs(meta)
    contract = build_contract(meta, specs)
    if dtype is None:
        dtype = next((p.dtype for p in meta.parameters() if p.is_floating_point()), torch.bfloat16)
    reader = _Reader(checkpoint)
    q = _Quantized()
    by_arch = {s.arch: s for s in specs}
    done: set[str] = set()
    pending: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    size = 0

    def put(name: str, t: torch.Tensor) -> None:
        nonlocal size, pending
        pending[name] = t.contiguous()
        size += t.numel() * t.element_size()
        if size > 256 << 20:
            flush()

    def flush() -> None:
        nonlocal size, pending
        if not pending:
            return
        fname = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(pending, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in pending})
        shards.append({})
        pending, size = {}, 0

    for e in contract.experts.values():
        spec = by_arch.get(e.arch)
        if spec is None:
            continue
        if e.layout == "fused":
            for p in spec.params:
                key = f"{e.hub}.{p.name}"
                if key + "_weight_scale" in reader:
                    put(key, _dequantize_fused(reader, key, p, e.num_experts, dtype, q))
                    done.update(k for k in reader.where if k == key or k.startswith(key + "_"))
        elif e.hub_fused and any(n in reader for n in e.names):
            target = Restack(e, spec, False, contract.to_hub, contract.hub_key)

            def get(k: str) -> torch.Tensor:
                t = _dequantized(reader, k, dtype, q)
                assert t is not None
                return t

            fused, used = restack_tensors(target, get, lambda k: k in reader)
            for k, t in fused.items():
                put(k, t)
            for k in used:
                done.add(k)
                done.update(_scale_prefix(k) + s for s in _SCALE_LEAVES)
    for key in reader.where:
        if key in done:
            continue
        t = _dequantized(reader, key, dtype, q)
        if t is not None:
            put(key, t)
    if original is not None:
        source = _Reader(original)
        for key in sorted(contract.optional):
            if key in source and key not in reader:
                put(key, source.get(key).to(dtype))
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return q, contract, specs


# ----------------------------------------------------------------------------------------------
# comparing the two models


class _Stat:
    """Running sums of one module's output error."""

    __slots__ = ("err", "ref", "nonfinite")

    def __init__(self) -> None:
        self.err, self.ref, self.nonfinite = 0.0, 0.0, False

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        r, o = ref.float(), out.float()
        if not torch.isfinite(o).all() and torch.isfinite(r).all():
            self.nonfinite = True
            o = torch.nan_to_num(o, nan=0.0, posinf=0.0, neginf=0.0)
        self.err += float(((o - r) ** 2).sum())
        self.ref += float((r**2).sum())

    def figures(self) -> tuple[float, float | None]:
        rel = math.sqrt(self.err / self.ref) if self.ref > 0 else (0.0 if self.err == 0 else math.inf)
        snr = None if self.err == 0 else (10 * math.log10(self.ref / self.err) if self.ref > 0 else -math.inf)
        return (math.inf if self.nonfinite else rel), snr


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return getattr(out, "last_hidden_state", None)


def _linear_keys(model: nn.Module, contract: Any, reader_keys: Iterable[str]) -> dict[str, tuple[str, int | None]]:
    """In-memory linear path -> (the checkpoint weight key holding it, expert index into a fused
    tensor's per-expert input scale or None)."""
    from .calibration import unfused_experts

    keys = set(reader_keys)
    out: dict[str, tuple[str, int | None]] = {}
    by_module = {e.module: e for e in contract.experts.values()}
    for path, module in unfused_experts(model):
        e = by_module.get(path)
        if e is None:
            continue
        hub_names = _hub_expert_keys(e)
        for i, expert in enumerate(module):
            for p_name, into, _ in e.params:
                for proj in into:
                    if getattr(expert, proj, None) is None:
                        continue
                    lin = f"{path}.{i}.{proj}"
                    if e.layout == "fused":
                        out[lin] = (f"{e.hub}.{p_name}", i)
                    elif e.hub_fused:
                        out[lin] = (e.per_expert_key(i, proj, "weight"), None)
                    elif (i, proj) in hub_names:
                        out[lin] = (hub_names[(i, proj)], None)
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and path not in out:
            hub = contract.linear_hubs.get(path, (None,))[0]
            # a bare hub tensor (map_linears) is its own key
            key = (hub if hub in keys else f"{hub}.weight") if hub else contract.hub_key(f"{path}.weight")
            if key in keys:
                out[path] = (key, None)
    return out


def _hub_expert_keys(e: Any) -> dict[tuple[int, str], str]:
    """(expert, in-memory projection) -> weight key, for an experts module the hub stores per expert
    under its own projection names (Mixtral's ``w1``/``w3``/``w2``): the hub's projection names in
    the order transformers' reverse conversion writes them, which is the spec's projection order."""
    from ..hub.checkpoint import EXPERT_KEY_RE

    hub_projs: list[str] = []
    by: dict[tuple[int, str], str] = {}
    for k in e.weights:
        m = EXPERT_KEY_RE.match(k)
        if m is None:
            return {}
        if m["proj"] not in hub_projs:
            hub_projs.append(m["proj"])
        by[(int(m["expert"]), m["proj"])] = k
    projs = [proj for _, into, _ in e.params for proj in into]
    if len(projs) != len(hub_projs):
        return {}
    names = dict(zip(hub_projs, projs))
    return {(i, names[hp]): k for (i, hp), k in by.items()}


def _install_input_quantizers(
    model: nn.Module, linears: dict[str, tuple[str, int | None]], q: _Quantized
) -> dict[str, str]:
    """Pre-hooks quantizing each quantized linear's input as its format does; returns path -> format."""
    formats: dict[str, str] = {}
    modules = dict(model.named_modules())
    for path, (key, expert) in linears.items():
        fmt = q.formats.get(key)
        if fmt is None or path not in modules:
            continue
        formats[path] = fmt
        scale = q.input_scales.get(key)
        if scale is None:
            continue  # weight-only
        if scale.dim() >= 1 and scale.numel() > 1 and expert is not None:
            scale = scale.reshape(-1)[expert]
        fn = activation_quantizer(fmt, scale.reshape(()))
        modules[path].register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]), *args[1:]))
    return formats


def _kl_top1_nll(
    lo: torch.Tensor, lq: torch.Tensor, ids: torch.Tensor, next_token: bool = True
) -> tuple[float, float, float, float, int]:
    """Sums over the tokens of one batch: KL(original || quantized), top-1 matches, both NLLs of the
    next token (its count last; none unless ``next_token``: the outputs are logits over the vocabulary)."""
    po, pq = torch.log_softmax(lo.float(), -1), torch.log_softmax(lq.float(), -1)
    kl = float((po.exp() * (po - pq)).sum(-1).sum())
    top1 = float((lo.argmax(-1) == lq.argmax(-1)).sum())
    if not next_token:
        return kl, top1, 0.0, 0.0, 0
    nxt = ids[:, 1:].unsqueeze(-1)
    nll_o = float(-po[:, :-1].gather(-1, nxt).sum())
    nll_q = float(-pq[:, :-1].gather(-1, nxt).sum())
    return kl, top1, nll_o, nll_q, nxt.numel()


def _load(path: Path, offload: Path | None) -> nn.Module:
    from ..hub.loading import load_model, load_offloaded

    return load_offloaded(path, offload, "float32") if offload is not None else load_model(path, "cpu", "float32")


def evaluate(
    checkpoint: Path | str,
    original: Path | str | nn.Module,
    samples: Sequence[dict[str, torch.Tensor]],
    *,
    held_out: str = "",
    offload: bool | None = None,
    work_dir: Path | str | None = None,
    progress: bool = False,
) -> EvalReport:
    """Measure ``checkpoint`` (modelopt FP8/NVFP4, any exporter) against ``original`` (a model folder,
    or a model in memory, saved to a temporary folder first) on ``samples`` (batches with
    ``input_ids``). ``offload``: load both models offloaded to disk (default: when both, in
    float32, would not fit in memory: four times a 16-bit source's bytes, by the whole-model peak rule). Temporary files go under ``work_dir`` (default: the system's)."""
    from tqdm.auto import tqdm

    from ..core.unfusing import unfuse
    from ..hub.loading import checkpoint_bytes
    from .export_context import quiet
    from .layerwise import needs_layerwise

    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise MoeUnfuseError(f"{checkpoint}: no config.json; fix: pass a checkpoint folder written by export")
    if not samples:
        raise MoeUnfuseError("no evaluation samples; fix: pass --eval-size 1 or more and a --calib-dataset with text")
    work = Path(tempfile.mkdtemp(prefix="moe-unfuse-eval-", dir=work_dir))
    try:
        if isinstance(original, nn.Module):
            source = work / "original"
            original.save_pretrained(source)
            original_label = type(original).__name__
        else:
            source, original_label = Path(original), str(original)
        if not (source / "config.json").is_file():
            raise MoeUnfuseError(f"{source}: no config.json; fix: pass --against the original model's folder")
        deq = work / "dequantized"
        with quiet():
            q, contract, specs = write_dequantized(checkpoint, deq, torch.float32, source)
            if offload is None:
                # both models in float32: each up to twice a 16-bit checkpoint's bytes
                offload = needs_layerwise(2 * 2 * checkpoint_bytes(source), "cpu")
            ref = _load(source, work / "offload-a" if offload else None)
            twin = _load(deq, work / "offload-b" if offload else None)
            for m in (ref, twin):
                m.config.use_cache = False
                if specs:
                    unfuse(m, specs)
        linears = _linear_keys(twin, contract, set(q.formats) | set(_Reader(checkpoint).where))
        formats = _install_input_quantizers(twin, linears, q)
        threads = torch.get_num_threads()
        if checkpoint_bytes(source) < SMALL_MODEL_BYTES:
            torch.set_num_threads(1)  # a small model's GEMMs gain nothing from threads that contend on a busy CPU
        try:
            report = _compare(ref, twin, formats, samples, progress, tqdm)
        finally:
            torch.set_num_threads(threads)
    except MoeUnfuseError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError, IndexError, TypeError) as exc:
        raise MoeUnfuseError(
            f"{checkpoint}: cannot evaluate against {original if not isinstance(original, nn.Module) else 'the model'} "
            f"({type(exc).__name__}: {first_line(exc, 160)}); fix: pass --against the model this checkpoint was quantized from"
        ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.checkpoint, report.original, report.held_out = str(checkpoint), original_label, held_out
    report.seconds = time.perf_counter() - start
    return report


def _compare(
    ref: nn.Module, twin: nn.Module, formats: dict[str, str], samples: Sequence[dict], progress: bool, tqdm: Any
) -> EvalReport:
    from .calibration import input_device, unfused_experts

    twins = dict(twin.named_modules())
    experts = {p for p, _ in unfused_experts(ref)}
    expert_linears = {p for p in formats if any(p.startswith(e + ".") for e in experts)}
    stats: dict[str, _Stat] = {}
    kinds: dict[str, tuple[str, str | None]] = {}
    handles = []
    for path, m in ref.named_modules():
        if path not in twins:
            continue
        if path in experts:
            fmts = {f for p, f in formats.items() if p.startswith(path + ".")}
            kind = ("experts", next(iter(fmts)) if len(fmts) == 1 else None)
        elif isinstance(m, nn.Linear):
            kind = ("expert_linear" if path in expert_linears else "linear", formats.get(path))
        elif isinstance(m, nn.Embedding):
            kind = ("embedding", None)
        elif any(p is not None for p in m._parameters.values()) and not any(
            any(True for _ in c.parameters()) for c in m.children()
        ):
            kind = ("module", None)  # routers, norms: unquantized leaves, the original's bytes
        else:
            continue
        kinds[path] = kind
        stats[path] = _Stat()

        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: Any, path: str = path) -> None:
            r = _first_tensor(output)
            if r is None:
                return
            try:
                o = _first_tensor(twins[path](*args, **kwargs))
            except (RuntimeError, TypeError, ValueError):  # a module that cannot run twice on its inputs
                return
            if o is not None and o.shape == r.shape:
                stats[path].add(r, o)

        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    kl = top1 = nll_o = nll_q = 0.0
    tokens = predicted = 0
    device = input_device(ref)
    # A token classifier (OpenAI's privacy filter) scores labels, not the next token: no perplexity.
    next_token = ref.get_output_embeddings() is not None
    try:
        with torch.no_grad():
            for batch in tqdm(samples, desc="evaluate", unit="batch", disable=not progress, leave=False):
                inputs = {k: v.to(device) for k, v in batch.items()}
                lo = ref(**inputs, use_cache=False).logits
                lq = twin(**inputs, use_cache=False).logits
                a, b, c, d, n = _kl_top1_nll(lo, lq, inputs["input_ids"].to(lo.device), next_token)
                kl, top1, nll_o, nll_q = kl + a, top1 + b, nll_o + c, nll_q + d
                tokens += lo.shape[0] * lo.shape[1]
                predicted += n
    finally:
        for h in handles:
            h.remove()
    modules = []
    for path, st in stats.items():
        rel, snr = st.figures()
        kind, fmt = kinds[path]
        modules.append(ModuleFigures(path, kind, fmt, rel, snr, st.nonfinite))
    report = EvalReport(
        "",
        "",
        sum(b["input_ids"].shape[0] for b in samples),
        tokens,
        modules,
        kl / max(tokens, 1),
        top1 / max(tokens, 1),
        math.exp(nll_o / predicted) if predicted else None,
        math.exp(min(nll_q / predicted, 700.0)) if predicted else None,
        0.0,
    )
    report.failures = failures(modules, report)
    report.outliers = outliers(modules)
    return report


def failures(modules: Sequence[ModuleFigures], report: EvalReport | None = None) -> list[str]:
    """One line per module past its format's limit or with a non-finite output, and non-finite logits."""
    out = []
    for m in modules:
        if m.nonfinite:
            out.append(f"{m.name}: non-finite output ({m.fmt or 'unquantized'} {m.kind})")
        elif m.rel_error > limit(m):
            out.append(
                f"{m.name}: relative error {m.rel_error:.3g} over the {m.fmt or 'unquantized'} limit {limit(m):.3g} ({m.kind})"
            )
    if report is not None and not (
        math.isfinite(report.kl) and (report.ppl_quantized is None or math.isfinite(report.ppl_quantized))
    ):
        out.append(f"logits: KL {report.kl} / perplexity {report.ppl_quantized} not finite")
    return out


def limit(m: ModuleFigures) -> float:
    """The relative error above which ``m`` fails."""
    return REL_ERROR_LIMIT[m.fmt] * (EXPERTS_LIMIT_FACTOR if m.kind == "experts" and m.fmt else 1.0)


def outliers(modules: Sequence[ModuleFigures]) -> list[str]:
    """Quantized modules whose error is ``OUTLIER_FACTOR`` x their peers' median (same kind, format
    and projection name) and over half their format's limit."""
    groups: dict[tuple, list[ModuleFigures]] = {}
    for m in modules:
        if m.fmt is not None:
            groups.setdefault((m.kind, m.fmt, m.name.rsplit(".", 1)[-1]), []).append(m)
    out = []
    for mods in groups.values():
        med = _median(sorted(m.rel_error for m in mods))
        for m in mods:
            if m.rel_error > OUTLIER_FACTOR * med and m.rel_error > limit(m) / 2:
                out.append(f"{m.name} (relative error {m.rel_error:.3g}, peers' median {med:.3g})")
    return out


def numeric_check(ev: EvalReport, max_kl: float | None = None) -> Any:
    """The evaluation as one check of ``verify --against``: failing modules named in its keys."""
    from ..hub.verify import Check

    problems = list(ev.failures)
    if max_kl is not None and not ev.kl <= max_kl:
        problems.append(f"logits: KL {ev.kl:.4g} over --max-kl {max_kl:g}")
    figures = f"{len(ev.modules)} modules on {ev.tokens} tokens, KL {ev.kl:.4g}, top-1 {ev.top1:.1%}"
    if problems:
        return Check("numeric", False, f"{len(problems)} module(s) off the original ({figures})", problems)
    return Check("numeric", True, f"every module within its format's limit ({figures})")


def samples_for(tokenizer: Any, dataset: str | None, size: int, seq_len: int) -> tuple[list[dict], str]:
    """Evaluation samples from ``dataset`` (see :func:`moe_unfuse.quant.calibration.read_calibration_texts`),
    or from the built-in held-out text (not the built-in calibration text)."""
    from .calibration import calibration_batches, read_calibration_texts

    if dataset is None:
        return calibration_batches(tokenizer, EVAL_TEXT.split("\n\n"), size, seq_len, 1), "built-in held-out text"
    return calibration_batches(tokenizer, read_calibration_texts(dataset, tokenizer), size, seq_len, 1), dataset


def held_out_batches(tokenizer: Any, texts: Iterable[str], size: int, seq_len: int) -> tuple[list[dict], str]:
    """``size`` samples of ``seq_len`` tokens from what is left of ``texts`` after calibration read its
    share (the same iterator), else from the built-in held-out text; and which it was."""
    from .calibration import calibration_batches

    try:
        return calibration_batches(
            tokenizer, texts, size, seq_len, 1
        ), "calibration source, after the calibration samples"
    except MoeUnfuseError:
        return calibration_batches(tokenizer, EVAL_TEXT.split("\n\n"), size, seq_len, 1), "built-in held-out text"
