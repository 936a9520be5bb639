"""Quantize a fused-MoE model with modelopt through the specs: coverage check, calibration, scales.

``quantize_model`` is the in-memory step (register the matching specs, ``mtq.quantize`` with a
calibration loop that counts tokens per expert and optionally forces routing, then the input-scale
policy and gate/up weight-scale sharing). ``run_quantize`` is the whole job behind
``moe-unfuse quantize``: load (or build the tiny model), quantize, export, verify, report.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..base.errors import MoeUnfuseError, UncoveredExpertsError, first_line
from ..base.memory import map_large_allocations
from ..base.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CALIB_SIZE,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_SEQ_LEN,
    check_algorithm,
    default_eval_size,
)
from ..core.coverage import Coverage, check_coverage, fused_expert_params
from ..core.experts import unfuse_state, unfused_experts
from ..core.registration import register
from ..core.unfusing import unfuse
from ..hub.loading import checkpoint_bytes, load_model, load_offloaded, load_tokenizer, offloaded_to_disk
from ..hub.naming import model_contract
from ..hub.policy import build_quant_config
from ..hub.tiny import byte_tokenizer, tiny_gemma4
from ..spec.catalog import select_specs
from ..spec.imports import trusted_modules
from ..spec.model import Spec
from . import distributed
from .calibration import (
    RoutingStats,
    ScaleFallback,
    calibrate,
    calibration_batches,
    finalize_input_scales,
    keep_uncalibrated_unquantized,
    read_calibration_texts,
    share_gate_up_weight_amax,
)
from .distributed import Group
from .evaluate import evaluate, held_out_batches
from .export import export_checkpoint
from .export_context import quiet
from .layerwise import (
    LAYERWISE_SHARD_SIZE,
    calibrate_layerwise,
    check_layerwise,
    decoder_layers,
    needs_layerwise,
    no_offload_writeback,
)
from .out_dir import out_lock, prepare_out_dir
from .report import QuantizeReport
from .resume import ResumeState, fingerprint, kill_point, resume_dir

# ----------------------------------------------------------------------------------------------
# quantize in memory


@dataclass
class QuantizeResult:
    """What :func:`quantize_model` did."""

    qformat: str
    specs: list[Spec]
    coverage: Coverage
    routing: RoutingStats
    fallbacks: list[ScaleFallback]
    input_scale: str
    force_routing: bool
    gate_up_synced: int
    num_linears: int
    seconds: float
    input_quantized: bool = True  # False for weight-only formats: no input scales to set
    #: experts modules, and other modules, left unquantized because the target engine's loader cannot serve
    #: them quantized (a spec's ``export.engines``), and why
    kept_for_engine: dict[str, str] = field(default_factory=dict)
    #: modules kept unquantized by default (lm_head) that the target engine builds quantized, and why
    quantized_for_engine: dict[str, str] = field(default_factory=dict)
    algorithm: str = "max"  # modelopt's calibration algorithm (options.ALGORITHMS)


def _modules_kept_for_engine(model: nn.Module, specs: Sequence[Spec], engine: str | None) -> dict[str, str]:
    """Modules with weights that ``engine``'s model class builds unquantized (a spec's
    ``export.engines.E.modules`` globs, e.g. Jamba's Mamba mixer in vLLM), and why."""
    kept = {}
    for spec in specs:
        globs, why = spec.modules_unquantized_for(engine or "")
        for name, module in model.named_modules() if globs else ():
            if isinstance(module, (nn.Linear, nn.Conv1d)) and any(fnmatch.fnmatch(name, g) for g in globs):
                kept[name] = why
    return kept


