"""The non-standard layouts (catalog kinds B-I, MuseSpark's post-expert norm) beyond the golden test
every spec gets in ``test_golden.py``.

* Whole tiny models quantized through ``register`` + ``mtq.quantize``, for the families modelopt 0.47
  quantizes wrongly or not at all on its own (Aria and OpenAI Privacy Filter: claimed, nothing
  quantized; DBRX: wrong wrapper; LongCat, JetMoE, Inkling shared experts: no quantizers), plus the
  two whose explicit modelopt registrations ``register`` replaces (GPT-OSS, Llama 4).
* The numerics the specs declare, each shown to be needed: the bias added after the matmul, fp32
  compute and accumulation, gating the stacked experts of a batched original.
* Layout variants a single golden config does not cover: NemotronH with ``moe_latent_size``, LongCat's
  identity experts and unused rows, DBRX's detached ``mlp``.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from helpers import arch_param
from torch import nn

import moe_unfuse
from moe_unfuse.core.coverage import uncovered_expert_params
from moe_unfuse.core.experts import UnfusedExpertsMixin
from moe_unfuse.core.plan import REST_PREFIX, resolve_dims
from moe_unfuse.spec.model import Spec
from moe_unfuse.tools import golden


def run_exact(spec: Spec, dtype: torch.dtype, inputs: Callable[[nn.Module], tuple] | None = None) -> tuple[bool, float]:
    """(unfused forward == original eager forward, max|diff|) on the spec's golden module."""
    module = golden.build_experts(spec, dtype)
    args = inputs(module) if inputs else golden.make_inputs(module, spec)[0]
    with torch.no_grad(), golden.implementation(module, "eager"):
        expected = module(*args)
    moe_unfuse.unfuse(module, spec)
    with torch.no_grad():
        got = module(*args)
    return torch.equal(got, expected), (got.float() - expected.float()).abs().max().item()


# --- whole models through register + mtq.quantize ------------------------------------------------

INKLING_MODEL = {
    "class": "transformers.InklingForCausalLM",
    "config": "transformers.InklingTextConfig",
    "config_kwargs": {
        "hidden_size": 64,
        "intermediate_size": 40,
        "moe_intermediate_size": 40,
        "n_routed_experts": 4,
        "n_shared_experts": 2,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 128,
        "max_position_embeddings": 128,
    },
}
WHOLE_MODELS = {  # family -> the model (None: the first arch's golden.model)
    "aria": None,
    "openai_privacy_filter": None,
    "dbrx": None,
    "longcat_flash": None,
    "jetmoe": None,
    "inkling_shared": INKLING_MODEL,
    "gpt_oss": None,
    "llama4": None,
}
WHOLE_MODEL_PARAMS = [
    arch_param("inkling_shared", "inkling") if f == "inkling_shared" else arch_param(f) for f in WHOLE_MODELS
]


def modelopt_expert_wrappers() -> tuple[type, ...]:
    """modelopt's own fused-experts wrappers: none of them may appear once ``register`` ran."""
    from modelopt.torch.quantization.plugins import huggingface as hf

    names = (
        "_QuantFusedExperts",
        "_QuantDbrxExperts",
        "_QuantDbrxExpertGLU",
        "_QuantLlama4TextExperts",
        "_QuantGptOssExperts",
    )
    return tuple(getattr(hf, n) for n in names if hasattr(hf, n))


@pytest.mark.parametrize("archs", WHOLE_MODEL_PARAMS)
def test_whole_model_quantized_by_register(archs, tiny_model):
    """Every expert projection of every layer becomes a calibrated QuantLinear; modelopt's own
    wrappers appear nowhere (DBRX's DbrxExpertGLU is detached before modelopt could wrap it);
    quantizers off leaves the logits bit-identical, the experts' quantizers alone change them."""
    import modelopt.torch.quantization as mtq

    specs = [moe_unfuse.get_spec(a) for a in archs]
    model = tiny_model(WHOLE_MODELS[archs[0]] or archs[0])
    targets = [path for path, m in model.named_modules() if any(s.matches(m) for s in specs)]
    assert all(any(s.matches(m) for m in model.modules()) for s in specs)
    vocab = model.config.get_text_config().vocab_size
    batches = [torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        expected = model(input_ids=batches[0]).logits

    for spec in specs:
        moe_unfuse.register(spec)
    mtq.quantize(model, copy.deepcopy(mtq.FP8_DEFAULT_CFG), forward_loop=lambda m: [m(input_ids=b) for b in batches])

    modules = dict(model.named_modules())
    assert all(isinstance(modules[p], UnfusedExpertsMixin) for p in targets)
    assert not uncovered_expert_params(model)
    from transformers.models.dbrx.modeling_dbrx import DbrxExpertGLU

    foreign = [n for n, m in modules.items() if isinstance(m, (*modelopt_expert_wrappers(), DbrxExpertGLU))]
    assert not foreign, f"modelopt's own wrappers or fused modules left: {foreign}"
    linears, missing = [], []
    for path in targets:
        unfused = modules[path]
        for e, expert in enumerate(unfused):
            for proj in unfused._moe_unfuse.spec.projection_names():
                lin = getattr(expert, proj)
                linears.append(lin)
                missing += [
                    f"{path}.{e}.{proj}.{q}"
                    for q in ("weight_quantizer", "input_quantizer")
                    if getattr(getattr(lin, q, None), "amax", None) is None
                ]
    assert linears and not missing, f"uncalibrated: {missing[:6]}"

    mtq.disable_quantizer(model, "*")
    with torch.no_grad():
        assert torch.equal(model(input_ids=batches[0]).logits, expected)
    for lin in linears:
        lin.weight_quantizer.enable()
        lin.input_quantizer.enable()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=batches[0]).logits, expected), (
            "the experts' quantizers do not act in the forward"
        )


