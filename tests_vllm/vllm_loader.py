"""vLLM's own weight loading, run on a CPU-only machine, with what it wrote and read tracked.

The full engine needs CUDA (the wheel's ``vllm._C``), but its loading path runs for real:
``EngineArgs(model=DIR).create_engine_config()`` (which picks ``modelopt`` / ``modelopt_fp4`` from the
checkpoint), a gloo process group of one, ``DefaultModelLoader.create_model`` (the real model class and
the quant methods' ``create_weights``) and ``DefaultModelLoader.load_weights`` (the real safetensors
iterator, name mappers, expert mappings and ``weight_loader``s, and vLLM's own "weights were not
initialized from checkpoint" check where vLLM runs it: on unquantized checkpoints). Only kernel *selection*, which raises on a CPU before any weight
exists, gets a stand-in (:func:`cpu_kernel_selection`); no name, shape or mapping code is touched.

What is tracked: every parameter is pre-filled with a sentinel (NaN; integer ones twice, with 0x00 and
0xFF, so an element left unwritten is one that kept both), and every checkpoint tensor is wrapped in a
tensor subclass that follows it through views and slices and records when it is copied into a
parameter (``copy_``, item assignment, ``.item()``), and into which dtype.

vLLM's "not initialized" check is not forced on for quantized checkpoints (vLLM leaves it off for them,
``model_loader/default_loader.py:510-518``): the sentinel sees every element it would, and in 0.33 its
bookkeeping misses names that were loaded: a parameter registered under two modules, loaded under one
(the Transformers backend's router and shared experts, ``models/transformers/moe.py:376-410``), and
quantized experts whose loader never records them (``models/granitemoehybrid.py:510``).
"""

from __future__ import annotations

import contextlib
import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import torch

# vLLM picks its platform at import: without CUDA it would pick none ("Device string must not be empty").
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
#: Torch functions through which a checkpoint tensor's values reach a parameter.
_COPIES = {"copy_", "__setitem__", "index_copy_", "fill_"}
_PACKED = (torch.uint8, torch.float8_e4m3fn)


class Tracked(torch.Tensor):
    """A checkpoint tensor (or a view of one) that remembers its checkpoint name."""

    origin: str
    log: "LoadLog"

    @staticmethod
    def wrap(t: torch.Tensor, origin: str, log: "LoadLog") -> "Tracked":
        out = t.as_subclass(Tracked)
        out.origin, out.log = origin, log
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sources = [a for a in (*args, *kwargs.values()) if isinstance(a, Tracked)]
        name = getattr(func, "__name__", "")
        if sources and name == "item":
            sources[0].log.consumed.add(sources[0].origin)
        elif sources and name in _COPIES and args and not isinstance(args[0], Tracked):
            target = args[0]
            for src in sources:
                src.log.consumed.add(src.origin)
                if src.dtype in _PACKED and target.dtype != src.dtype:
                    src.log.converted.append(f"{src.origin} ({src.dtype} into {target.dtype})")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})
        if not sources or name in _COPIES:
            return result
        return _rewrap(result, sources[0])


def _rewrap(result: Any, source: "Tracked") -> Any:
    """A tensor derived from a checkpoint tensor (a view, a slice, one of ``unbind``'s) stays tracked."""
    if isinstance(result, torch.Tensor) and not isinstance(result, torch.nn.Parameter):
        return Tracked.wrap(result, source.origin, source.log)
    if isinstance(result, (list, tuple)) and not hasattr(result, "_fields"):
        return type(result)(_rewrap(r, source) for r in result)
    return result


def _plain(x: Any) -> Any:
    if isinstance(x, Tracked):
        return x.as_subclass(torch.Tensor)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


@dataclass
class LoadLog:
    read: list[str] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    converted: list[str] = field(default_factory=list)


@dataclass
class LoadResult:
    """What vLLM's loader did with one checkpoint folder."""

    architecture: str
    quantization: str | None = None
    error: str | None = None  # the exception, one line, with the deepest vllm frame's file:line
    #: where it stopped: "config" (create_engine_config), "model" (create_model: the model class and the
    #: quant methods' create_weights), "weights" (load_weights and the checks on what it wrote and read)
    phase: str = "config"
    not_consumed: list[str] = field(default_factory=list)
    not_written: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    @property
    def loads(self) -> bool:
        return self.error is None and not (self.not_consumed or self.not_written or self.converted)

    def reason(self) -> str:
        if self.error:
            return self.error
        parts = []
        for what, names in (
            ("checkpoint tensors never copied into a parameter", self.not_consumed),
            ("parameters (or elements) never written", self.not_written),
            ("packed/FP8 tensors copied into another dtype", self.converted),
        ):
            if names:
                parts.append(f"{what}: {', '.join(sorted(names)[:4])}" + (" ..." if len(names) > 4 else ""))
        return "; ".join(parts)


def _sorted_sets(message: str) -> str:
    """A message with each set of quoted names vLLM prints (``{'b', 'a'}``, in hash order) sorted, so a
    recorded reason is the same on every run."""
    return re.sub(
        r"\{('[^']*'(?:, '[^']*')*)\}",
        lambda m: "{" + ", ".join(sorted(m.group(1).split(", "))) + "}",
        message,
    )


