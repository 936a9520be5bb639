"""The ``routed`` forward: the transformers eager token loop, over per-expert child modules.

It repeats the original's operations in the original order (one-hot mask, experts ascending,
``index_add_`` in the accumulation dtype), so with quantizers off it is bit-identical on CPU.
Options cover the loop's variants: zero-compute identity experts (Longcat), the accumulation dtype
(fp32 in OpenAI Privacy Filter, the routing weights' dtype in NemotronH) and DBRX's
``[batch, -1, H]`` output view; a ``post_expert_norm`` (MuseSpark) runs on each expert's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..plugin import ForwardKind, SpecError, eval_shape_expr, hookimpl

if TYPE_CHECKING:
    import torch

# torch and the unfused module's API are imported inside each function: registering the kind (every
# ``moe-unfuse`` command, ``list`` and ``--help`` included, loads the plugins) imports neither.

_ACCUMULATE = ("input", "float32", "top_k_weights")


def routed_forward(module, *args, **kwargs) -> torch.Tensor:
    import torch

    from ..plugin import post_expert_norm, unfuse_state

    state = unfuse_state(module)
    opts = state.spec.forward_options
    bound = state.bind(args, kwargs)
    hidden_states, top_k_index, top_k_weights = bound["hidden_states"], bound["top_k_index"], bound["top_k_weights"]
    input_shape, input_dtype = hidden_states.shape, hidden_states.dtype
    batch_first = opts.get("tokens") == "batch_first"
    if batch_first:
        hidden_states = hidden_states.reshape(-1, input_shape[-1])
    accumulate = opts.get("accumulate", "input")
    acc_dtype = (
        torch.float32
        if accumulate == "float32"
        else top_k_weights.dtype
        if accumulate == "top_k_weights"
        else input_dtype
    )
    final = torch.zeros_like(hidden_states, dtype=acc_dtype)
    num_experts = state.num_experts
    num_ids = num_experts + state.extra.get("forward", {}).get("identity_experts", 0)
    norm = post_expert_norm(module)
    with torch.no_grad():
        # num_ids + 1 classes: expert-parallel sentinels (index == num_ids) are skipped.
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=num_ids + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in expert_hit:
        if e == num_ids:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        out = hidden_states[token_idx]
        if e < num_experts:  # ids after the real experts are identity experts: tokens pass unchanged
            out = module._modules[str(e)](out)
            if norm is not None:
                out = norm(out)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    if batch_first:
        final = final.view(input_shape[0], -1, input_shape[-1])
    return final.to(input_dtype)


def _prepare(module, spec, dims: dict[str, int]) -> dict[str, Any]:
    """Resolve ``identity_experts`` against the module's dims once, at plan time."""

    expr = spec.forward_options.get("identity_experts")
    count = eval_shape_expr(expr, dims) if expr is not None else 0
    if count < 0:
        raise SpecError(spec.source, "forward.identity_experts", f"evaluates to {count}", "give a count >= 0")
    return {"identity_experts": count}


def _golden_inputs(module, spec, values: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """With identity experts, route over real and identity ids alike, every id hit at least once."""
    import torch

    from ..plugin import resolve_dims

    dims = resolve_dims(module, spec, "")
    count = _prepare(module, spec, dims)["identity_experts"]
    if not count:
        return {}
    tokens, top_k = values["top_k_index"].shape
    num_ids = dims["num_experts"] + count
    scores = torch.rand(tokens, num_ids, generator=generator)
    scores[torch.arange(tokens), torch.arange(tokens) % num_ids] += 2.0
    weights, index = scores.topk(top_k, dim=-1)
    return {"top_k_index": index, "top_k_weights": torch.softmax(weights, -1).to(values["top_k_weights"].dtype)}


ROUTED = ForwardKind(
    forward=routed_forward,
    roles=("hidden_states", "top_k_index", "top_k_weights"),
    options={
        "identity_experts": "how many zero-compute experts follow the real ones (dims expression); their ids pass tokens through",
        "accumulate": f"dtype the outputs are summed in: {', '.join(_ACCUMULATE)}",
        "tokens": "flat ([tokens, H], default) or batch_first (flatten leading dims, output viewed [batch, -1, H])",
    },
    golden_inputs=_golden_inputs,
    prepare=_prepare,
)


@hookimpl
def register_forwards(register):
    register("routed", ROUTED)