# --- declared numerics, each needed ------------------------------------------------------------------


@pytest.mark.arch("gpt_oss")
def test_gpt_oss_needs_bias_after_matmul(mutated_spec):
    """GPT-OSS writes ``x @ W + b``; F.linear(x, W, b) is one addmm that rounds the sum once (bf16)."""
    assert run_exact(moe_unfuse.get_spec("gpt_oss"), torch.bfloat16)[0]
    fused_bias = mutated_spec.parse("gpt_oss", lambda r: r.pop("linear"))
    ok, diff = run_exact(fused_bias, torch.bfloat16)
    assert not ok and diff > 0


@pytest.mark.arch("openai_privacy_filter")
@pytest.mark.parametrize("drop", ["compute_dtype", "accumulate"])
def test_openai_privacy_filter_needs_fp32_compute_and_accumulation(mutated_spec, drop):
    """bf16 weights, fp32 projections and fp32 sum over experts, as the original; either missing differs."""
    assert run_exact(moe_unfuse.get_spec("openai_privacy_filter"), torch.bfloat16)[0]
    edit = (
        (lambda r: r["linear"].pop("compute_dtype"))
        if drop == "compute_dtype"
        else (lambda r: r["forward"].pop("accumulate"))
    )
    ok, _ = run_exact(mutated_spec.parse("openai_privacy_filter", edit), torch.bfloat16)
    assert not ok


@pytest.mark.arch("nemotron_h")
def test_nemotron_h_accumulates_in_routing_weights_dtype(mutated_spec):
    """NemotronH's router yields fp32 weights for bf16 hidden states; the sum runs in fp32, then casts back."""

    def inputs(module):
        (hidden, index, weights), _ = golden.make_inputs(module, moe_unfuse.get_spec("nemotron_h"))
        return hidden, index, weights.float()

    assert run_exact(moe_unfuse.get_spec("nemotron_h"), torch.bfloat16, inputs)[0]
    assert not run_exact(
        mutated_spec.parse("nemotron_h", lambda r: r["forward"].pop("accumulate")), torch.bfloat16, inputs
    )[0]


@pytest.mark.arch("muse_spark")
def test_muse_spark_needs_post_expert_norm(mutated_spec):
    """The shared norm runs on each expert's output (before the routing weight), and only once."""
    spec = moe_unfuse.get_spec("muse_spark")
    module = golden.build_experts(spec)
    calls = []
    module.post_expert_norm.register_forward_hook(lambda *a: calls.append(1))
    (hidden, index, weights), _ = golden.make_inputs(module, spec)
    moe_unfuse.unfuse(module, spec)
    with torch.no_grad():
        module(hidden, index, weights)
    assert len(calls) == len(module) and module.post_expert_norm not in list(module[0].modules())
    assert run_exact(spec, torch.float32)[0]
    assert not run_exact(mutated_spec.parse("muse_spark", lambda r: r.pop("post_expert_norm")), torch.float32)[0]