def quantize_model(
    model: nn.Module,
    qformat: str,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    arch: str | Spec | Iterable[str | Spec] | None = None,
    force_routing: bool = False,
    input_scale: str = "shared",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    exclude: Iterable[str] = (),
    allow_uncovered: bool = False,
    progress: bool = True,
    group: Group | None = None,
    layerwise: bool = False,
    spill_dir: Path | None = None,
    algorithm: str = "max",
    resume: ResumeState | None = None,
    engine: str | None = None,
) -> QuantizeResult:
    """Quantize ``model`` in place with modelopt: every expert becomes per-expert QuantLinears.

    Raises :class:`UncoveredExpertsError` before touching the model when fused expert parameters
    remain that no spec covers (``allow_uncovered`` skips them knowingly), and again after
    quantizing if any fused expert parameter survived the conversion.
    ``qformat="none"`` only unfuses (plain :func:`moe_unfuse.unfuse`) and counts routing.
    ``group``: data-parallel calibration (:mod:`moe_unfuse.quant.distributed`); ``batches`` are this
    process's share, and amax and token counts come out as one process on all batches would get.
    ``layerwise``: calibrate one decoder layer at a time (:mod:`moe_unfuse.quant.layerwise`; for a model
    offloaded to disk, whose memory then stays about one layer): the same amax and counts; its cached
    activations beyond what memory holds go to a temporary folder under ``spill_dir``; ``resume``
    restores the layers a killed run committed and commits each new one (:mod:`moe_unfuse.quant.resume`).
    ``engine``: experts modules whose spec says that engine's loader cannot serve them quantized
    (``export.engines``, GPT-OSS in vLLM and SGLang) stay unquantized.
    ``algorithm``: modelopt's calibration algorithm (``max``, or ``mse``: each expert weight's amax searched).
    """

    start = time.perf_counter()
    specs = select_specs(model, arch)
    coverage = check_coverage(model, specs, allow_uncovered)
    if layerwise:
        check_layerwise(model)
    sliced = _hub_sliced_linears(model, specs) if qformat != "none" else []
    by_arch = {s.arch: s for s in specs}
    kept = {
        path: why
        for path, arch, _ in coverage.covered
        if qformat != "none"
        and arch in by_arch
        and (why := by_arch[arch].experts_unquantized_for(engine or "")) is not None
    }
    kept.update(_modules_kept_for_engine(model, specs, engine) if qformat != "none" else {})
    heads: dict[str, str] = {}
    for spec in specs if qformat != "none" else ():
        names, why = spec.modules_quantized_for(engine or "")
        heads.update(dict.fromkeys(names, why))
    cfg = build_quant_config(qformat, [*exclude, *sliced, *(f"{path}.*" for path in kept)], algorithm, heads)
    stats = RoutingStats()
    if cfg is None:
        unfuse(model, specs or None, allow_uncovered=allow_uncovered)
        stats = _calibrate(model, batches, False, chunk_tokens, progress, group, layerwise, spill_dir, resume)
    else:
        import modelopt.torch.quantization as mtq

        for spec in specs:
            register(spec)

        def forward_loop(m: nn.Module) -> None:
            nonlocal stats
            stats = _calibrate(m, batches, force_routing, chunk_tokens, progress, group, layerwise, spill_dir, resume)

        if group is not None:
            cfg = distributed.without_modelopt_sync(cfg)

        # modelopt's prints ("Inserted N quantizers") would land in the report (stdout)
        with (
            contextlib.redirect_stdout(io.StringIO()),
            no_offload_writeback() if layerwise else contextlib.nullcontext(),
            contextlib.nullcontext() if progress else _no_modelopt_bars(),
        ):
            mtq.quantize(model, cfg, forward_loop=forward_loop)
    left = [name for name, _ in fused_expert_params(model, specs)]
    if left and not allow_uncovered:  # a spec matched, yet the quantizer did not convert the module
        raise UncoveredExpertsError(left)
    fallbacks: list[ScaleFallback] = []
    synced = 0
    if cfg is not None:
        if group is not None:
            distributed.reduce_amax(model)
        fallbacks = finalize_input_scales(model, input_scale)
        keep_uncalibrated_unquantized(model)
        synced = share_gate_up_weight_amax(model)
    num_linears = sum(len(m) * len(unfuse_state(m).spec.projection_names()) for _, m in unfused_experts(model))
    input_quantized = any(
        getattr(getattr(lin, "input_quantizer", None), "is_enabled", False)
        for _, m in unfused_experts(model)
        for lin in m.modules()
    )
    return QuantizeResult(
        qformat,
        specs,
        coverage,
        stats,
        fallbacks,
        input_scale,
        force_routing,
        synced,
        num_linears,
        time.perf_counter() - start,
        input_quantized,
        kept_for_engine=kept,
        quantized_for_engine=heads,
        algorithm=algorithm if cfg is not None else "none",
    )


