"""Calibration for unfused experts: data, per-expert token counts, forced routing, input scales.

Token counts come from a forward pre-hook on each expert's input linear (the rows it computes on), so
they are right whatever ``_experts_implementation`` the config names (once unfused, the spec's routed
forward runs, never grouped_mm/batched_mm) and whatever form the routing takes.

Forced routing (``force_routing=True``): after the normal calibration, one more forward over the
first calibration batch, during which each experts module, once its normal forward is done, also
runs every expert that has received no token so far on *all* of this layer's actual input tokens,
``chunk_tokens`` at a time. Those outputs are discarded and the normal forward's output is returned
unchanged, so the model computes exactly what it would without the pass; max calibration is
idempotent on a batch it has already seen, so other quantizers' statistics are unchanged too.
Memory: the batch's normal activations plus one expert's output for one chunk.

Input scales (``input_scale``): ``shared`` (default) gives every expert of a layer the max over the
layer's experts, per input (gate/up read the layer input, down reads the gated hidden), which is
what vLLM/SGLang/TRT-LLM fused MoE kernels apply anyway (one input scale per layer); ``per-expert``
keeps each expert's own. Gate and up of one expert always share (same input). An expert that still
has no data gets the max over the other experts of its layer for that input, or, if none in the
layer has data, the max over the same input of every other layer: never zero, NaN or missing.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..base.errors import MoeUnfuseError, first_line
from ..base.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CALIB_SIZE,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_SEQ_LEN,
    INPUT_SCALE_POLICIES,
)
from ..core.experts import unfuse_state, unfused_experts
from ..core.offload import input_device
from ..hub.tiny import CALIBRATION_TEXT

# ----------------------------------------------------------------------------------------------
# data


def read_calibration_texts(source: Path | str | None, tokenizer: Any = None) -> Iterator[str]:
    """Texts to calibrate on, streamed one record at a time (a dataset is never read whole):

    - None: the built-in text;
    - a ``.jsonl`` file (one record per line), a ``.json`` list, or plain text (split at blank lines);
    - a folder written by ``datasets``' ``save_to_disk``, or a Hugging Face dataset name (both read
      through ``datasets``, which is then needed; a name streams its ``train`` split).

    A record is a string, or an object with a ``text`` field, or with ``messages`` (chat turns),
    rendered with the tokenizer's chat template when it has one.
    """
    if source is None:
        yield from (p for p in CALIBRATION_TEXT.split("\n\n") if p.strip())
        return
    found = False
    for record in _records(str(source)):
        text = _render(record, tokenizer)
        if text.strip():
            found = True
            yield text
    if not found:
        raise MoeUnfuseError(
            f"--calib-dataset {source}: contains no text; fix: give it records with a text or messages field"
        )


def _records(source: str) -> Iterator[Any]:
    path = Path(source)
    if path.is_file():
        yield from _file_records(path)
    elif path.is_dir() or not (path.suffix in (".jsonl", ".json", ".txt") or source.startswith((".", "/", "~"))):
        yield from _dataset_records(source, path)
    else:
        raise MoeUnfuseError(
            f"--calib-dataset {source}: no such file or folder; fix: pass a .txt, .json or .jsonl file, a save_to_disk folder or a dataset name"
        )


def _file_records(path: Path) -> Iterator[Any]:
    where = f"--calib-dataset {path}"
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError as exc:
                            raise MoeUnfuseError(
                                f"{where}: line {n} is not JSON ({first_line(exc, 80)}); fix: one JSON object per line"
                            ) from None
        elif path.suffix == ".json":
            items = json.loads(path.read_text(encoding="utf-8", errors="replace"))
            if not isinstance(items, list):
                raise MoeUnfuseError(f"{where}: top level is not a list; fix: a JSON list of strings or records")
            yield from items
        else:
            paragraph: list[str] = []
            with path.open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        yield "".join(paragraph)
                        paragraph = []
            if paragraph:
                yield "".join(paragraph)
    except ValueError as exc:  # an invalid .json
        raise MoeUnfuseError(
            f"{where}: not valid JSON ({first_line(exc, 80)}); fix: a JSON list of strings or records"
        ) from None


def _dataset_records(source: str, path: Path) -> Iterator[Any]:
    try:
        import datasets
    except ImportError:
        raise MoeUnfuseError(
            f"--calib-dataset {source}: reading a dataset folder or name needs the datasets package; fix: pip install datasets, or pass a .jsonl file"
        ) from None
    try:
        data = (
            datasets.load_from_disk(str(path))
            if path.is_dir()
            else datasets.load_dataset(source, split="train", streaming=True)
        )
        if isinstance(data, dict):  # a DatasetDict: its train split, else its first
            data = data["train"] if "train" in data else next(iter(data.values()))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for an unreadable source
        raise MoeUnfuseError(
            f"--calib-dataset {source}: cannot be read ({first_line(exc, 120)}); fix: check the name or folder (offline: only local folders and files)"
        ) from None
    yield from data


def _render(record: Any, tokenizer: Any) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return str(record)
    messages = record.get("messages") or record.get("conversations")
    if isinstance(messages, list) and messages:
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in messages)
    return str(record.get("text", ""))


def calibration_batches(
    tokenizer: Any,
    texts: Iterable[str],
    calib_size: int = DEFAULT_CALIB_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[dict[str, torch.Tensor]]:
    """Pack the texts into one token stream (EOS between texts) and cut ``calib_size`` samples of
    ``seq_len`` tokens, batched ``batch_size`` at a time: no padding, every token counts.
    Fewer samples come back when the text runs out (a shorter last sample only when it is the only one)."""
    if calib_size < 1 or seq_len < 1 or batch_size < 1:
        raise MoeUnfuseError(
            f"calibration sizes must be >= 1 (calib_size={calib_size}, seq_len={seq_len}, batch_size={batch_size}); fix: pass positive values"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (1 if bos is not None else 0)
    if body < 1:
        raise MoeUnfuseError(f"--seq-len {seq_len} leaves no room after BOS; fix: pass --seq-len 2 or more")
    stream: list[int] = []
    for text in texts:  # read only as much text as the samples need
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= calib_size * body:
            break
    samples = [stream[i : i + body] for i in range(0, len(stream), body)][:calib_size]
    if len(samples) > 1 and len(samples[-1]) < body:
        samples.pop()
    if not samples or not samples[0]:
        raise MoeUnfuseError("the calibration text produced no tokens; fix: pass a --calib-dataset with text")
    if bos is not None:
        samples = [[bos, *s] for s in samples]
    batches = []
    for i in range(0, len(samples), batch_size):
        ids = torch.tensor(samples[i : i + batch_size], dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def run_batches(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], desc: str = "calibrating", progress: bool = True
) -> None:
    """Forward every batch, outputs discarded (``use_cache=False``: nothing is kept between batches)."""
    from tqdm.auto import tqdm

    device = input_device(model)
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)


# ----------------------------------------------------------------------------------------------
# routing statistics


def _hidden_states(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    return unfuse_state(module).bind(args, kwargs).get("hidden_states")


@dataclass
class RoutingStats:
    """Tokens each expert received: ``counts[path][e]`` in normal calibration, ``forced`` in the forced pass.
    A token routed to k experts counts once for each of them."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    forced: dict[str, list[int]] = field(default_factory=dict)

    def uncovered(self, forced_too: bool = True) -> dict[str, list[int]]:
        """Experts with no token (``forced_too``: counting the forced pass as data)."""
        out = {}
        for path, counts in self.counts.items():
            forced = self.forced.get(path, [0] * len(counts))
            idle = [e for e, c in enumerate(counts) if c == 0 and (not forced_too or forced[e] == 0)]
            if idle:
                out[path] = idle
        return out

    def add(self, other: "RoutingStats") -> None:
        """Add ``other``'s counts to these, expert by expert (a looped layer's experts count every call)."""
        for mine, theirs in ((self.counts, other.counts), (self.forced, other.forced)):
            for path, counts in theirs.items():
                have = mine.setdefault(path, [0] * len(counts))
                mine[path] = [a + b for a, b in zip(have, counts)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "forced": self.forced,
            "uncovered": self.uncovered(),
            "uncovered_before_forcing": self.uncovered(False),
        }


