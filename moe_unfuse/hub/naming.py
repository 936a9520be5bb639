"""The naming contract of an export, shared by the exporter and the verifier.

An export holds exactly the tensor names ``save_pretrained`` writes for the same model unquantized
(transformers v5 reverses its load-time conversion mapping on save: Mixtral's fused
``mlp.experts.gate_up_proj`` goes back to ``block_sparse_moe.experts.{E}.w1/w3``), and each fused
experts module as its spec's ``export.layout`` says:

- ``per_expert``: where the hub stores the module per expert, the hub's own names; where the hub
  stores it fused (Gemma 4, Llama 4), ``{module}.{E}.{proj}.weight`` (and ``.bias``), the per-expert
  form the engines' MoE loaders read;
- ``fused``: the hub's fused names (GPT-OSS), the quantized experts re-stacked through the layout
  reverse.

Quantization adds modelopt's suffixes: ``{module}.weight_scale``, ``.weight_scale_2``,
``.input_scale`` next to a ``{module}.weight``, and ``{name}_weight_scale`` ... next to a fused
``{name}``. The contract is computed from a model on the meta device, so the verifier gets it from a
checkpoint's config.json without reading a weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterable, Mapping

from torch import nn

from ..base.errors import MoeUnfuseError
from ..core.coverage import find_fused_params
from ..core.plan import resolve_dims
from ..spec.model import Spec
from .loading import transformers_class

#: Suffixes modelopt writes next to a quantized weight, longest first (``weight_scale_2`` before ``weight_scale``).
QUANT_SUFFIXES = ("weight_scale_2", "weight_scale", "input_scale", "pre_quant_scale", "output_scale")
_DIGITS = re.compile(r"(?<![A-Za-z_])\d+(?![A-Za-z_])")
_HASH = re.compile("#")
_EXPERT_INDEX = re.compile(r"^(\d+)\.")
_HUB_EXPERT = re.compile(r"^(\d+)\.([^.]+)\.")  # "{E}.{proj}." under an experts module's hub path
_IN_MEMORY_EXPERT = re.compile(r"^(.*)\.(\d+)\.([^.]+)\.(.+)$")  # "{module}.{E}.{proj}.{leaf}"
_PROBE = "__moe_unfuse_probe__"  # a leaf no converter matches: reverting it shows a module's hub path
#: Attention KV-cache scales modelopt writes on the attention module itself.
KV_SUFFIXES = ("k_scale", "v_scale")


@dataclass(frozen=True)
class ExpertsNaming:
    """How one experts module is named in an export."""

    module: str  # path in the in-memory model
    hub: str  # path in the hub checkpoint's names
    arch: str
    num_experts: int
    layout: str  # "per_expert" or "fused": what the export writes
    hub_fused: bool  # the hub checkpoint stores this module fused
    params: tuple[tuple[str, tuple[str, ...], str | None], ...]  # (fused param, projections, fused bias)
    names: tuple[str, ...]  # the contract's tensor names of this module
    weights: tuple[str, ...] = ()  # those of them that are weights (quantized, they carry scales)
    #: The hub's fused names and shapes, for a per_expert module the hub stores fused: an unquantized
    #: module may be written back in that form (``--fuse-unquantized``), and from_pretrained loads it.
    hub_fused_names: tuple[tuple[str, tuple[int, ...]], ...] = ()
    fused_back: bool = False  # written in the hub's fused form although its export layout is per_expert
    #: For a module the hub stores per expert: each projection's name there (Mixtral-style
    #: ``gate_proj`` -> ``w1``), so an in-memory per-expert key can be named as the hub does.
    hub_projections: tuple[tuple[str, str], ...] = ()
    #: Where the hub keeps several experts modules in one expert list (Ernie 4.5 VL: text experts
    #: ``0..E-1``, vision experts ``E..2E-1`` under one ``mlp.experts``), this module's first index in it.
    expert_offset: int = 0
    shares_hub: bool = False  # the hub's expert list holds other modules' experts too

    @property
    def label(self) -> str:
        """The module under the hub's names, unique in a contract: its hub path, with its slice of the
        expert list where it shares that list with other modules."""
        return (
            f"{self.hub}[{self.expert_offset}:{self.expert_offset + self.num_experts}]" if self.shares_hub else self.hub
        )

    def per_expert_key(self, expert: int, proj: str, leaf: str) -> str:
        """A per-expert tensor's name, for a module the hub stores fused."""
        return f"{self.hub}.{expert}.{proj}.{leaf}"

    def to_dict(self) -> dict:
        return {
            "module": self.module,
            "arch": self.arch,
            "experts": self.num_experts,
            "layout": self.layout,
            "hub_fused": self.hub_fused,
            "projections": [p for _, into, _ in self.params for p in into],
            **(
                {"hub": self.hub, "hub_experts": [self.expert_offset, self.expert_offset + self.num_experts]}
                if self.shares_hub
                else {}
            ),
        }


