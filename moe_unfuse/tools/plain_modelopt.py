"""Plain modelopt on saved models: ``mtq.quantize`` with a preset config, then ``export_hf_checkpoint``.

Run as a script in a child process (``python -P moe_unfuse/tools/plain_modelopt.py JOB.json``) by
:mod:`moe_unfuse.tools.modelopt_alone`: it imports nothing from moe_unfuse, so no spec, handler or cache of
ours is registered with modelopt, and what it writes is what modelopt alone writes. ``JOB.json``:
``{"qformat_config": "NVFP4_DEFAULT_CFG", "batches": PATH, "models": [{"arch", "folder", "out",
"experts": [module paths]}], "result": PATH}``; the result file gets, per arch, the input quantizers
of the experts modules (enabled, calibrated) and the export's error, if any.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any


def quantize_and_export(entry: dict[str, Any], config_name: str, batches: list[dict[str, Any]]) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq
    import torch
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    folder = Path(entry["folder"])
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.bfloat16).eval()

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in batches:
                m(**batch, use_cache=False)

    found: dict[str, Any] = {"error": None}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mtq.quantize(model, copy.deepcopy(getattr(mtq, config_name)), forward_loop=forward_loop)
    except Exception as exc:  # noqa: BLE001 - what modelopt does is the measurement
        found["error"] = f"quantize: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return found
    enabled = calibrated = 0
    for name, module in model.named_modules():
        if not name.endswith("input_quantizer") or not any(name.startswith(f"{p}.") for p in entry["experts"]):
            continue
        if getattr(module, "is_enabled", False):
            enabled += 1
            amax = getattr(module, "amax", None)
            calibrated += int(amax is not None and bool(torch.isfinite(amax).all()) and bool((amax > 0).all()))
    found["input_quantizers"], found["input_calibrated"] = enabled, calibrated
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            export_hf_checkpoint(model, export_dir=entry["out"])
    except Exception as exc:  # noqa: BLE001
        found["error"] = f"export: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return found


def main(job_file: str) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    job = json.loads(Path(job_file).read_text())
    batches = torch.load(job["batches"], weights_only=True)
    torch.set_num_threads(1)
    results = {}
    for entry in job["models"]:
        results[entry["arch"]] = quantize_and_export(entry, job["qformat_config"], batches)
        Path(job["result"]).write_text(json.dumps(results))  # what is done so far survives a crash
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
