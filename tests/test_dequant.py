"""The reference dequantizer (moe_unfuse/quant/dequant.py) against modelopt's own: bit for bit, on every
format it handles (FP8 per-tensor and per-channel, NVFP4 2-D and fused 3-D), in every dtype, and the
activation quantization it applies (FP8 static, NVFP4 dynamic blocks) against modelopt's quantize +
dequantize of the same tensor."""

from __future__ import annotations

import pytest
import torch

from moe_unfuse.quant.dequant import (
    dequantize,
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_fp8_static,
    quantize_nvfp4_dynamic,
    tensor_format,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[-1])  # blocks of very different ranges
    w[..., :16] = 0  # an all-zero block (modelopt sets its scale to 1)
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 96), (4, 48, 32)], ids=["2d", "fused-3d"])
def test_nvfp4_equals_modelopt(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    w = _weight(*shape)
    qt, scale, scale_2 = NVFP4QTensor.quantize(w, 16)
    assert qt._quantized_data.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn
    theirs = qt.dequantize(dtype, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    ours = dequantize_nvfp4(qt._quantized_data, scale, scale_2, dtype)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert tensor_format(qt._quantized_data, scale) == "nvfp4"
    assert torch.equal(dequantize(qt._quantized_data, scale, scale_2, dtype), theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 0], ids=["per-tensor", "per-channel"])
def test_fp8_equals_modelopt(axis: int | None, dtype: torch.dtype) -> None:
    from modelopt.torch.quantization.qtensor import FP8QTensor

    w = _weight(48, 64, seed=1)
    qt, scale = FP8QTensor.quantize(w, axis=axis)
    theirs = qt.dequantize(dtype, scale=scale)
    ours = dequantize_fp8(qt._quantized_data, scale, dtype)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert tensor_format(qt._quantized_data, scale) == "fp8"


def test_nvfp4_low_nibble_first() -> None:
    """Byte 0x21 holds code 1 (0.5) then code 2 (1.0); code 9 is -0.5."""
    packed = torch.tensor([[0x21, 0x09] * 8], dtype=torch.uint8)
    scale = torch.ones(1, 2, dtype=torch.float8_e4m3fn)
    out = dequantize_nvfp4(packed, scale, torch.tensor(2.0), torch.float32)
    assert out[0, :4].tolist() == [1.0, 2.0, -1.0, 0.0]


def test_activation_quantizers_equal_modelopt() -> None:
    """W4A4 inputs: modelopt's NVFP4 quantize with the exported input_scale as global scale, then
    dequantize, is what the reference computes; FP8 inputs: its static per-tensor quantize."""
    from modelopt.torch.quantization.qtensor import FP8QTensor, NVFP4QTensor

    x = _weight(3, 5, 64, seed=2).float()
    input_scale = x.abs().amax() / (6 * 448) * 0.7  # some values saturate, as with a calibrated amax
    qt, scale, scale_2 = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=input_scale)
    theirs = qt.dequantize(torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    assert torch.equal(quantize_nvfp4_dynamic(x, input_scale), theirs)
    fp8_scale = x.abs().amax() / 448
    qt8, s8 = FP8QTensor.quantize(x, scales=fp8_scale)
    assert torch.equal(quantize_fp8_static(x, fp8_scale), qt8.dequantize(torch.float32, scale=s8))
