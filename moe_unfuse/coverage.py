"""Find fused expert parameters in a model, so none can be skipped silently."""

from __future__ import annotations

from typing import Iterator

from torch import nn

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_shared_experts", "num_routed_experts", "total_experts")


def looks_like_experts(module: nn.Module) -> bool:
    """A module that owns experts: an expert-count attribute or 'Expert' in its class name."""
    return "expert" in type(module).__name__.lower() or any(isinstance(getattr(module, a, None), int) for a in EXPERT_COUNT_ATTRS)


def fused_expert_params(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(parameter path, owning module) for every parameter of 3 or more dims owned by an experts module."""
    for path, module in model.named_modules():
        if not looks_like_experts(module):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 3:
                yield (f"{path}.{name}" if path else name), module


def uncovered_expert_params(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Fused expert parameters still present (before a plan runs, every one of them is uncovered)."""
    return list(fused_expert_params(model))
