"""The ``routed`` forward: the transformers eager token loop, over per-expert child modules.

It repeats the original's operations in the original order (one-hot mask, experts ascending,
``index_add_`` in the output dtype), so with quantizers off it is bit-identical on CPU.
"""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl


def routed_forward(module, *args, **kwargs) -> torch.Tensor:
    state = module._moe_unfuse
    bound = state.bind(args, kwargs)
    hidden_states, top_k_index, top_k_weights = bound["hidden_states"], bound["top_k_index"], bound["top_k_weights"]
    num_experts = state.num_experts
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        # num_experts + 1 classes: expert-parallel sentinels (index == num_experts) are skipped.
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in expert_hit:
        if e == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        out = module._modules[str(e)](hidden_states[token_idx])
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


@hookimpl
def register_forwards(register):
    register("routed", routed_forward)
