"""A built-in tiny Gemma 4 and a byte-level tokenizer, so ``moe-unfuse quantize`` runs offline anywhere.

The model is built from a config in code with seeded random weights (no download); the tokenizer maps
each UTF-8 byte to one id after four special tokens, so it needs no training data and never misses a
character. Sizes are multiples of 16 so NVFP4's 16-element blocks divide every quantized weight.
"""

from __future__ import annotations

from typing import Any

import torch

SEED = 0
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, as in Gemma's config (pad 0, eos 1, bos 2)
BYTE_OFFSET = len(SPECIAL_TOKENS)
VOCAB_SIZE = 272  # 4 specials + 256 bytes + 12 multimodal placeholders (image, audio, ...)
MULTIMODAL_TOKENS = dict(
    image_token_id=262,
    audio_token_id=263,
    video_token_id=264,
    boi_token_id=265,
    eoi_token_id=266,
    boa_token_id=267,
    eoa_token_index=268,
)

#: The default text stack: 4 layers (3 sliding, 1 full attention), 8 experts, top-2.
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=32,
    vocab_size=VOCAB_SIZE,
    vocab_size_per_layer_input=VOCAB_SIZE,
    hidden_size_per_layer_input=16,
    max_position_embeddings=512,
    sliding_window=64,
    layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=64,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

#: Overrides that make ``tiny_gemma4`` approximate google/gemma-4-26B-A4B's text stack (25.3 B params,
#: experts 90%): H 2816, 128 experts x I 704, top-8, 30 layers (5 sliding : 1 full). Build it on the
#: meta device (``with torch.device("meta")``) for size estimates; the hub config was not available
#: offline, so the dense-MLP width (2112) and attention shapes are this estimate's assumptions.
GEMMA4_26B_A4B_TEXT: dict[str, Any] = dict(
    hidden_size=2816,
    intermediate_size=2112,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    vocab_size=262144,
    vocab_size_per_layer_input=262144,
    hidden_size_per_layer_input=0,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5,
    sliding_window=1024,
    max_position_embeddings=262144,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    attention_k_eq_v=True,
)

VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    position_embedding_size=64,
    patch_size=4,
    pooling_kernel_size=2,
)
AUDIO_CONFIG: dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    subsampling_conv_channels=[16, 16],
    output_proj_dims=32,
)


def tiny_gemma4(
    multimodal: bool = False,
    audio: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = SEED,
    experts_implementation: str | None = None,
    **text_overrides: Any,
) -> torch.nn.Module:
    """A random, seeded Gemma 4: ``Gemma4ForCausalLM``, or with ``multimodal`` a
    ``Gemma4ForConditionalGeneration`` (text stack under ``model.language_model``, a vision tower,
    and with ``audio`` an audio tower). ``config.architectures`` is set, as modelopt's export needs.
    """
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4ForCausalLM,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    text = {**TEXT_CONFIG, **text_overrides}
    if multimodal:
        config = Gemma4Config(
            text_config=text,
            vision_config=Gemma4VisionConfig(**VISION_CONFIG),
            audio_config=Gemma4AudioConfig(**AUDIO_CONFIG) if audio else None,
            **MULTIMODAL_TOKENS,
        )
        cls = Gemma4ForConditionalGeneration
    else:
        config = Gemma4TextConfig(**text)
        cls = Gemma4ForCausalLM
    config.architectures = [cls.__name__]
    if experts_implementation is not None:
        for cfg in (config, config.get_text_config()):
            cfg._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    # Built in ``dtype`` the way from_pretrained builds (rotary inv_freq stays fp32), so a checkpoint
    # of this model reloads into an identical one.
    model = cls._from_config(config, dtype=dtype)
    # std 0.02 init makes every router score nearly equal; wider weights give a real routing
    # (some experts busier than others) and activations of a realistic spread for calibration.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_meta and name.endswith(("gate_up_proj", "experts.down_proj", "router.proj.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    return model.eval()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast``: one id per UTF-8 byte (``id = byte + 4``), specials at 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for b, ch in bytes_to_unicode().items():
        vocab[ch] = BYTE_OFFSET + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
    )