def _vllm_frame(exc: BaseException) -> str:
    import vllm

    root = str(Path(vllm.__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(root)]
    if not frames:
        return ""
    f = frames[-1]
    return f" (vllm {os.path.relpath(f.filename, root)}:{f.lineno})"


@contextlib.contextmanager
def cpu_kernel_selection() -> Iterator[None]:
    """Stand-ins for the kernel choices that raise on a CPU before any weight exists, with backends a
    GPU gets: FlashInfer CUTLASS for NVFP4 MoE (its scales global per expert), Triton for FP8 and
    unquantized MoE (the CPU's unquantized MoE backend takes no GPT-OSS: ``oracle/unquantized.py:370``);
    and the registry's model inspection runs in this process."""
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as unquantized
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend
    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.model_executor.models import registry

    class NoKernel:
        supports_pre_processed_weights = False

        def input_quant_key(self) -> None:
            return None

    with (
        mock.patch.object(modelopt, "select_linear_kernel", lambda *a, **k: NoKernel()),
        mock.patch.object(modelopt, "select_nvfp4_moe_backend", lambda **k: (NvFp4MoeBackend.FLASHINFER_CUTLASS, None)),
        mock.patch.object(modelopt, "select_fp8_moe_backend", lambda **k: (Fp8MoeBackend.TRITON, None)),
        mock.patch.object(
            unquantized, "select_unquantized_moe_backend", lambda **k: (UnquantizedMoeBackend.TRITON, None)
        ),
        # The registry inspects a model class in a child process "to avoid initializing CUDA"
        # (models/registry.py:1122); there is none here, and a child re-imports vLLM for each class.
        mock.patch.object(registry, "_run_in_subprocess", lambda fn: fn()),
    ):
        yield


_DIST = False


def _init_distributed() -> None:
    global _DIST
    if _DIST:
        return
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    init_distributed_environment(1, 0, "tcp://127.0.0.1:29517", 0, "gloo")
    ensure_model_parallel_initialized(1, 1)
    _DIST = True


def registered(architecture: str) -> bool:
    from vllm.model_executor.models.registry import ModelRegistry

    return architecture in ModelRegistry.get_supported_archs()  # names only: nothing is imported


def _fill(model: torch.nn.Module, integer_value: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.data.fill_(float("nan"))
            elif p.numel():
                p.data.fill_(integer_value)


def _exempt(model: torch.nn.Module) -> set[str]:
    """Parameters a checkpoint need not carry, as vLLM's own check exempts them
    (``model_loader/default_loader.py:545-562``): KV-cache quantization scales, which fall back to
    defaults, and those built from the quantization config (``_CONFIG_BUILT_PARAMS``)."""
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod
    from vllm.model_executor.model_loader.default_loader import _CONFIG_BUILT_PARAMS

    out = set()
    for mname, module in model.named_modules():
        kv = isinstance(getattr(module, "quant_method", None), BaseKVCacheMethod)
        for pname, _ in module.named_parameters(recurse=False):
            if kv or pname in _CONFIG_BUILT_PARAMS:
                out.add(f"{mname}.{pname}" if mname else pname)
    return out


def _unwritten(model: torch.nn.Module, first: dict[str, torch.Tensor] | None = None) -> list[str]:
    out = []
    exempt = _exempt(model)
    for name, p in model.named_parameters():
        if p.numel() == 0 or name in exempt:
            continue
        if p.dtype.is_floating_point:
            bad = torch.isnan(p.data.float())
        elif first is not None:
            bad = (p.data == 0) & first[name]
        else:
            continue
        if bad.any():
            n = int(bad.sum())
            out.append(f"{name} ({n} of {p.numel()} elements)" if n < p.numel() else name)
    return out


def load(path: Path) -> LoadResult:
    """Load the checkpoint at ``path`` through vLLM's own loader on the CPU and report what it did."""
    import json

    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.utils.torch_utils import set_default_torch_dtype

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    result = LoadResult(arch)
    log = LoadLog()
    try:
        args = EngineArgs(
            model=str(path),
            skip_tokenizer_init=True,
            enforce_eager=True,
            max_model_len=64,
            load_format="safetensors",
            # Irrelevant to loading, and on a CPU it stops hybrid MLA models (GLM-5-Next, Kimi-Linear) before
            # any weight: their mamba block size needs prefix caching, which the CPU platform turns off for
            # MLA (platforms/cpu.py:543).
            enable_prefix_caching=False,
        )
        with cpu_kernel_selection():
            cfg = args.create_engine_config()
        result.quantization = cfg.model_config.quantization
        loader = DefaultModelLoader(cfg.load_config)
        original = loader.get_all_weights

        def tracked(model_config, model):
            for name, tensor in original(model_config, model):
                log.read.append(name)
                yield name, Tracked.wrap(tensor, name, log)

        with (
            set_current_vllm_config(cfg),
            set_default_torch_dtype(cfg.model_config.dtype),
            torch.device("cpu"),
            cpu_kernel_selection(),
        ):
            _init_distributed()
            result.phase = "model"
            model = loader.create_model(vllm_config=cfg, model_config=cfg.model_config)
            result.phase = "weights"
            _fill(model, 0xFF)
            with mock.patch.object(loader, "get_all_weights", tracked):
                loader.load_weights(model, cfg.model_config)
            first = {n: p.data == 0xFF for n, p in model.named_parameters() if not p.dtype.is_floating_point}
            if any(m.any() for m in first.values()):  # integer parameters: again with 0x00, untracked
                for n, p in model.named_parameters():
                    if n in first:
                        p.data[first[n]] = 0
                loader.load_weights(model, cfg.model_config)
            result.not_written = _unwritten(model, first)
    except Exception as exc:  # noqa: BLE001 - the loader's failure is the result
        first = _sorted_sets(str(exc).splitlines()[0]) if str(exc) else ""
        result.error = f"{type(exc).__name__}: {first[:300]}{_vllm_frame(exc)}"
        return result
    result.not_consumed = sorted(set(log.read) - log.consumed)
    result.converted = sorted(set(log.converted))
    return result