def _input_linear(expert: nn.Module) -> nn.Module:
    """The module that reads the expert's input rows: up_proj (GLU/MLP experts), a projection bank's
    linear, or the expert itself. Counting there works for every forward kind, including those that
    call ``expert.hidden`` and ``down_proj`` themselves."""
    for name in ("up_proj", "linear"):
        child = getattr(expert, name, None)
        if isinstance(child, nn.Module):
            return child
    return expert


class TokenCounter:
    """Counts the tokens each expert computes on, through a forward pre-hook on its input linear.

    Independent of how the forward passes routing (top_k_index or dense weights) and of the config's
    ``_experts_implementation``, since the unfused forward always calls the per-expert modules.
    """

    def __init__(self, model: nn.Module, stats: RoutingStats | None = None):
        self.modules = unfused_experts(model)
        self.stats = stats or RoutingStats()
        for path, m in self.modules:
            self.stats.counts.setdefault(path, [0] * len(m))
        self._handles: list[Any] = []

    def _hook(self, counts: list[int], e: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            counts[e] += x.numel() // x.shape[-1] if x.dim() else 0

        return hook

    def __enter__(self) -> "TokenCounter":
        for path, m in self.modules:
            counts = self.stats.counts[path]
            for e, expert in enumerate(m):
                self._handles.append(_input_linear(expert).register_forward_pre_hook(self._hook(counts, e)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def forced_routing(
    model: nn.Module, targets: dict[str, list[int]], stats: RoutingStats, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> Iterator[None]:
    """While active, each experts module in ``targets`` also runs the listed experts on all of its
    input tokens after its normal forward (outputs discarded). See the module docstring."""
    if chunk_tokens < 1:
        raise MoeUnfuseError(f"chunk_tokens must be >= 1, got {chunk_tokens}; fix: pass a positive chunk size")
    handles = []

    def make(path: str, experts: list[int]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = _hidden_states(module, args, kwargs)
            if hidden is None:
                return
            flat = hidden.reshape(-1, hidden.shape[-1])
            forced = stats.forced.setdefault(path, [0] * len(module))
            with torch.no_grad():
                for e in experts:
                    for chunk in flat.split(chunk_tokens):
                        module[e](chunk)
                    forced[e] += flat.shape[0]

        return hook

    by_path = dict(unfused_experts(model))
    for path, experts in targets.items():
        handles.append(by_path[path].register_forward_hook(make(path, experts), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def calibrate(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    force_routing: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    sum_counts: Callable[[dict[str, list[int]]], None] | None = None,
    forced_here: bool = True,
) -> RoutingStats:
    """Run the calibration batches with token counting, then (``force_routing``) the forced pass.

    Meant as modelopt's ``forward_loop`` body, but it only forwards the model, so any calibrator works.
    Data-parallel (``moe_unfuse.quant.distributed``): ``sum_counts`` adds a count table up over the
    processes, so the forced targets are those of all batches; ``forced_here`` says whether this
    process runs the forced pass (the one holding the run's first batch).
    """
    stats = count_tokens(model, batches, progress, sum_counts)
    if force_routing:
        force_uncovered(model, batches[:1], stats, chunk_tokens, progress, sum_counts, forced_here)
    return stats


def count_tokens(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    progress: bool = True,
    sum_counts: Callable[[dict[str, list[int]]], None] | None = None,
) -> RoutingStats:
    """Run the calibration batches, counting the tokens each expert receives (summed over processes)."""
    stats = RoutingStats()
    with TokenCounter(model, stats):
        run_batches(model, batches, "calibrating", progress)
    if sum_counts is not None:
        sum_counts(stats.counts)
    return stats


def force_uncovered(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    stats: RoutingStats,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    sum_counts: Callable[[dict[str, list[int]]], None] | None = None,
    forced_here: bool = True,
) -> None:
    """The forced pass: the experts ``stats.counts`` shows without a token run on every token of
    ``batches`` (the first calibration batch; a looped layer's first batch of each of its calls),
    their counts added to ``stats.forced``."""
    targets = stats.uncovered(forced_too=False)
    if targets and batches and forced_here:
        with forced_routing(model, targets, stats, chunk_tokens):
            run_batches(model, batches, "forced routing", progress)
    if sum_counts is not None and targets:
        for path in targets:
            stats.forced.setdefault(path, [0] * len(stats.counts[path]))
        sum_counts(stats.forced)


# ----------------------------------------------------------------------------------------------
# input scales


@dataclass
class ScaleFallback:
    """An input amax that calibration did not provide, and where the substitute came from."""

    path: str
    expert: int
    projections: tuple[str, ...]
    value: float
    source: str  # "layer max" | "model max"

    def __str__(self) -> str:
        return f"{self.path}.{self.expert}.{'/'.join(self.projections)}: amax {self.value:.4g} ({self.source})"


def _valid(amax: torch.Tensor | None) -> bool:
    return (
        amax is not None
        and not amax.is_meta
        and amax.numel() > 0
        and bool(torch.isfinite(amax).all())
        and bool((amax > 0).all())
    )


def input_groups(projections: Iterable[str]) -> list[tuple[str, ...]]:
    """Projections that read the same input: everything but ``down_proj`` reads the layer input."""
    projections = tuple(projections)
    first = tuple(p for p in projections if p != "down_proj")
    return [g for g in (first, tuple(p for p in projections if p == "down_proj")) if g]


def _input_quantizers(expert: nn.Module, group: tuple[str, ...]) -> list[Any]:
    out = []
    for proj in group:
        lin = getattr(expert, proj, None)
        q = getattr(lin, "input_quantizer", None)
        if q is not None and getattr(q, "is_enabled", False) and not getattr(q, "_dynamic", False):
            out.append(q)
    return out


def _scalar(amax: torch.Tensor) -> torch.Tensor:
    return amax.detach().float().amax()


def keep_uncalibrated_unquantized(model: nn.Module) -> list[str]:
    """Linears whose input quantizer never saw data (the model's forward does not call them, e.g.
    Jamba's ``mamba.dt_proj``, read as a weight by the scan): their export would be a quantized weight
    without the ``input_scale`` the format needs (engines load it as uninitialized or 0). They stay
    unquantized instead, and modelopt's export lists them in ``exclude_modules``. Experts are not
    among them: :func:`finalize_input_scales` gives experts without data a fallback first."""
    kept = []
    for name, module in model.named_modules():
        wq, iq = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
        if wq is None or iq is None or not getattr(wq, "is_enabled", False) or not getattr(iq, "is_enabled", False):
            continue
        if getattr(iq, "amax", None) is None:
            wq.disable()
            iq.disable()
            kept.append(name)
    return kept


def finalize_input_scales(model: nn.Module, policy: str = "shared") -> list[ScaleFallback]:
    """Apply the input-scale ``policy`` to every unfused experts module and fill experts without data
    (see the module docstring). Returns the fallbacks used; raises when no expert of the model has any."""
    if policy not in INPUT_SCALE_POLICIES:
        raise MoeUnfuseError(
            f"unknown input-scale policy {policy!r}; fix: use one of {', '.join(INPUT_SCALE_POLICIES)}"
        )
    fallbacks: list[ScaleFallback] = []
    pending: list[tuple[str, int, tuple[str, ...], list[Any]]] = []
    model_max: dict[tuple[str, ...], torch.Tensor] = {}
    for path, module in unfused_experts(model):
        for group in input_groups(unfuse_state(module).spec.projection_names()):
            per_expert: list[tuple[int, list[Any], torch.Tensor | None]] = []
            for e, expert in enumerate(module):
                qs = _input_quantizers(expert, group)
                if not qs:
                    continue
                vals = [_scalar(q.amax) for q in qs if _valid(getattr(q, "amax", None))]
                per_expert.append((e, qs, torch.stack(vals).amax() if vals else None))
            known = [v for _, _, v in per_expert if v is not None]
            if not per_expert:
                continue
            if not known:
                pending.extend((path, e, group, qs) for e, qs, _ in per_expert)
                continue
            layer_max = torch.stack(known).amax()
            model_max[group] = torch.maximum(model_max[group], layer_max) if group in model_max else layer_max
            for e, qs, value in per_expert:
                if value is None:
                    fallbacks.append(ScaleFallback(path, e, group, layer_max.item(), "layer max"))
                target = layer_max if policy == "shared" or value is None else value
                for q in qs:
                    q.amax = target.clone().to(q.amax.device if q.amax is not None else target.device)
    for path, e, group, qs in pending:
        if group not in model_max:
            raise MoeUnfuseError(
                f"no expert input of {'/'.join(group)} was calibrated anywhere in the model; fix: check that the "
                "calibration forward reaches the MoE layers (use --force-routing, more --calib-size)"
            )
        value = model_max[group]
        fallbacks.append(ScaleFallback(path, e, group, value.item(), "model max"))
        for q in qs:
            q.amax = value.clone()
    return fallbacks


def _weight_amax_groups(module: nn.Module) -> list[list[nn.Module]]:
    """Linears that must share one weight amax: gate and up of each expert (engines fuse them into
    one w13 with one global scale); every projection of a fused tensor when the spec exports the
    fused layout (one scale per fused tensor, as modelopt's own fused-experts export writes)."""
    spec = unfuse_state(module).spec
    experts = list(module)
    if spec.export_layout == "fused":
        return [
            [getattr(e, proj) for e in experts for proj in p.into if getattr(e, proj, None) is not None]
            for p in spec.params
        ]
    return [
        [e.gate_proj, e.up_proj]
        for e in experts
        if getattr(e, "gate_proj", None) is not None and getattr(e, "up_proj", None) is not None
    ]


def share_gate_up_weight_amax(model: nn.Module) -> int:
    """Give gate and up of each expert one weight amax (their max), so the exported NVFP4 global
    scale ``weight_scale_2`` (and FP8 ``weight_scale``) is the same for both halves of the fused
    w13 the engines build; for a spec exporting the fused layout, every projection stacked into one
    fused tensor shares it (see :func:`_weight_amax_groups`). modelopt does this for names it
    recognizes; this covers every spec. Returns how many groups changed."""
    changed = 0
    for _, module in unfused_experts(model):
        for group in _weight_amax_groups(module):
            quantizers = [getattr(lin, "weight_quantizer", None) for lin in group]
            if not quantizers or any(q is None or not q.is_enabled for q in quantizers):
                continue
            for attr in ("amax", "global_amax"):
                values = [getattr(q, attr, None) for q in quantizers]
                if any(not isinstance(v, torch.Tensor) or v.is_meta or v.shape != values[0].shape for v in values):
                    continue
                if not all(torch.equal(v, values[0]) for v in values):
                    shared = torch.stack(values).amax(0)
                    for q in quantizers:
                        setattr(q, attr, shared.clone())
                    changed += 1
    return changed
