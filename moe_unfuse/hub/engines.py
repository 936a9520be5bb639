"""Serving engines as plugins contribute them: each a name and the rules its loader holds a checkpoint to.

An :class:`Engine` is registered through the ``register_engines`` hook (the built-in vLLM, SGLang,
TensorRT-LLM and ``hf`` are the default plugin ``moe_unfuse.default_plugins.engines``). ``verify
--engine E`` runs each of E's :class:`EngineRule` s on an :class:`EngineContext`: the rule's one view
of the checkpoint (tensor names, shapes and dtypes from the headers, tensors on demand, the
quantization configs, the naming contract's experts modules and the specs that describe them).

This module imports neither torch nor transformers (``moe_unfuse.plugin`` hands out its names to
plugins that the plugin manager imports when it is built: ``moe-unfuse list`` stays light).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

from ..base.errors import MoeUnfuseError
from ..plugins.manager import registry

if TYPE_CHECKING:
    from ..spec.model import Spec
    from .checkpoint_reader import Checkpoint
    from .naming import NamingContract

#: A per-expert tensor name: ``{prefix}.experts.{E}.{proj}.{suffix}``.
PER_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*?\.experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?P<suffix>[A-Za-z0-9_]+)$"
)


@dataclass(frozen=True)
class EngineRule:
    """One thing an engine's loader requires of a checkpoint, with where it was read.

    ``name``: the check's name in the report; ``versions``: the engine versions whose loader source
    it was read from; ``source``: that source's file:line; ``what``: the requirement, one line;
    ``check(ctx)``: the offending items (tensor names, config fields, modules, each with why), an
    empty list when the checkpoint holds the requirement.
    """

    name: str
    versions: str
    source: str
    what: str
    check: Callable[[EngineContext], list[str]]


@dataclass(frozen=True)
class Engine:
    """A serving engine an export can target (``quantize --engine``, ``verify --engine``): its name,
    a one-line description and the rules its loader holds a checkpoint to (none: only the export
    contract every checkpoint holds)."""

    name: str
    description: str
    rules: tuple[EngineRule, ...] = ()


class ExpertKey(NamedTuple):
    """A per-expert tensor name's parts: ``{prefix}.{expert}.{proj}.{suffix}``."""

    prefix: str  # the experts module's path, ending in ``.experts``
    expert: int
    proj: str
    suffix: str  # ``weight``, ``bias``, ``weight_scale``, ``input_scale`` ...


class ExpertsModule(NamedTuple):
    """An experts module of the checkpoint's model, as the naming contract has it."""

    label: str  # unique in a checkpoint: its hub path, with its slice where it shares an expert list
    hub: str  # its path under the checkpoint's (hub) names
    arch: str  # the spec that describes it
    layout: str  # the export layout: ``per_expert`` or ``fused``
    num_experts: int


class EngineContext:
    """What an engine rule reads of a checkpoint: its only view of it.

    Tensors: :attr:`keys`, :meth:`shape`, :meth:`dtype` (from the safetensors headers), :meth:`tensor`
    (read on demand), :meth:`per_expert`, :meth:`scaled_modules`, :meth:`base`. Configs:
    :attr:`quant_algo`, :attr:`quantization_config`, :attr:`hf_quant_config`, :attr:`excludes`,
    :attr:`metadata`. Model: :meth:`experts`, :meth:`spec`, :meth:`quantized_for`. :attr:`engine` is
    the engine being verified.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        contract: NamingContract | None,
        engine: str,
        metadata: Mapping[str, Any],
        hf_quant: dict | None,
        qc: dict | None,
        algo: str | None,
        excludes: list[str],
    ):
        self._ckpt = ckpt
        self._contract = contract
        self.engine = engine
        #: ``moe_unfuse.json`` (empty when absent).
        self.metadata = metadata
        #: ``hf_quant_config.json`` (None when absent).
        self.hf_quant_config = hf_quant
        #: config.json's ``quantization_config`` (None when absent).
        self.quantization_config = qc
        #: The quantization algorithm (``FP8``, ``NVFP4`` ...), None for an unquantized checkpoint.
        self.quant_algo = algo
        #: The exclude list (modules left unquantized), as the quantization config writes it.
        self.excludes = list(excludes)
        self._keys: tuple[str, ...] | None = None
        self._scaled: frozenset[str] | None = None

    # tensors

    @property
    def keys(self) -> tuple[str, ...]:
        """Every tensor name of the checkpoint."""
        if self._keys is None:
            self._keys = tuple(self._ckpt.where)
        return self._keys

    def shape(self, key: str) -> list[int]:
        return self._ckpt.shape[key]

    def dtype(self, key: str) -> str:
        """The safetensors dtype name: ``BF16``, ``F32``, ``F8_E4M3``, ``U8`` ..."""
        return self._ckpt.dtype[key]

    def tensor(self, key: str) -> Any:
        """The tensor ``key`` (a ``torch.Tensor``, read from its shard)."""
        return self._ckpt.tensor(key)

    def per_expert(self, key: str) -> ExpertKey | None:
        """``key``'s parts when it is a per-expert tensor (``...experts.{E}.{proj}.{suffix}``), else None."""
        m = PER_EXPERT_RE.match(key)
        return ExpertKey(m["prefix"], int(m["expert"]), m["proj"], m["suffix"]) if m else None

    def scaled_modules(self) -> frozenset[str]:
        """Modules that carry a quantization scale (a fused ``m.p_weight_scale`` counts for ``m``)."""
        if self._scaled is None:
            from .checkpoint import quantized_modules

            self._scaled = frozenset(quantized_modules(self._ckpt.where))
        return self._scaled

    def base(self, key: str) -> str | None:
        """The model's tensor name ``key`` is (itself, or the weight a scale of it scales), or None
        when the model has no such tensor, or when there is no naming contract (config.json describes
        no model the installed transformers builds)."""
        return self._contract.base(key) if self._contract is not None else None

    # the model

    def experts(self) -> tuple[ExpertsModule, ...]:
        """The model's experts modules, by label (none without a naming contract)."""
        experts = self._contract.experts if self._contract is not None else {}
        return tuple(
            ExpertsModule(label, e.hub, e.arch, e.layout, e.num_experts) for label, e in sorted(experts.items())
        )

    def spec(self, arch: str) -> Spec:
        """The spec ``arch`` (its ``export.engines``: ``experts_unquantized_for(engine)``,
        ``modules_unquantized_for(engine)``, ``modules_quantized_for(engine)``)."""
        from ..spec.catalog import get_spec

        return get_spec(arch)

    def quantized_for(self, engine: str | None = None) -> dict[str, str]:
        """Modules kept unquantized by default that ``engine`` (default: :attr:`engine`) builds
        quantized, per the specs of the checkpoint's experts (``export.engines.E.quantized``:
        Exaone-MoE's lm_head in vLLM), each with why."""
        engine = engine or self.engine
        out: dict[str, str] = {}
        for arch in sorted({e.arch for e in self.experts()}):
            names, why = self.spec(arch).modules_quantized_for(engine)
            out.update(dict.fromkeys(names, why or ""))
        return out


def engines() -> dict[str, Engine]:
    """Every registered engine, by name, in registration order (the built-in ones first)."""
    return registry().engines


def get_engine(name: str) -> Engine:
    """The engine ``name``; an unknown one is a one-line error listing the known ones."""
    table = engines()
    if name not in table:
        raise MoeUnfuseError(f"unknown engine {name!r}; fix: use one of {', '.join(table)}")
    return table[name]