@dataclass
class NamingContract:
    """Every tensor name an export of one model holds (before quantization suffixes), and its experts."""

    names: dict[str, tuple[int, ...]]  # name -> unquantized shape
    experts: dict[str, ExpertsNaming] = field(default_factory=dict)  # by label (the hub path)
    model: nn.Module | None = field(default=None, repr=False)  # the fused model it was computed from
    #: Names an export may leave out: hub rows of experts past the expert count that the forward never
    #: reads (LongCat's zero experts); quantized exports drop them, unquantized ones keep them.
    optional: frozenset[str] = frozenset()
    #: Tensors of the source checkpoint the model places nowhere, carried into the export as they are
    #: (:func:`unplaced_source_keys`): names too, never quantized (a scale next to one is unknown).
    carried: frozenset[str] = frozenset()
    _hub_templates: dict[str, str | None] = field(default_factory=dict, repr=False)
    #: in-memory Linear path -> (hub module, one to one): filled by :meth:`map_linears`.
    linear_hubs: dict[str, tuple[str, bool]] = field(default_factory=dict, repr=False)

    def map_linears(self, model: nn.Module) -> dict[str, tuple[str, bool]]:
        """For each ``nn.Linear`` of ``model`` whose weight the hub does not name as is: its hub
        module, and whether it is one to one. Not one to one: transformers stores it as a slice of a
        larger hub tensor (a dense in_proj split in memory into in_proj_qkv and in_proj_z), which a
        quantized export cannot write (each part has its own scales), so it stays unquantized. A weight
        the hub stores as a bare tensor (a key not ending in ``.weight``: Inkling2's sconv.weight_proj) is
        not one to one either: its scales would have no hub name, so it stays unquantized too."""
        import torch

        out: dict[str, tuple[str, bool]] = {}
        for path, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, nn.Linear) or weight is None or f"{path}.weight" in self.names:
                continue
            try:
                reverted = (
                    _revert(self.model, {f"{path}.weight": torch.empty(tuple(weight.shape), device="meta")})
                    if self.model is not None
                    else {}
                )
            except Exception:  # noqa: BLE001 - not reversible on its own: treat as not one to one
                reverted = {}
            if len(reverted) != 1:
                continue
            ((key, t),) = reverted.items()
            if key in self.names and key.endswith(".weight"):
                out[path] = (key[: -len(".weight")], tuple(t.shape) == self.names[key])
            elif key in self.names:  # a bare hub tensor: no name for a quantized weight's scales
                out[path] = (key, False)
        self.linear_hubs = out
        return out

    def to_hub(self, state: Mapping) -> dict:
        """In-memory fused tensors as ``save_pretrained`` writes them: hub names, hub layout."""
        return _revert(self.model, state) if self.model is not None else dict(state)

    def base(self, key: str) -> str | None:
        """The contract name ``key`` belongs to: itself, or the weight a quantization key scales."""
        if key in self.names or key in self.carried:
            return key
        for s in QUANT_SUFFIXES:
            if key.endswith("." + s) and (w := key[: -len(s) - 1] + ".weight") in self.names:
                return w
            if key.endswith("_" + s) and (w := key[: -len(s) - 1]) in self.names:
                return w
        for s in KV_SUFFIXES:
            if key.endswith("." + s) and any(n.startswith(key[: -len(s)]) for n in self.names):
                return key
        return None

    def for_keys(self, keys: Iterable[str]) -> "NamingContract":
        """This contract with each experts module a checkpoint holds in the hub's fused form (an
        unquantized module written back fused) named that way."""
        keys = set(keys)
        names = dict(self.names)
        experts = dict(self.experts)
        for label, e in self.experts.items():
            if e.hub_fused_names and any(k in keys for k, _ in e.hub_fused_names):
                for n in e.names:
                    names.pop(n, None)
                names.update(dict(e.hub_fused_names))
                fused = tuple(k for k, _ in e.hub_fused_names)
                biases = {f"{e.hub}.{b}" for _, _, b in e.params if b}
                experts[label] = replace(
                    e,
                    layout="fused",
                    names=fused,
                    weights=tuple(k for k in fused if k not in biases),
                    hub_fused_names=(),
                    fused_back=True,
                )
        return NamingContract(names, experts, self.model, self.optional, self.carried, linear_hubs=self.linear_hubs)

    def expert_owned(self, key: str) -> bool:
        """Whether ``key`` (a hub name) is a tensor of an experts module this contract names."""
        prefixes, names = self._expert_keys
        return key in names or key.startswith(prefixes)

    @cached_property
    def _expert_keys(self) -> tuple[tuple[str, ...], frozenset[str]]:
        """The experts modules' hub paths (as prefixes) and names, once: :meth:`expert_owned` is asked
        for every tensor of a source checkpoint."""
        experts = self.experts.values()
        names = frozenset(n for e in experts for n in (*e.names, *(k for k, _ in e.hub_fused_names)))
        return tuple(f"{e.hub}." for e in experts), names

    def hub_key(self, key: str) -> str:
        """``key`` under the hub's names: itself when the contract knows it, else its in-memory name
        reversed as ``save_pretrained`` would (modelopt falls back to in-memory names for a model whose
        conversion mapping it cannot reverse), keeping any quantization suffix. Cached per key shape
        (digits abstracted), so a model of thousands of experts costs a few hundred reverses."""
        if self.base(key) is not None or self.model is None:
            return key
        per_expert = self.per_expert_hub_key(key)
        if per_expert is not None:
            return per_expert
        numbers = _DIGITS.findall(key)
        template = _DIGITS.sub("#", key)
        if template not in self._hub_templates:
            self._hub_templates[template] = self._hub_template(key, numbers)
        result = self._hub_templates[template]
        if result is None:
            return key
        it = iter(numbers)
        return _HASH.sub(lambda _: next(it), result)

    def per_expert_hub_key(self, key: str) -> str | None:
        """An in-memory per-expert key (``{module}.{E}.{proj}.{leaf}``) under the hub's names: for a
        module the hub stores per expert, its own (``block_sparse_moe.experts.E.w1.weight``: transformers
        cannot reverse one key of a converter that merges many); for one it stores fused,
        ``{hub}.{E}.{proj}.{leaf}`` (renames meant for other modules must not touch it: HY-V4 VL's
        ``gate_proj``). None for any other key."""
        m = _IN_MEMORY_EXPERT.match(key)
        for e in self.experts.values() if m else ():
            if e.module != m.group(1):
                continue
            if e.hub_fused and e.layout == "per_expert" and any(m.group(3) in into for _, into, _ in e.params):
                return e.per_expert_key(int(m.group(2)), m.group(3), m.group(4))
            proj = dict(e.hub_projections).get(m.group(3))
            if proj is not None:
                return f"{e.hub}.{int(m.group(2)) + e.expert_offset}.{proj}.{m.group(4)}"
        return None

    def _hub_template(self, key: str, numbers: list[str]) -> str | None:
        import torch

        for suffix in ("", *(f".{s}" for s in QUANT_SUFFIXES), *(f"_{s}" for s in QUANT_SUFFIXES)):
            if not key.endswith(suffix):
                continue
            stem = key[: len(key) - len(suffix)] if suffix else key
            weight = f"{stem}.weight" if suffix.startswith(".") else stem
            try:
                reverted = list(_revert(self.model, {weight: torch.empty(0, device="meta")}))
            except Exception:  # noqa: BLE001 - a converter that needs the real shape: leave the name alone
                continue
            if len(reverted) != 1 or reverted[0] == weight or reverted[0] not in self.names:
                continue
            new = reverted[0]
            if suffix.startswith(".") and not new.endswith(".weight"):
                return None  # the hub names this weight as a bare parameter: no module to hang scales on
            new = (new[: -len(".weight")] + suffix) if suffix.startswith(".") else new + suffix
            if _DIGITS.findall(new) != numbers:
                return None  # a rename that moves numbers around: not a shape we can reuse
            return _DIGITS.sub("#", new)
        return None

    def unknown(self, keys: Iterable[str]) -> list[str]:
        """Keys that are no contract name nor a quantization key of one."""
        return sorted(k for k in keys if self.base(k) is None)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Contract names with no tensor in ``keys``."""
        have = set(keys)
        return sorted(n for n in self.names if n not in have and n not in self.optional)


def _revert(model: nn.Module, state: Mapping) -> dict:
    """transformers' save-time reverse of its conversion mapping (what ``save_pretrained`` names)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(state))