#: Built-in calibration text: varied prose, code, numbers and a little non-English, so byte
#: statistics are not those of one register. Written for this project.
CALIBRATION_TEXT = """\
The river had risen overnight, and by morning the ferry was moored two streets inland. Nobody in the
village seemed surprised; they rolled up their trousers, carried the bread on their heads, and argued
about whether the bridge would have survived if the council had painted it blue as promised.

A mixture of experts routes each token to a few specialists out of many. The router scores every
expert, keeps the top k, and the layer's output is the weighted sum of those experts' outputs. When a
checkpoint stores all experts in one three-dimensional tensor, a quantizer looking for linear layers
finds nothing to quantize, and the file is written in full precision without a warning.

def moving_average(values, window=3):
    out = []
    for i in range(len(values) - window + 1):
        out.append(sum(values[i:i + window]) / window)
    return out

print(moving_average([4, 8, 15, 16, 23, 42]))   # [9.0, 13.0, 18.0, 27.0]

SELECT region, COUNT(*) AS orders, ROUND(AVG(total), 2) AS mean_total
FROM sales WHERE year = 2024 GROUP BY region ORDER BY orders DESC LIMIT 10;

Quarterly figures: revenue 1,284.7 (+6.2%), operating margin 18.4%, free cash flow 212.9, headcount
3,417. Temperatures in July ranged from 14.2 to 37.9 degrees; rainfall was 41 mm against 63 mm normal.

Recipe for two: soak 150 g of lentils for an hour, fry an onion in olive oil until golden, add cumin,
garlic and a tin of tomatoes, then the lentils and 600 ml of water. Simmer for 25 minutes, salt at the end.

Le train de 7 h 42 a du retard ; les voyageurs attendent sur le quai en lisant le journal. Der Zug nach
Hamburg fährt heute von Gleis neun. El mercado abre a las ocho y cierra cuando se acaba el pescado.
東京の朝は静かで、コーヒーの香りが駅の周りに漂っている。

Dear Ms. Okafor, thank you for your letter of 3 March. I have checked the invoice (ref. INV-20931) and
the discrepancy comes from a duplicated shipping line; a corrected copy is attached. Kind regards, Tom.

{"id": 17, "name": "sensor-b", "readings": [0.12, 0.15, 0.11], "status": "ok", "tags": ["roof", "north"]}

In the proof, assume for contradiction that the set is finite; then its largest element n exists, and
n + 1 is also in the set by the induction step, which contradicts the maximality of n. Hence the set
is infinite. The same argument fails for the reals, where no successor is defined.

The violinist tuned the A string twice, looked at the conductor, and waited. Outside, a delivery van
reversed with a beep that was almost, but not quite, an F sharp.
"""


def _round_sizes(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Sizes (keys naming a size, dim or rank; nested configs too) rounded up to multiples of 16."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, dict):
            value = _round_sizes(value)
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and any(w in key for w in ("size", "dim", "rank"))
            and value > 1
            and value % 16
        ):
            value = (value + 15) // 16 * 16
        out[key] = value
    return out


