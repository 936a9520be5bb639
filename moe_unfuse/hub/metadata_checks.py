"""What the quantization metadata declares against the scale tensors present (``verify``'s
kv-cache-scales, input-scales and scale-shapes): each rule is something an engine reads without
complaint and then computes wrong with."""

from __future__ import annotations

from .checkpoint import FLOAT_DTYPES, is_nvfp4, required_scales
from .checkpoint_input import QuantMetadata
from .checkpoint_reader import Checkpoint
from .naming import KV_SUFFIXES, NamingContract
from .verify_report import Check


def metadata_checks(ckpt: Checkpoint, contract: NamingContract | None, meta: QuantMetadata) -> list[Check]:
    """kv-cache-scales, input-scales and scale-shapes (see each function)."""
    return [
        _check_kv_cache(ckpt, meta.kv_algo),
        _check_input_scales(ckpt, meta.algo),
        _check_scale_shapes(ckpt, contract, meta),
    ]


def _scalar_problem(ckpt: Checkpoint, key: str) -> str | None:
    """Why ``key`` is not one finite positive float (None when it is)."""
    import torch

    if ckpt.dtype[key] not in FLOAT_DTYPES:
        return f"{key} dtype {ckpt.dtype[key]} (expected a float scalar)"
    if ckpt.shape[key] not in ([], [1]):
        return f"{key} shape {ckpt.shape[key]} (expected one value: an engine would broadcast it)"
    v = ckpt.tensor(key).float().flatten()[0].item()
    return None if torch.isfinite(torch.tensor(v)) and v > 0 else f"{key}={v}"


def _check_kv_cache(ckpt: Checkpoint, kv_algo: str | None) -> Check:
    """kv_cache_quant_algo set: every attention k_proj/v_proj has its k_scale/v_scale (engines
    otherwise quantize K and V with a default scale of 1.0); not set: no k/v scale at all (engines
    that find one scale K or V by it). Each scale one finite value > 0."""
    scales = sorted(k for k in ckpt.where if k.rsplit(".", 1)[-1] in KV_SUFFIXES)
    if kv_algo is None:
        bad = [f"{k} (no kv_cache_quant_algo declares it)" for k in scales]
        detail = "k/v cache scales the quantization config does not declare" if bad else "no KV-cache quantization"
        return Check("kv-cache-scales", not bad, detail, bad)
    bad = []
    for proj, suffix in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
        bad.extend(
            f"{k[: -len('weight')]}{suffix} (missing: kv_cache_quant_algo {kv_algo} needs it)"
            for k in ckpt.where
            if k.endswith(f".{proj}.weight") and f"{k[: -len('weight')]}{suffix}" not in ckpt.where
        )
        if not any(k.endswith("." + suffix) for k in scales):
            bad.append(f"*.{suffix} (none in the checkpoint: kv_cache_quant_algo {kv_algo} needs them)")
    bad.extend(p for k in scales if (p := _scalar_problem(ckpt, k)))
    detail = (
        f"kv_cache_quant_algo {kv_algo}: k/v scales missing or not one finite value > 0"
        if bad
        else f"kv_cache_quant_algo {kv_algo}: {len(scales)} k/v scale(s), each one finite value > 0"
    )
    return Check("kv-cache-scales", not bad, detail, sorted(set(bad)))


def _weight_scale_keys(ckpt: Checkpoint) -> dict[str, tuple[str, str]]:
    """weight key -> (its weight_scale key, the prefix its other scales share), for every weight that
    has a weight_scale: ``{m}.weight`` -> ``{m}.``; a fused ``{name}`` -> ``{name}_``."""
    out = {}
    for k in ckpt.where:
        if k.endswith(".weight_scale") and (w := k[: -len("_scale")]) in ckpt.where:
            out[w] = (k, k[: -len("weight_scale")])
        elif k.endswith("_weight_scale") and (w := k[: -len("_weight_scale")]) in ckpt.where:
            out[w] = (k, k[: -len("weight_scale")])
    return out


def _check_input_scales(ckpt: Checkpoint, algo: str | None) -> Check:
    """A format that quantizes activations (FP8, NVFP4 W4A4) needs an input_scale next to every
    quantized weight, dense linears too: the engine's linear reads it, and one left out loads as an
    uninitialized or zero scale (1/0 in the kernel)."""
    needs = "input_scale" in required_scales(algo)
    weights = _weight_scale_keys(ckpt)
    bad = sorted(f"{p}input_scale (missing: {algo} quantizes {w}'s input)" for w, (_, p) in weights.items()
                 if needs and f"{p}input_scale" not in ckpt.where)  # fmt: skip
    detail = (
        f"quantized weights without the input_scale {algo} needs"
        if bad
        else f"{len(weights)} quantized weight(s), each with its input_scale"
        if needs
        else f"{algo or 'unquantized'}: no input scales needed"
    )
    return Check("input-scales", not bad, detail, bad)


def _check_scale_shapes(ckpt: Checkpoint, contract: NamingContract | None, meta: QuantMetadata) -> Check:
    """Every scale exactly the shape its format has, so that no engine broadcasts a wrong one over a
    weight: NVFP4 ``weight_scale`` one F8 value per group of 16 along the packed dimension of the
    unquantized shape ([out, in/16] for a linear), FP8 ``weight_scale`` one value or one per output
    row; ``weight_scale_2`` and ``input_scale`` of a linear one value."""
    if contract is None or meta.algo is None:
        return Check("scale-shapes", True, "nothing to check (no naming contract or unquantized)")
    group = meta.quant.get("group_size") or 16
    nvfp4 = is_nvfp4(meta.algo)
    bad, n = [], 0
    for w, (ws, prefix) in _weight_scale_keys(ckpt).items():
        if w not in contract.names:
            continue  # hub-names reports it
        want, have, scale = list(contract.names[w]), ckpt.shape[w], ckpt.shape[ws]
        n += 1
        if nvfp4:
            packed = [d for d, (a, b) in enumerate(zip(have, want)) if 2 * a == b] if len(have) == len(want) else []
            if len(packed) != 1 and have != want:
                continue  # the weight itself does not fit: hub-names reports it
            d = packed[0] if packed else len(want) - 1
            expected = [*want[:d], want[d] // group, *want[d + 1 :]]
            if scale != expected:
                bad.append(f"{ws} shape {scale} (NVFP4: {expected}, one scale per {group} of {w} {want})")
        elif len(want) == 2 and scale not in ([], [1], [want[0]], [want[0], 1]):
            bad.append(f"{ws} shape {scale} (FP8: one value, or one per output row of {w} {want})")
        if w.endswith(".weight"):
            for x in ("weight_scale_2", "input_scale"):
                key = prefix + x
                if key in ckpt.where and ckpt.shape[key] not in ([], [1]):
                    bad.append(f"{key} shape {ckpt.shape[key]} (one value per linear)")
    detail = (
        "scales of a shape an engine would broadcast over the wrong weights"
        if bad
        else f"{n} quantized weight(s), every scale of its format's shape"
    )
    return Check("scale-shapes", not bad, detail, bad)