def unplaced_source_keys(model: nn.Module, keys: Iterable[str]) -> list[str]:
    """The source checkpoint's ``keys`` that ``model`` (as transformers builds it; meta is fine) has no
    parameter or buffer for, each resolved through the model's load-time conversion mapping as
    transformers loads it: a hub's MTP head (DeepSeek-V3's ``model.layers.61``), AXK1's
    ``post_mlp_layernorm`` of its dense layers. transformers drops them on load
    (``_keys_to_ignore_on_load_unexpected``) and ``save_pretrained`` never writes them, though the
    engines read them; modelopt 0.48 carries them into its export as they are."""
    import re
    from itertools import chain

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    legacy = dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    placed = {
        n for n, _ in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    }
    prefix = getattr(model, "base_model_prefix", "") or None
    unplaced = []
    for key in keys:
        if key in placed:
            continue
        renamed = key
        for old, new in legacy.items():
            renamed = re.sub(old, new, renamed)
        if rename_source_key(renamed, renamings, converters, prefix, state)[0] not in placed:
            unplaced.append(key)
    return unplaced


def hub_names(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes ``save_pretrained`` writes for ``model`` (unquantized, fused; meta is fine)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {k: tuple(v.shape) for k, v in _revert(model, state).items()}


def build_contract(model: nn.Module, specs: Iterable[Spec]) -> NamingContract:
    """The naming contract of ``model`` (fused, as transformers builds it; the meta device is fine)
    exported with ``specs``. Experts modules no spec covers keep the hub's names."""
    import torch

    names = hub_names(model)
    by_target: dict[str, tuple[Spec, nn.Module]] = {}
    for f in find_fused_params(model, list(specs)):
        if f.spec is not None and f.target_path is not None:
            by_target.setdefault(f.target_path, (f.spec, f.target))
    contract = NamingContract({}, model=model)
    drop: set[str] = set()
    add: dict[str, tuple[int, ...]] = {}
    optional: set[str] = set()
    for path, (spec, module) in by_target.items():
        state = module.state_dict()
        n = resolve_dims(module, spec, path)["num_experts"]
        probe = next(iter(_revert(model, {f"{path}.{_PROBE}": torch.empty(0, device="meta")})))
        hub = probe[: -len(_PROBE) - 1] if probe.endswith("." + _PROBE) else path
        offset, shared = 0, False
        fused_keys: list[str] = []
        fused_shapes: dict[str, tuple[int, ...]] = {}
        hub_expert_keys: list[str] = []
        hub_projections: dict[str, str] = {}
        params = []
        for p in spec.params:
            params.append((p.name, p.into, p.bias))
            for leaf in (p.name, p.bias):
                if leaf is None:
                    continue
                try:
                    reverted = _revert(model, {f"{path}.{leaf}": state[leaf]})
                except Exception as error:  # noqa: BLE001 - a converter that spans modules: revert them together
                    reverted, hub, offset = _revert_shared(model, by_target, path, leaf, names, error)
                    shared = True
                if all(t.dim() == state[leaf].dim() for t in reverted.values()):
                    # fused in the hub too: renamed, transposed, or split into one tensor per projection
                    fused_keys.extend(reverted)
                    fused_shapes.update((k, tuple(t.shape)) for k, t in reverted.items())
                else:  # the hub stores it per expert (a converter split it): those names are the contract's
                    hub_expert_keys.extend(reverted)
                    # the converter's projections, in the order it concatenated them (the spec's ``into``)
                    seen = [m.group(2) for k in reverted if (m := _HUB_EXPERT.match(k[len(hub) + 1 :]))]
                    projections = list(dict.fromkeys(seen))
                    if leaf == p.name and len(projections) == len(p.into):
                        hub_projections.update(zip(p.into, projections))
                    optional.update(
                        k
                        for k in reverted
                        if (m := _EXPERT_INDEX.match(k[len(hub) + 1 :] if k.startswith(hub + ".") else ""))
                        and int(m.group(1)) - offset >= n
                    )
        hub_fused = bool(fused_keys)
        own: list[str]
        if hub_fused and spec.export_layout == "per_expert":
            drop.update(fused_keys)
            own = []
            for p in spec.params:
                pieces = p.layout(n).unfuse(state[p.name])
                for proj, experts in zip(p.into, pieces):
                    for e, w in enumerate(experts):
                        add[f"{hub}.{e}.{proj}.weight"] = tuple(w.shape)
                        own.append(f"{hub}.{e}.{proj}.weight")
                if p.bias:
                    for proj, experts in zip(p.into, p.bias_layout().unfuse(state[p.bias])):
                        for e, b in enumerate(experts):
                            add[f"{hub}.{e}.{proj}.bias"] = tuple(b.shape)
                            own.append(f"{hub}.{e}.{proj}.bias")
        else:
            own = fused_keys + hub_expert_keys
        layout = spec.export_layout if hub_fused else "per_expert"
        biases = {f"{hub}.{p.bias}" for p in spec.params if p.bias}
        weights = tuple(k for k in own if not k.endswith(".bias") and k not in biases and k not in optional)
        alternative = tuple(fused_shapes.items()) if hub_fused and spec.export_layout == "per_expert" else ()
        naming = ExpertsNaming(
            path,
            hub,
            spec.arch,
            n,
            layout,
            hub_fused,
            tuple(params),
            tuple(own),
            weights,
            alternative,
            hub_projections=tuple(hub_projections.items()) if not hub_fused else (),
            expert_offset=offset,
            shares_hub=shared,
        )
        contract.experts[naming.label] = naming
    contract.names = {k: v for k, v in names.items() if k not in drop} | add
    contract.optional = frozenset(optional)
    return contract


def _revert_shared(
    model: nn.Module,
    by_target: Mapping[str, tuple[Spec, nn.Module]],
    path: str,
    leaf: str,
    names: Mapping[str, tuple[int, ...]],
    error: Exception,
) -> tuple[dict, str, int]:
    """The hub tensors of ``{path}.{leaf}`` where transformers reverts it only together with the
    same leaf of the other experts modules of its decoder layer (Ernie 4.5 VL's converter splits the
    hub's one expert list into text and vision experts): ``(hub key -> meta tensor, the hub's experts
    path, this module's first index in its expert list)``. Each module's experts are tagged by value
    and reverted at width 1 past the first two dims (the converters stack, split and concatenate
    there), so the hub keys each expert lands in are read off the result. Raises ``error`` (the
    single-module revert's) when that does not name every tensor as one expert of one module."""
    import torch

    first = _DIGITS.search(path)
    layer = path[: first.end()] + "." if first else ""
    group = [
        p for p, (_, m) in by_target.items() if p.startswith(layer) and isinstance(getattr(m, leaf, None), torch.Tensor)
    ]
    width = 1 << 20  # tag = module index * width + expert index
    inputs = {}
    for j, p in enumerate(group):
        t = getattr(by_target[p][1], leaf)
        if t.dim() < 2:
            raise error
        # real values, on the CPU even under a meta default device
        tag = torch.arange(t.shape[0], dtype=torch.float64, device="cpu") + j * width
        shape = (*t.shape[:2], *([1] * (t.dim() - 2)))
        inputs[f"{p}.{leaf}"] = tag.view(-1, *([1] * (t.dim() - 1))).expand(shape).clone()
    try:
        reverted = _revert(model, inputs)
    except Exception:  # noqa: BLE001 - not reversible together either: the single module's error says why
        raise error from None
    mine: dict[str, torch.Tensor] = {}
    hubs, offsets = set(), set()
    for key, t in reverted.items():
        values = t.unique()
        m = _IN_MEMORY_EXPERT.match(key)
        if values.numel() != 1 or m is None or key not in names:
            raise error
        j, e = divmod(int(values.item()), width)
        if group[j] == path:
            mine[key] = torch.empty(names[key], device="meta")
            hubs.add(m.group(1))
            offsets.add(int(m.group(2)) - e)
    if len(hubs) != 1 or len(offsets) != 1:
        raise error
    return mine, hubs.pop(), offsets.pop()


def meta_model_from_config(config_dict: dict, path: str | None = None) -> nn.Module | None:
    """The model config.json describes, on the meta device (no weights), or None when the
    installed transformers cannot build it."""
    import torch
    import transformers

    cls = transformers_class(config_dict.get("architectures") or [], config_dict.get("model_type"))
    if cls is None:
        return None
    try:
        config = (
            transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            if path
            else cls.config_class(**config_dict)
        )
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            return cls._from_config(config)
    except MoeUnfuseError:  # a bound the caller set on what may be built (checkpoint_input.parameter_budget)
        raise
    except Exception:  # noqa: BLE001 - an unbuildable config only means no contract; the caller says so
        return None


def model_contract(model: nn.Module, specs: Iterable[Spec]) -> NamingContract:
    """The naming contract of ``model``, computed from its class and config on the meta device (the
    live model may be unfused and quantized; the contract is about the model as transformers builds
    it), with its linears mapped to the hub (:meth:`NamingContract.map_linears`)."""
    import copy

    import torch

    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        fresh = type(model)._from_config(config)
    contract = build_contract(fresh, specs)
    contract.map_linears(fresh)
    return contract