@contextlib.contextmanager
def _no_modelopt_bars() -> Iterator[None]:
    """modelopt's calibration progress bars (mse: "MSE weight calibration", on stderr) off, as ours are."""
    import functools

    from modelopt.torch.quantization import model_calib

    original = model_calib.tqdm
    model_calib.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        model_calib.tqdm = original


def _hub_sliced_linears(model: nn.Module, specs: Sequence[Spec]) -> list[str]:
    """Linears the hub stores as part of a larger tensor (:meth:`NamingContract.map_linears`): they
    stay unquantized, so the export can write them back under the hub's name."""

    if not hasattr(model, "config") or not hasattr(type(model), "_from_config"):
        return []
    try:
        contract = model_contract(model, specs)
    except Exception:  # noqa: BLE001 - a model transformers cannot rebuild on meta: nothing to keep
        return []
    return sorted(path for path, (_, one_to_one) in contract.linear_hubs.items() if not one_to_one)


def _calibrate(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    force_routing: bool,
    chunk_tokens: int,
    progress: bool,
    group: Group | None = None,
    layerwise: bool = False,
    spill_dir: Path | None = None,
    resume: ResumeState | None = None,
) -> RoutingStats:
    """:func:`calibrate` (or :func:`calibrate_layerwise`), with a model whose forward fails named in one
    line instead of a traceback."""
    parallel = {} if group is None else {"sum_counts": distributed.sum_counts, "forced_here": group.writer}
    try:
        if layerwise:
            return calibrate_layerwise(
                model,
                batches,
                force_routing=force_routing,
                chunk_tokens=chunk_tokens,
                progress=progress,
                spill_dir=spill_dir,
                resume=resume,
                **parallel,
            )
        return calibrate(
            model, batches, force_routing=force_routing, chunk_tokens=chunk_tokens, progress=progress, **parallel
        )
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise MoeUnfuseError(
            f"the model's forward failed on the calibration batches ({type(exc).__name__}: {first_line(exc, 160)}); fix: check that the model runs on its own (e.g. vocabulary and --seq-len within its limits)"
        ) from None


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, each storage once (tied weights and views are not double counted)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) if p.device.type != "meta" else (id(p), 0)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size() if p.device.type == "meta" else p.untyped_storage().nbytes()
    return total


def _describe(model: nn.Module) -> str:
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    dtype = next(model.parameters()).dtype
    return f"{type(model).__name__}, {n / 1e6:.2f}M params, {str(dtype).replace('torch.', '')}"


# ----------------------------------------------------------------------------------------------
# the whole job


@dataclass
class QuantizeOptions:
    """``moe-unfuse quantize`` arguments (see ``moe_unfuse/cli/commands/quantize.py`` for their help)."""

    model: str | None
    qformat: str
    out: Path
    calib_size: int = DEFAULT_CALIB_SIZE
    calib_dataset: str | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    batch_size: int = DEFAULT_BATCH_SIZE
    device_map: str | None = "auto"
    dtype: str = "auto"
    engine: str = "vllm"
    input_scale: str = "shared"
    force_routing: bool = False
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    allow_uncovered: bool = False
    fuse_unquantized: bool = False
    exclude: tuple[str, ...] = ()
    overwrite: bool = False
    multimodal: bool = False
    progress: bool = True
    layerwise: bool | None = None  # None: layer by layer when the whole model would not fit in memory
    trust_modules: tuple[str, ...] = ()  # modules of the user's own that specs may import (--trust-module)
    algorithm: str = "max"  # modelopt calibration algorithm (options.ALGORITHMS)
    device: str | None = None  # where to compute; None: this rank's GPU when there is one, else the CPU
    eval_size: int = field(default_factory=default_eval_size)  # held-out samples evaluated (0: none)
    max_kl: float | None = None  # a larger KL(original || quantized) fails the run


