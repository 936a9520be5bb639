"""Re-stacking an experts module's exported per-expert tensors into the hub's fused tensors.

- experts whose spec declares ``export.layout: fused`` (GPT-OSS) are re-stacked into the hub's fused
  tensors through the spec's layout reverse, quantized weights and per-block scales alike, with
  modelopt's fused-tensor scale names (``{param}_weight_scale`` ...);
- ``--fuse-unquantized``: experts left unquantized whose hub checkpoint is fused are written back
  in that fused layout (``Layout.refuse``), so ``from_pretrained`` loads them into an identical model.

:func:`plan_restacks` picks the modules from the quantized model, :func:`restack_tensors` builds one
module's fused tensors from the per-expert ones (read back from the export, or from a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..base.errors import MoeUnfuseError
from ..base.layout import Narrow
from ..core.experts import unfuse_state, unfused_experts
from ..hub.checkpoint import STACKED_SCALES
from ..hub.naming import ExpertsNaming, NamingContract
from ..spec.model import Spec

# ----------------------------------------------------------------------------------------------
# which experts modules are re-stacked into fused tensors


def _is_quantized(linear: nn.Module) -> bool:
    q = getattr(linear, "weight_quantizer", None)
    return q is not None and bool(getattr(q, "is_enabled", False))


@dataclass
class Restack:
    """An experts module written in its hub's fused layout: ``quantized`` ones because the spec's
    export layout is fused, unquantized ones for ``--fuse-unquantized``."""

    naming: ExpertsNaming
    spec: Spec
    quantized: bool
    to_hub: Callable[[dict], dict]  # in-memory fused tensors -> the hub's names and layout
    hub_key: Callable[[str], str]  # an in-memory per-expert key -> the name the export wrote it under
    rests: dict[str, torch.Tensor] = field(default_factory=dict)  # rows a Narrow layout set aside


def plan_restacks(
    model: nn.Module, contract: NamingContract, fuse_unquantized: bool
) -> tuple[list[Restack], list[str]]:
    """(restacks, skipped): experts modules to write fused, and why others that asked could not be."""

    by_module = {e.module: e for e in contract.experts.values()}
    targets, skipped = [], []
    for path, module in unfused_experts(model):
        st = unfuse_state(module)
        naming = by_module.get(path)
        has_rest = any(isinstance(op, Narrow) for p in st.spec.params for op in p.layout(st.num_experts).prepare)
        if naming is None or not naming.hub_fused and not has_rest:
            continue  # stored per expert in the hub: the per-expert keys are its names
        linears = [getattr(expert, proj, None) for expert in module for proj in st.spec.projection_names()]
        if any(lin is None for lin in linears):
            if naming.layout == "fused" or fuse_unquantized:
                skipped.append(f"{path} (not a gate/up/down expert)")
            continue
        quantized = [_is_quantized(lin) for lin in linears]
        if any(quantized) and not all(quantized):
            skipped.append(f"{path} (partly quantized)")
            continue
        if all(quantized) and naming.layout != "fused":
            continue
        if not all(quantized) and not (fuse_unquantized or naming.layout == "fused" or not naming.hub_fused):
            continue  # (unquantized per-expert hub names with rows set aside: written with those rows, so it reloads)
        target = Restack(naming, st.spec, all(quantized), contract.to_hub, contract.hub_key)
        ok = True
        for p in st.spec.params:
            layout = p.layout(st.num_experts)
            if p.packing == "separate":
                ok = False
            elif any(isinstance(op, Narrow) for op in layout.prepare):
                rest = layout.rest(st.originals[p.name])
                if target.quantized or rest is None or rest.device.type == "meta":
                    ok = False
                else:
                    target.rests[p.name] = rest.detach().clone()
        if ok:
            targets.append(target)
        elif naming.layout == "fused":
            raise MoeUnfuseError(
                f"{st.spec.source}: export.layout: fused, but {path}'s layout has no single-tensor reverse; fix: use export.layout: per_expert"
            )
        else:
            skipped.append(f"{path} (layout has no single-tensor reverse)")
    return targets, skipped


def _stack_scalars(values: list[list[torch.Tensor]], name: str) -> torch.Tensor:
    """One 0-d scale when every expert and projection agrees, else one per expert ``[E]`` when the
    projections of each expert agree (gate and up share one fused row block)."""
    flat = [v.reshape(()) for row in values for v in row]
    if all(torch.equal(v, flat[0]) for v in flat):
        return flat[0].clone()
    per_expert = values[0]
    if all(torch.equal(a.reshape(()), b.reshape(())) for row in values[1:] for a, b in zip(per_expert, row)):
        return torch.stack([v.reshape(()) for v in per_expert])
    raise MoeUnfuseError(
        f"{name}: the projections stacked into one fused tensor have different scales; fix: quantize with moe_unfuse.quantize_model, which shares them"
    )


def restack_tensors(
    target: Restack, get: Callable[[str], torch.Tensor], has: Callable[[str], bool]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The fused tensors of ``target`` from its exported per-expert tensors; and the keys used."""
    naming, n = target.naming, target.naming.num_experts
    fused: dict[str, torch.Tensor] = {}
    used: list[str] = []

    def keys(into: Sequence[str], leaf: str) -> list[list[str]]:
        if naming.hub_fused:
            return [[naming.per_expert_key(e, proj, leaf) for e in range(n)] for proj in into]
        return [[target.hub_key(f"{naming.module}.{e}.{proj}.{leaf}") for e in range(n)] for proj in into]

    def hub_tensors(leaf: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """One in-memory fused tensor under the hub's names and layout (several per-expert tensors
        where the hub stores it per expert); a quantized one must keep its fused name."""
        converted = target.to_hub({f"{naming.module}.{leaf}": tensor})
        if target.quantized and list(converted) != [f"{naming.hub}.{leaf}"]:
            raise MoeUnfuseError(
                f"{target.spec.source}: export.layout: fused, but the hub stores {naming.module}.{leaf} as {', '.join(converted)}; fix: use export.layout: per_expert"
            )
        return converted

    for p in target.spec.params:
        layout = p.layout(n)
        wkeys = keys(p.into, "weight")
        pieces = [[get(k) for k in row] for row in wkeys]
        rest = target.rests.get(p.name)
        weights = hub_tensors(p.name, layout.refuse(pieces, rest) if rest is not None else layout.refuse(pieces))
        fused.update(weights)
        used.extend(k for row in wkeys for k in row)
        for scale in STACKED_SCALES if target.quantized else ():
            skeys = keys(p.into, scale)
            present = [has(k) for row in skeys for k in row]
            if not any(present):
                continue
            name = f"{next(iter(weights))}_{scale}"
            if not all(present):
                raise MoeUnfuseError(
                    f"{name}: some experts have no {scale}; fix: calibrate every expert (--force-routing)"
                )
            values = [[get(k) for k in row] for row in skeys]
            fused[name] = layout.refuse(values) if values[0][0].dim() >= 2 else _stack_scalars(values, name)
            used.extend(k for row in skeys for k in row)
        if p.bias:
            bkeys = keys(p.into, "bias")
            fused.update(hub_tensors(p.bias, p.bias_layout().refuse([[get(k) for k in row] for row in bkeys])))
            used.extend(k for row in bkeys for k in row)
    return fused, used
