"""The built-in serving engines and what each one's loader requires of a checkpoint, as data.

Each rule cites the engine versions and the loader file:line it was read from
(``../shared/reference/engine_contracts.md``); ``verify --engine E`` runs E's rules after the export
contract. ``hf`` (transformers' ``from_pretrained``) reads the hub's names, which the export contract
already checks: it has no rules of its own.
"""

from __future__ import annotations

import fnmatch

from ..plugin import Engine, EngineRule, hookimpl


def per_expert_input_scales_not_0d(ctx) -> list[str]:
    return [
        f"{k} shape {ctx.shape(k)}"
        for k in ctx.keys
        if k.endswith(".input_scale") and ctx.per_expert(k) and ctx.shape(k) != []
    ]


def exclude_patterns_vllm_cannot_match(ctx) -> list[str]:
    return [f"{p} (write {p[:-2]}*)" for p in ctx.excludes if p.endswith(".*")]


def vllm_config_fields(ctx) -> list[str]:
    if ctx.quant_algo is None:
        return []
    bad = []
    qc = ctx.quantization_config or {}
    method = qc.get("quant_method", "")
    if not str(method).startswith("modelopt"):
        bad.append(f"config.json quantization_config.quant_method {method!r} (must start with 'modelopt')")
    if not isinstance(qc.get("ignore"), list):
        bad.append("config.json quantization_config.ignore (missing)")
    if "NVFP4" in ctx.quant_algo.upper():
        q = (ctx.hf_quant_config or {}).get("quantization", {})
        bad.extend(
            f"hf_quant_config.json quantization.{f} (missing)"
            for f in ("group_size", "kv_cache_quant_algo", "exclude_modules")
            if f not in q
        )
    return bad


def moe_prefixed_expert_keys(ctx) -> list[str]:
    return sorted(k for k in ctx.keys if ".moe.experts." in k and ctx.base(k) is None)


def gpt_oss_not_fused(ctx) -> list[str]:
    keys = ctx.keys
    return sorted(
        f"{e.hub} (per-expert keys; vLLM reads only the fused {e.hub}.gate_up_proj)"
        for e in ctx.experts()
        if e.arch == "gpt_oss" and any(k.startswith(e.hub + ".0.") for k in keys)
    )


def engine_cannot_load(ctx) -> list[str]:
    """Quantized experts, or other quantized modules, of a family whose spec says the engine's own
    loader drops or misreads them, and unquantized modules it builds quantized (``export.engines``,
    its ``why`` naming the loader's file:line; for vLLM, seen in its real loader by ``tests_vllm/``)."""
    engine = ctx.engine
    scaled = ctx.scaled_modules()
    experts = ctx.experts()
    bad: dict[str, list[str]] = {}
    for e in experts:
        why = ctx.spec(e.arch).experts_unquantized_for(engine)
        if why and any(m == e.hub or m.startswith(e.hub + ".") for m in scaled):
            bad.setdefault(why, []).append(e.label)
    for arch in sorted({e.arch for e in experts}):
        globs, why = ctx.spec(arch).modules_unquantized_for(engine)
        for m in sorted(scaled):
            if why and any(fnmatch.fnmatch(m, g) for g in globs):
                bad.setdefault(why, []).append(m)
    keys = ctx.keys
    heads = [
        f"{m} unquantized ({why}); fix: export with --engine {engine}"
        for m, why in ctx.quantized_for(engine).items()
        if ctx.quant_algo is not None and m not in scaled and any(k.startswith(m + ".") for k in keys)
    ]  # (an unquantized checkpoint gets no quantization config: the engine builds it all unquantized)
    return [
        *(f"{', '.join(hubs)} quantized ({why}); fix: export with --engine {engine}" for why, hubs in bad.items()),
        *heads,
    ]


EXPERT_INPUT_SCALE_0D = EngineRule(
    "expert-input-scale-0d",
    "vLLM 0.19.1-0.33.0, SGLang 0.5.23",
    "vllm layers/fused_moe/routed_experts.py:332-350 (reshape(()))",
    "every per-expert input_scale is a 0-d scalar",
    per_expert_input_scales_not_0d,
)
EXCLUDE_PATTERNS = EngineRule(
    "exclude-patterns",
    "vLLM 0.22.1-0.26",
    "vllm model_executor/layers/quantization/modelopt.py:266-285",
    "exclude entries are module names or 'prefix*' (a trailing '.*' never matches the module itself)",
    exclude_patterns_vllm_cannot_match,
)
QUANT_CONFIG_FIELDS = EngineRule(
    "quant-config-fields",
    "vLLM 0.19.1-0.33.0",
    "vllm weight_utils.py:240-246; modelopt.py:359, :820",
    "quantization_config.quant_method starts with 'modelopt' and lists 'ignore'; NVFP4 needs group_size, kv_cache_quant_algo, exclude_modules",
    vllm_config_fields,
)
EXPERTS_UNDER_DECODER_LAYER = EngineRule(
    "experts-under-decoder-layer",
    "vLLM 0.31.0-0.33.0 (0.19-0.20 double the prefix), TensorRT-LLM gemma4 mapper",
    "vllm models/gemma4.py:646-653, models/utils.py:438-448; tensorrt_llm gemma4_weight_mapper.py (_remap_moe_keys)",
    "no expert key under a '.moe.experts.' prefix the model does not have",
    moe_prefixed_expert_keys,
)
GPT_OSS_FUSED_EXPERTS = EngineRule(
    "gpt-oss-fused-experts",
    "vLLM 0.33.0",
    "vllm models/gpt_oss.py:73-82, 1250, 1393",
    "GPT-OSS experts are the fused gate_up_proj/down_proj (per-expert keys are dropped silently)",
    gpt_oss_not_fused,
)
ENGINE_LOADS = EngineRule(
    "engine-loads",
    "the spec's export.engines.<engine>.versions",
    "the spec's export.engines.<engine>.why",
    "no module quantized, or unquantized, where the family's spec says this engine's loader cannot serve it so",
    engine_cannot_load,
)

#: Each engine's rules, in the order verify reports them.
ENGINES = (
    Engine(
        "vllm",
        "vLLM's ModelOpt loader",
        (
            EXPERT_INPUT_SCALE_0D,
            EXCLUDE_PATTERNS,
            QUANT_CONFIG_FIELDS,
            EXPERTS_UNDER_DECODER_LAYER,
            GPT_OSS_FUSED_EXPERTS,
            ENGINE_LOADS,
        ),
    ),
    Engine("sglang", "SGLang's ModelOpt loader", (EXPERT_INPUT_SCALE_0D, QUANT_CONFIG_FIELDS, ENGINE_LOADS)),
    Engine("trtllm", "TensorRT-LLM's HF weight mappers", (EXPERTS_UNDER_DECODER_LAYER,)),
    Engine("hf", "transformers' from_pretrained: the hub's names, no loader rules beyond the export contract"),
)


@hookimpl
def register_engines(register):
    for engine in ENGINES:
        register(engine.name, engine)
