"""Reference dequantization of modelopt-format FP8 and NVFP4 tensors, and the activation quantization
those formats apply, in plain torch on the CPU (modelopt's NVFP4 fake quant needs CUDA).

FP8: an E4M3 weight times its per-tensor (or per-channel) ``weight_scale``. NVFP4: two E2M1 codes per
byte, the low nibble first, an E4M3 ``weight_scale`` per block of 16 inputs and an FP32 global
``weight_scale_2``. Both follow modelopt's own ``FP8QTensor.dequantize`` / ``NVFP4QTensor.dequantize``
operation for operation, so the results are bit-identical (``tests/test_dequant.py``).
"""

from __future__ import annotations

from typing import Callable

import torch

#: E2M1 code -> value (bit 3 is the sign), as modelopt and the engines decode it.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16

FP8 = "fp8"
NVFP4 = "nvfp4"


def tensor_format(weight: torch.Tensor, weight_scale: torch.Tensor | None) -> str | None:
    """The format a stored weight is in, from its dtypes (a checkpoint describes itself): FP8 for an
    E4M3 weight with a scale, NVFP4 for packed bytes with E4M3 block scales; None otherwise."""
    if weight_scale is None:
        return None
    if weight.dtype == torch.float8_e4m3fn:
        return FP8
    if weight.dtype == torch.uint8 and weight_scale.dtype == torch.float8_e4m3fn:
        return NVFP4
    return None


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``weight`` (E4M3) x ``scale`` (0-d, or broadcastable per channel), in ``dtype`` as modelopt computes it."""
    return weight.to(dtype) * scale.to(weight.device).to(dtype)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes ``[..., n]`` -> E2M1 values ``[..., 2n]`` in float32 (low nibble first)."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)[codes.long()]


def dequantize_nvfp4(
    packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``packed`` uint8 ``[..., in/2]``, ``scale`` E4M3 ``[..., in/16]``, ``scale_2`` FP32 (0-d) -> ``[..., in]``."""
    values = unpack_e2m1(packed)
    block = values.shape[-1] // scale.shape[-1]
    per_block = scale.to(torch.float32) * scale_2.to(packed.device)
    out = values.view(*values.shape[:-1], -1, block) * per_block.unsqueeze(-1)
    return out.reshape(values.shape).to(dtype)


def dequantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    scale_2: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """A stored quantized weight in ``dtype``, its format read from its dtypes."""
    fmt = tensor_format(weight, scale)
    if fmt == FP8:
        return dequantize_fp8(weight, scale, dtype)
    if fmt == NVFP4:
        if scale_2 is None:
            raise ValueError("an NVFP4 weight needs its weight_scale_2")
        return dequantize_nvfp4(weight, scale, scale_2, dtype)
    raise ValueError(f"not a modelopt FP8/NVFP4 weight: weight {weight.dtype}, scale {scale.dtype}")


# ----------------------------------------------------------------------------------------------
# activations, quantized as the format does at inference


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """``x`` (already divided by its scales) rounded to the nearest E2M1 value, ties to even, as
    modelopt's ``_cast_fp4`` does (values beyond 6 saturate)."""
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=x.device)
    mags = torch.tensor(E2M1_VALUES[:8], device=x.device)
    a = x.abs()
    idx = torch.searchsorted(bounds, a)
    idx = idx + torch.isin(a, bounds[[1, 3, 5]]).long()  # ties at 0.75, 1.75, 3.5 go to the even code
    return torch.where(x < 0, -mags[idx], mags[idx])


def quantize_nvfp4_dynamic(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 W4A4 activation quantization, dequantized: per block of 16 along the last axis, an E4M3
    block scale (block amax / 6 / ``global_scale``), then E2M1 codes; ``global_scale`` is the exported
    ``input_scale``. Computed in float32, returned in ``x``'s dtype."""
    shape, dtype = x.shape, x.dtype
    n = shape[-1]
    pad = (-n) % NVFP4_BLOCK
    xf = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    blocks = xf.view(*shape[:-1], -1, NVFP4_BLOCK)
    g = global_scale.float().to(x.device)
    scale = blocks.abs().amax(dim=-1) / (E2M1_MAX * g)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = scale.clamp(min=2**-9, max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    full = (scale * g).unsqueeze(-1)
    out = (round_e2m1(blocks / full) * full).reshape(*shape[:-1], n + pad)
    return out[..., :n].to(dtype)


def quantize_fp8_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """FP8 activation quantization with the exported per-tensor ``input_scale``, dequantized."""
    s = input_scale.float().to(x.device)
    q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


def activation_quantizer(fmt: str, input_scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a layer applies to its input under ``fmt`` with this ``input_scale``."""
    if fmt == FP8:
        return lambda x: quantize_fp8_static(x, input_scale)
    if fmt == NVFP4:
        return lambda x: quantize_nvfp4_dynamic(x, input_scale)
    raise ValueError(f"no activation quantization for {fmt}")
