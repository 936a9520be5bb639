"""What a modelopt-format FP8/NVFP4 checkpoint computes, measured against the original model.

The checkpoint's own bytes are dequantized into a plain checkpoint under the hub's names
(:mod:`moe_unfuse.quant.dequantized`), which transformers loads like the original: both models are
then the same class, unfused by the same specs, with the same module paths. Every quantized linear
of the dequantized copy quantizes its input as the format does (FP8: the exported per-tensor
``input_scale``; NVFP4 W4A4: E2M1 with dynamic E4M3 block scales under the exported
``input_scale``), on the CPU. The original model runs on held-out samples; each experts module,
linear, embedding and other module with weights (routers, norms) hands its inputs to its twin, whose
output is compared with its own (relative error, SNR); at the end both models' logits give
KL(original || quantized), top-1 agreement and both perplexities. A large model is loaded offloaded
to disk on both sides (:func:`moe_unfuse.hub.loading.load_offloaded`): accelerate then reads one
module's weights at a time, so memory stays about one module at any size.

The figures, the limits they are held to and the failures and outliers drawn from them are
:mod:`moe_unfuse.quant.eval_report`'s.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..base.errors import MoeUnfuseError, first_line
from .dequant import activation_quantizer
from .dequantized import CheckpointReader, QuantizedWeights, write_dequantized
from .eval_report import EvalReport, ModuleFigures, failures, outliers

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
    from ..core.experts import unfused_experts

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
    model: nn.Module, linears: dict[str, tuple[str, int | None]], q: QuantizedWeights
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
        linears = _linear_keys(twin, contract, set(q.formats) | set(CheckpointReader(checkpoint).where))
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
    from ..core.experts import unfused_experts
    from ..core.offload import input_device

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