@pytest.mark.parametrize("archs", [arch_param("llama4"), arch_param("inkling_shared")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batched_originals_exact_for_every_token_count(archs, dtype):
    """Llama 4 and Inkling run one torch.bmm over all experts; the unfused forward runs each expert's
    linears alone (each with its own quantizers) and gates the stacked outputs, so the element-wise
    gate sees the original's layout (a per-expert gate differs where a vectorized tail falls).

    Run single-threaded: there, every token count 1..24 is bit-exact. With more threads, MKL splits a
    lone small-M fp32 sgemm (5-7 and 9-11 rows at K=64, N=80 on this machine) across threads and
    rounds differently from torch.bmm, which computes each batch matrix on one thread; a per-expert
    GEMM cannot be made to match that without running all experts in one bmm, i.e. without
    per-expert quantizers. bf16 (oneDNN) and larger token counts agree at any thread count; the
    golden test (12 and 48 tokens per expert) runs at the default thread count.
    """
    spec = moe_unfuse.get_spec(archs[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bad = []
        for tokens in range(1, 25):

            def inputs(module, tokens=tokens):
                gen = torch.Generator().manual_seed(tokens)
                num_experts = resolve_dims(module, spec, "")["num_experts"]
                rows = tokens * num_experts if spec.forward_kind == "pre_grouped_bmm" else tokens
                hidden = torch.randn(rows, golden.input_dim(module, spec), generator=gen).to(dtype)
                if spec.forward_kind == "pre_grouped_bmm":
                    return (hidden,)
                return hidden, torch.rand(tokens, num_experts, generator=gen).to(dtype)

            ok, diff = run_exact(spec, dtype, inputs)
            if not ok:
                bad.append((tokens, diff))
    finally:
        torch.set_num_threads(threads)
    assert not bad, f"not exact at (tokens, max|diff|): {bad}"


# --- layout variants -------------------------------------------------------------------------------


@pytest.mark.arch("nemotron_h")
def test_nemotron_h_with_latent_size(mutated_spec):
    """With moe_latent_size the experts take the latent width (48), not hidden_size (64)."""
    spec = mutated_spec.parse("nemotron_h", lambda r: r["golden"]["config_kwargs"].update(moe_latent_size=48))
    module = golden.build_experts(spec)
    assert module.up_proj.shape[-1] == 48 and module.hidden_dim == 64
    results = [
        golden.check_exact(spec, torch.float32),
        golden.check_exact(spec, torch.bfloat16),
        *golden.check_fuse(spec),
        *golden.check_modelopt(spec),
    ]
    assert all(r.ok for r in results), [f"{r.name}: {r.detail}" for r in results if not r.ok]


@pytest.mark.arch("longcat_flash")
def test_longcat_identity_experts_and_unused_rows():
    """Routing reaches the zero (identity) experts; their gate_up_proj rows are no parameter while
    unfused, survive refuse bit for bit, also when the expert views were replaced by copies."""
    spec = moe_unfuse.get_spec("longcat_flash")
    module = golden.build_experts(spec)
    (hidden, index, weights), _ = golden.make_inputs(module, spec)
    assert index.max().item() >= module.num_routed_experts  # identity experts are exercised
    fused = module.gate_up_proj.detach().clone()
    moe_unfuse.unfuse(module, spec)
    assert len(module) == module.num_routed_experts
    assert not any("gate_up_proj" in k for k in module.state_dict())
    rest = module._buffers[REST_PREFIX + "gate_up_proj"]
    assert torch.equal(rest, fused[module.num_routed_experts :]) and rest.data_ptr() != 0
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone()
    moe_unfuse.fuse(module)
    assert torch.equal(module.gate_up_proj, fused) and REST_PREFIX + "gate_up_proj" not in module._buffers


@pytest.mark.arch("dbrx")
def test_dbrx_mlp_detached_while_unfused():
    """The emptied DbrxExpertGLU is out of the module tree while unfused (still readable as
    ``experts.mlp``) and a child again, the same object, after refuse."""
    spec = moe_unfuse.get_spec("dbrx")
    module = golden.build_experts(spec)
    mlp = module.mlp
    before = {k: v.clone() for k, v in module.state_dict().items()}
    moe_unfuse.unfuse(module, spec)
    assert "mlp" not in module._modules and not any(k.startswith("mlp.") for k in module.state_dict())
    assert module.mlp is mlp and all(m is not mlp for m in module.modules())
    assert sorted(module.state_dict()) == sorted(
        f"{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")
    )
    assert module[1].gate_proj.weight.shape == (40, 64) and module[1].down_proj.weight.shape == (64, 40)
    moe_unfuse.fuse(module)
    assert module.mlp is mlp and all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.arch("dbrx")
def test_dbrx_unfused_before_mtq_quantize(tiny_model):
    """Unfusing first, then plain ``mtq.quantize`` (no register): modelopt's DBRX hook, which reads
    ``experts.mlp``, still runs, and every expert projection is calibrated."""
    import modelopt.torch.quantization as mtq

    model = tiny_model("dbrx")
    moe_unfuse.unfuse(model, "dbrx")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    mtq.quantize(model, copy.deepcopy(mtq.FP8_DEFAULT_CFG), forward_loop=lambda m: m(input_ids=ids))
    experts = [m for m in model.modules() if isinstance(m, UnfusedExpertsMixin)]
    assert len(experts) == 2
    assert all(
        getattr(x, p).input_quantizer.amax is not None
        for m in experts
        for x in m
        for p in ("gate_proj", "up_proj", "down_proj")
    )


@pytest.mark.arch("jetmoe")
def test_jetmoe_experts_are_single_linears_and_skip_empty_experts():
    """One linear per expert; an expert with no tokens is not run (nothing to calibrate on) yet the
    output equals the original's, which runs F.linear on the empty slice."""
    spec = moe_unfuse.get_spec("jetmoe")
    module = golden.build_experts(spec)
    inputs = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    sizes = [3, 0, 7, 0]
    with torch.no_grad():
        expected = module(inputs, sizes)
        moe_unfuse.unfuse(module, spec)
        calls = []
        module[1].linear.register_forward_hook(lambda *a: calls.append(1))
        got = module(inputs, sizes)
    assert torch.equal(got, expected) and not calls
    assert isinstance(module[0].linear, nn.Linear) and module[0].linear.weight.shape == (80, 64)
