"""Forward kinds beyond the routed token loop, each repeating its original's operations in order.

* ``pre_grouped_bmm`` (Llama 4): the caller repeats and scales every token for every expert, so
  ``hidden_states`` is ``[E * T, H]`` grouped by expert; the original runs one ``torch.bmm`` over
  ``[E, T, H]``, here expert ``e`` runs on group ``e`` and the outputs are stacked back.
* ``expert_bank`` (JetMoE ``ParallelExperts``): one projection per expert over inputs already
  sorted by expert and split by ``expert_sizes``; outputs concatenated in expert order.
* ``dense_shared`` (Inkling shared experts): every expert on every token; expert ``e``'s hidden is
  scaled by the token's ``gammas[:, e]`` before its down projection, and the outputs are summed over
  experts in fp32.

The batched kinds run every projection per expert, through the expert's own linears (so each has
its own quantizers), but gate all experts' projections stacked, as the original's bmm output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..plugin import ForwardKind, hookimpl

if TYPE_CHECKING:
    import torch

# torch and the unfused module's API are imported inside each function: registering the kinds (every
# ``moe-unfuse`` command, ``list`` and ``--help`` included, loads the plugins) imports neither.


def _experts(module) -> list:
    from ..plugin import unfuse_state

    return [module._modules[str(e)] for e in range(unfuse_state(module).num_experts)]


def _down_all(module, experts: list, hidden: torch.Tensor) -> torch.Tensor:
    """Each expert's down projection on its slice of ``hidden`` [E, T, I], stacked to [E, T, out]."""
    import torch

    from ..plugin import post_expert_norm

    norm = post_expert_norm(module)
    outs = []
    for e, expert in enumerate(experts):
        out = expert.down_proj(hidden[e])
        outs.append(norm(out) if norm is not None else out)
    return torch.stack(outs)


def pre_grouped_bmm_forward(module, *args, **kwargs) -> torch.Tensor:
    from ..plugin import stack_packed, unfuse_state

    state = unfuse_state(module)
    hidden_states = state.bind(args, kwargs)["hidden_states"]
    grouped = hidden_states.view(state.num_experts, -1, hidden_states.shape[-1])
    experts = _experts(module)
    # Every projection runs per expert (own quantizers); the gate runs once on all experts stacked,
    # the layout of the original's bmm output (see stack_packed).
    packed = stack_packed([expert.packed(grouped[e]) for e, expert in enumerate(experts)])
    out = _down_all(module, experts, experts[0].gate(packed))
    return out.view(-1, out.shape[-1])


def expert_bank_forward(module, *args, **kwargs) -> torch.Tensor:
    import torch

    from ..plugin import unfuse_state

    state = unfuse_state(module)
    bound = state.bind(args, kwargs)
    inputs, sizes = bound["hidden_states"], bound["expert_sizes"]
    pieces = inputs.split(sizes, dim=0)
    # An expert with no tokens is skipped (its empty output adds nothing to the concatenation),
    # so a quantizer never calibrates on an empty tensor.
    outs = [module._modules[str(e)](pieces[e]) for e in range(state.num_experts) if pieces[e].shape[0]]
    if not outs:
        linear = module._modules["0"].linear
        return inputs.new_empty((0, linear.out_features))
    return torch.cat(outs, dim=0)


def dense_shared_forward(module, *args, **kwargs) -> torch.Tensor:
    from ..plugin import stack_packed, unfuse_state

    state = unfuse_state(module)
    bound = state.bind(args, kwargs)
    hidden_states, gammas = bound["hidden_states"], bound["gammas"]
    input_shape = hidden_states.shape
    x = hidden_states.reshape(-1, input_shape[-1])
    gammas = gammas.reshape(-1, state.num_experts, 1).transpose(0, 1)
    experts = _experts(module)
    packed = stack_packed([expert.packed(x) for expert in experts])
    activated = experts[0].gate(packed) * gammas
    return _down_all(module, experts, activated).float().sum(dim=0).to(hidden_states.dtype).view(input_shape)


def _bank_inputs(module, spec, values: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """Tokens per expert from the golden routing's first choice (every expert has some)."""
    import torch

    from ..plugin import resolve_dims

    num_experts = resolve_dims(module, spec, "")["num_experts"]
    return {"expert_sizes": torch.bincount(values["top_k_index"][:, 0], minlength=num_experts).tolist()}


def _shared_inputs(module, spec, values: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """Per-token mixing weights ``[tokens, num_experts]``, like Inkling's router's shared gammas."""
    import torch

    from ..plugin import resolve_dims

    num_experts = resolve_dims(module, spec, "")["num_experts"]
    gammas = torch.rand(values["hidden_states"].shape[0], num_experts, generator=generator)
    return {"gammas": gammas.to(values["hidden_states"].dtype)}


PRE_GROUPED_BMM = ForwardKind(forward=pre_grouped_bmm_forward, roles=("hidden_states",))
EXPERT_BANK = ForwardKind(
    forward=expert_bank_forward, roles=("hidden_states", "expert_sizes"), expert="linear", golden_inputs=_bank_inputs
)
DENSE_SHARED = ForwardKind(
    forward=dense_shared_forward, roles=("hidden_states", "gammas"), golden_inputs=_shared_inputs
)


@hookimpl
def register_forwards(register):
    register("pre_grouped_bmm", PRE_GROUPED_BMM)
    register("expert_bank", EXPERT_BANK)
    register("dense_shared", DENSE_SHARED)
