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
#: modelopt calibration algorithms ``--algorithm`` passes through (modelopt's ``algorithm`` field).
#: max: amax = the max of each tensor; mse: each expert weight's amax searched (modelopt's multiplier
#: sweep, 0.25x-4x in 0.1 steps) for the least squared error of its fake-quantized weight.
ALGORITHMS = ("max", "mse")
#: qformat -> the algorithms it can run here, and why not the others (modelopt 0.47-0.48): the NVFP4
#: weight-scale search fake-quantizes static NVFP4 blocks, which modelopt does only with triton on a GPU.
ALGORITHM_QFORMATS: dict[str, tuple[str, ...]] = {"mse": ("fp8",)}
ALGORITHM_REFUSED_WHY = {
    "mse": "modelopt's NVFP4 weight-scale search fake-quantizes static NVFP4 blocks with triton on a GPU only"
}


def check_algorithm(qformat: str, algorithm: str) -> None:
    """Refuse, in one line and before anything runs, an algorithm modelopt cannot run for ``qformat``."""
    from .errors import MoeUnfuseError

    if algorithm not in ALGORITHMS:
        raise MoeUnfuseError(f"unknown --algorithm {algorithm!r}; fix: use one of {', '.join(ALGORITHMS)}")
    allowed = ALGORITHM_QFORMATS.get(algorithm)
    if allowed is not None and qformat not in allowed:
        raise MoeUnfuseError(
            f"--algorithm {algorithm} is available for --qformat {'/'.join(allowed)} only, not {qformat} "
            f"({ALGORITHM_REFUSED_WHY[algorithm]}); fix: use --algorithm max"
        )


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