def run_quantize(opts: QuantizeOptions) -> QuantizeReport | None:
    """Load or build the model, quantize, export to ``opts.out``, verify; see :class:`QuantizeReport`.
    Under torchrun every process calibrates on its share; rank 0 exports and reports, the others return None."""

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not opts.progress:  # transformers' own bars too ("Loading weights", "Writing model shards")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if opts.qformat != "none":
        check_algorithm(opts.qformat, opts.algorithm)  # before anything at --out is touched
    prepare_out_dir(Path(opts.out), opts.overwrite, Path(opts.model) if opts.model is not None else None)
    # The lock on --out before anything is loaded: a second run to the same --out fails now, not
    # after calibrating. Under torchrun the rank that writes holds it.
    group = distributed.from_env()
    with (
        out_lock(Path(opts.out)) if group is None or group.writer else contextlib.nullcontext(),
        trusted_modules(opts.trust_modules),
        quiet(),
    ):
        return _run_quantize(opts)


def _run_quantize(opts: QuantizeOptions) -> QuantizeReport | None:
    on_disk = checkpoint_bytes(opts.model) if opts.model is not None else 0
    device = distributed.execution_device(opts.device)
    layerwise = opts.layerwise
    if layerwise is None:
        layerwise = opts.model is not None and needs_layerwise(on_disk, opts.device_map)
    if layerwise and opts.model is None:
        raise MoeUnfuseError("--layerwise reads a model folder; fix: pass MODEL, or drop --layerwise")
    if not layerwise:
        model = _load_whole(opts, device) if opts.model is not None else None
        spilled = offloaded_to_disk(model) if model is not None else []
        if not spilled or opts.layerwise is False:
            return _quantize_and_export(opts, on_disk, device, model=model, spilled=spilled)
        # accelerate would run part of the whole model from disk: layer by layer instead, which
        # holds one layer and writes the same checkpoint
        del model
        gc.collect()
    import shutil

    map_large_allocations()  # one layer's tensors freed per step: their memory goes back at once
    world = int(os.environ.get("WORLD_SIZE", "1"))
    root = resume_dir(Path(opts.out))
    if world > 1:  # each rank its own scratch; resuming is for a single process
        root = root / f"rank{os.environ.get('RANK', '0')}"
    root.mkdir(parents=True, exist_ok=True)
    report = None
    try:
        with out_lock(root):
            scratch = root / "scratch"  # offloaded conversions and spilled activations: never reused
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            state = root / "state" if world == 1 else None
            try:
                report = _quantize_and_export(opts, on_disk, device, scratch, state)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
                if (report is not None and report.ok) or state is None or not (state / "layer-0").is_dir():
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        if world > 1:
            with contextlib.suppress(OSError):
                root.parent.rmdir()  # the last rank out removes OUT.resume, also after an error
    return report


def _load_whole(opts: QuantizeOptions, device: torch.device) -> nn.Module:
    """The whole model, placed by ``--device-map`` (``--device`` given: on that device)."""
    device_map = str(device) if opts.device is not None and opts.device_map == "auto" else opts.device_map
    return load_model(opts.model, device_map, opts.dtype)


