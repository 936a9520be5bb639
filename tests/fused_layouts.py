"""Two fused expert layouts that exist in no library, for the infer and spec-from-YAML tests.

Both take plain integers (no config) and name their parameters in no transformers convention:
``W13Experts`` keeps gate and up concatenated in ``w13 [E, 2I, H]`` with biases ``b13 [E, 2I]``
and ``w2 [E, H, I]``/``b2 [E, H]``; ``PackedTransposedExperts`` stores ``wi [E, H, 2I]``
transposed and ``wo [E, I, H]``, and keeps no attribute holding the intermediate size.
"""

from __future__ import annotations

import torch
from torch import nn


def _route(hidden_states: torch.Tensor, top_k_index: torch.Tensor, num_experts: int):
    mask = nn.functional.one_hot(top_k_index, num_classes=num_experts).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
        pos, tok = torch.where(mask[e])
        yield e, pos, tok


class W13Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.b13 = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.b2 = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        for e, pos, tok in _route(hidden_states, top_k_index, self.num_experts):
            gate, up = nn.functional.linear(hidden_states[tok], self.w13[e], self.b13[e]).chunk(2, dim=-1)
            out = nn.functional.linear(self.act_fn(gate) * up, self.w2[e], self.b2[e])
            final.index_add_(0, tok, (out * top_k_weights[tok, pos, None]).to(final.dtype))
        return final


class PackedTransposedExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, ffn_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.wi = nn.Parameter(torch.empty(n_experts, d_model, 2 * ffn_dim))
        self.wo = nn.Parameter(torch.empty(n_experts, ffn_dim, d_model))
        self.act_fn = nn.GELU()

    def forward(self, x, idx, w):
        final = torch.zeros_like(x)
        for e, pos, tok in _route(x, idx, self.n_experts):
            gate, up = (x[tok] @ self.wi[e]).chunk(2, dim=-1)
            out = (self.act_fn(gate) * up) @ self.wo[e]
            final.index_add_(0, tok, (out * w[tok, pos, None]).to(final.dtype))
        return final