def tiny_model_for(
    spec: Any, dtype: torch.dtype = torch.bfloat16, seed: int = SEED, overrides: dict[str, Any] | None = None
) -> torch.nn.Module:
    """The whole tiny model of ``spec``'s ``golden.model``, sized for export: every size that is not a
    multiple of 16 rounded up (NVFP4 quantizes in blocks of 16 along the input features) and a
    vocabulary that holds :func:`byte_tokenizer`'s ids, with seeded random weights. ``architectures``
    is the class name unless the config names the hub's spelling (see :func:`save_hub_style`).
    ``overrides``: config kwargs over the golden ones (a deeper model, more experts)."""
    import importlib

    model_cfg = spec.golden["model"]
    module, _, name = model_cfg["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = _round_sizes({**model_cfg["config_kwargs"], **(overrides or {})})
    for key in {"vocab_size", *(k for k in kwargs if k.startswith("vocab_size"))}:
        kwargs[key] = max(kwargs.get(key, 0), VOCAB_SIZE)
    config = cls.config_class(**kwargs)
    config.architectures = list(kwargs.get("architectures") or [cls.__name__])
    torch.manual_seed(seed)
    return cls._from_config(config, dtype=dtype).eval()


def save_hub_style(model: torch.nn.Module, path: Any, tokenizer: bool = True) -> Any:
    """``model.save_pretrained(path)`` with config.json as the hub's checkpoint has it, and with
    ``tokenizer`` the byte tokenizer beside it; returns ``path``. transformers v5 writes the class
    name into ``architectures``, where a hub checkpoint may spell it otherwise: Phi-3.5-MoE's says
    ``PhiMoEForCausalLM`` (as vLLM's registry does), transformers' class is ``PhimoeForCausalLM``. A
    spec's tiny config names the hub's spelling in ``config_kwargs.architectures``; it is written back
    here (save_pretrained overwrites it in the config too, which is restored)."""
    import json
    from pathlib import Path

    path = Path(path)
    archs = list(getattr(model.config, "architectures", None) or [])
    model.save_pretrained(path)
    if archs and model.config.architectures != archs:
        model.config.architectures = archs
        config = json.loads((path / "config.json").read_text())
        config["architectures"] = archs
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer:
        byte_tokenizer().save_pretrained(path)
    return path


def save_tiny_model(spec: Any, path: Any, tokenizer: bool = True, overrides: dict[str, Any] | None = None) -> Any:
    """``spec``'s whole tiny model saved as the hub has it (:func:`save_hub_style`), with the tensors
    hub checkpoints hold that the model class drops on load (``golden.model.hub_only_tensors``: name ->
    shape, seeded random values in the model's dtype): an export is tried on a source like the hub's,
    which carries them (``from_source.carry_source_tensors``). ``overrides``: as in :func:`tiny_model_for`.
    Returns ``path``."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    model = tiny_model_for(spec, overrides=overrides)
    path = save_hub_style(model, path, tokenizer=tokenizer)
    extra = spec.golden["model"].get("hub_only_tensors") or {}
    if extra:
        (shard,) = Path(path).glob("*.safetensors")  # a tiny model is one file
        gen = torch.Generator().manual_seed(SEED)
        dtype = next(model.parameters()).dtype
        tensors = {k: (torch.randn(tuple(shape), generator=gen) * 0.02 + 1).to(dtype) for k, shape in extra.items()}
        save_file({**load_file(shard), **tensors}, str(shard), metadata={"format": "pt"})
    return path


def write_gemma4_checkpoint(
    path: Any, layers: int, seed: int = SEED, dtype: torch.dtype = torch.bfloat16, **text_overrides: Any
) -> int:
    """Write a Gemma 4 text checkpoint (``Gemma4ForCausalLM``: config, one safetensors shard per
    decoder layer plus one for the rest, index, byte tokenizer) with seeded random weights, one layer
    in memory at a time, so checkpoints larger than memory can be made (the layer-by-layer path's
    benchmark and memory test). ``GEMMA4_26B_A4B_TEXT`` as overrides gives the real layer sizes.
    Names and layout are what ``save_pretrained`` writes. Returns the bytes written."""
    import json
    import re
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = {**TEXT_CONFIG, **text_overrides, "num_hidden_layers": layers}
    if "layer_types" in text and len(text["layer_types"]) != layers:
        pattern = text["layer_types"]
        text["layer_types"] = [pattern[i % len(pattern)] for i in range(layers - 1)] + ["full_attention"]
    config = Gemma4TextConfig(**text)
    config.architectures = [Gemma4ForCausalLM.__name__]
    config.dtype = dtype
    with torch.device("meta"):
        model = Gemma4ForCausalLM._from_config(config, dtype=dtype)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    groups: dict[str, list[str]] = {}
    for key in state:
        m = re.search(r"\.layers\.(\d+)\.", key)
        groups.setdefault(f"layer{int(m.group(1)):05d}" if m else "rest", []).append(key)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    names = sorted(groups)
    for i, group in enumerate(names):
        tensors = {}
        for key in groups[group]:
            meta = state[key]
            if key.endswith(("gate_up_proj", "experts.down_proj", "router.proj.weight")):
                value = torch.randn(meta.shape, generator=gen) * 0.08
            elif "norm" in key or key.endswith("layer_scalar"):
                value = torch.ones(meta.shape)
            else:
                value = torch.randn(meta.shape, generator=gen) * 0.02
            tensors[key] = value.to(meta.dtype)
        tensors = revert_weight_conversion(model, tensors)
        shard = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return total