def _quantize_and_export(
    opts: QuantizeOptions,
    on_disk: int,
    device: torch.device,
    offload: Path | None = None,
    state: Path | None = None,
    model: nn.Module | None = None,
    spilled: Sequence[str] = (),
) -> QuantizeReport | None:
    """The job on ``device``; ``offload``: layer by layer, every module offloaded to disk (tensors a
    load-time conversion rewrote go to that folder); ``state``: where its per-layer state is committed;
    ``model``: the whole model, already loaded, with the modules accelerate ``spilled`` to disk
    (``--no-layerwise`` on a model that does not fit)."""
    if opts.model is None:
        model = tiny_gemma4(multimodal=opts.multimodal).to(device)
        tokenizer = byte_tokenizer()
        source = f"built-in tiny Gemma 4 ({_describe(model)}, seeded random weights)"
    else:
        if model is None:
            model = (
                load_offloaded(opts.model, offload, opts.dtype, device)
                if offload is not None
                else _load_whole(opts, device)
            )
        tokenizer = load_tokenizer(opts.model)
        source = f"{opts.model} ({_describe(model)})"
    texts = read_calibration_texts(opts.calib_dataset, tokenizer)
    batches = calibration_batches(tokenizer, texts, opts.calib_size, opts.seq_len, opts.batch_size)
    evaluating = opts.eval_size > 0 and opts.qformat != "none"
    held_out = held_out_batches(tokenizer, texts, opts.eval_size, opts.seq_len) if evaluating else ([], "")
    group = distributed.from_env(device)  # torchrun: this process calibrates on its share of the batches
    if group is not None and offload is not None and len(batches) < group.world:
        raise MoeUnfuseError(
            f"--calib-size: {len(batches)} calibration batch(es) for {group.world} processes, and layer by layer "
            "plans each process's forward on one of its own; fix: raise --calib-size or run fewer processes"
        )
    bytes_before, before_what = (on_disk, "source checkpoint") if on_disk else (param_bytes(model), "in memory")
    resume = None
    if state is not None and opts.model is not None:
        options = {
            "qformat": opts.qformat,
            "algorithm": opts.algorithm,
            "exclude": list(opts.exclude),
            "force_routing": opts.force_routing,
            "chunk_tokens": opts.chunk_tokens,
            "allow_uncovered": opts.allow_uncovered,
            "dtype": opts.dtype,
            "device": device.type,
        }
        resume = ResumeState(state, fingerprint(Path(opts.model), batches, options))
    result = quantize_model(
        model,
        opts.qformat,
        group.shard(batches) if group is not None else batches,
        force_routing=opts.force_routing,
        input_scale=opts.input_scale,
        chunk_tokens=opts.chunk_tokens,
        exclude=opts.exclude,
        allow_uncovered=opts.allow_uncovered,
        progress=opts.progress and (group is None or group.writer),
        group=group,
        layerwise=offload is not None,
        spill_dir=offload,
        algorithm=opts.algorithm,
        resume=resume,
        engine=opts.engine,
    )
    if group is not None and not group.writer:
        return None  # rank 0 writes and reports
    kill_point("before-export")
    exported, verified = export_checkpoint(
        model,
        Path(opts.out),
        engine=opts.engine,
        specs=result.specs,
        fuse_unquantized=opts.fuse_unquantized,
        tokenizer=tokenizer,
        qformat=opts.qformat,
        routing=result.routing,
        fallbacks=result.fallbacks,
        progress=opts.progress,
        overwrite=opts.overwrite,
        max_shard_size=LAYERWISE_SHARD_SIZE if offload is not None else None,
        locked=True,
        source=opts.model,
    )
    samples = sum(b["input_ids"].shape[0] for b in batches)
    tokens = sum(b["input_ids"].numel() for b in batches)
    layers = len(decoder_layers(model)) if offload is not None else 0
    resumed = resume.resumed if resume is not None else 0
    report = QuantizeReport(
        source,
        opts,
        result,
        samples,
        tokens,
        bytes_before,
        exported,
        verified,
        before_what,
        layers,
        str(device),
        resumed,
        spilled=list(spilled),
    )
    if evaluating and verified.ok:
        del model  # the evaluation loads the original and the checkpoint's own bytes
        original = opts.model if opts.model is not None else tiny_gemma4(multimodal=opts.multimodal)
        evaluate_export(report, original, *held_out)
    return report


def evaluate_export(report: QuantizeReport, original: Any, batches: Sequence[dict], held_out: str) -> None:
    """Measure the written checkpoint against ``original`` (:func:`moe_unfuse.quant.evaluate.evaluate`), record
    every figure in its ``moe_unfuse.json``, and move it to ``OUT.invalid`` when a module fails its
    format's limit or the KL passes ``--max-kl``."""
    import json
    import shutil

    from ..hub.checkpoint import METADATA_FILE

    path = Path(report.export.path)
    ev = evaluate(path, original, batches, held_out=held_out, work_dir=path.parent, progress=report.options.progress)
    report.evaluation = ev
    max_kl = report.options.max_kl
    if ev.failures:
        report.eval_failed = f"{len(ev.failures)} check(s) of the evaluation failed"
    elif max_kl is not None and not ev.kl <= max_kl:
        report.eval_failed = f"KL {ev.kl:.4g} over --max-kl {max_kl:g}"
    meta_path = path / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta["evaluation"] = ev.to_dict() | {"failed": report.eval_failed or None}
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if report.eval_failed:
        invalid = path.with_name(path.name + ".invalid")
        if invalid.exists():
            shutil.rmtree(invalid)
        path.rename(invalid)
        report.export.path = invalid
