"""Choices and defaults of the quantize job, importable without torch (``moe-unfuse --help`` stays fast)."""

from __future__ import annotations

#: qformat -> modelopt config name (``None``: no quantization; the experts are only unfused and re-exported).
#: Each calibrates and exports on a CPU; AWQ/MSE variants are left out: their search needs CUDA fake quant.
QFORMATS: dict[str, str | None] = {
    "fp8": "FP8_DEFAULT_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
    "nvfp4_experts_only": "NVFP4_EXPERTS_ONLY_CFG",
    "w4a16_nvfp4": "W4A16_NVFP4_CFG",
    "none": None,
}
#: Serving engines whose key naming an export can target (a spec's ``export.renames`` per engine).
ENGINES = ("vllm", "sglang", "trtllm", "hf")
#: shared: one input scale per layer and input (max over experts), as fused-MoE kernels apply; per-expert: each its own.
INPUT_SCALE_POLICIES = ("shared", "per-expert")
DEFAULT_SEQ_LEN = 256
DEFAULT_CALIB_SIZE = 64
DEFAULT_BATCH_SIZE = 4
DEFAULT_CHUNK_TOKENS = 1024
#: ``--trust-module``: the user's consent for specs to import classes from their own module (never implied by a spec).
TRUST_MODULE_HELP = (
    "let specs import classes from this module of your own and its submodules (repeatable), e.g. a model "
    "not in transformers: your explicit consent, as trust_remote_code; a spec never grants it itself"
)
#: Held-out samples ``quantize`` evaluates the checkpoint on (0: no evaluation).
DEFAULT_EVAL_SIZE = 4


def default_eval_size() -> int:
    """``DEFAULT_EVAL_SIZE``, or ``MOE_UNFUSE_EVAL_SIZE`` when set (the test suite sets 0: its hundreds
    of quantize runs are about the export; the evaluation has its own tests)."""
    import os

    value = os.environ.get("MOE_UNFUSE_EVAL_SIZE", "")
    return int(value) if value.isdigit() else DEFAULT_EVAL_SIZE
