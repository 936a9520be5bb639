"""What modelopt alone does with each spec's whole tiny model, measured against moe_unfuse: the
README's "modelopt alone" table (``tests/test_modelopt_alone.py`` checks the README's copy on the
pinned modelopt; ``python -m moe_unfuse.tools.modelopt_alone --write README.md`` rewrites it).

For every spec with a whole tiny model in the installed transformers, the model is saved once; plain
modelopt (``mtq.quantize`` with the format's preset + ``export_hf_checkpoint``) runs on it in a
child process that imports nothing of moe_unfuse (:mod:`moe_unfuse.tools.plain_modelopt`), while this
process runs moe_unfuse's quantize and export on the same folder and calibration batches (no forced
routing, as plain modelopt has none). Then, per family: how many expert projections plain modelopt's
checkpoint holds quantized (under moe_unfuse's names, with a scale), whether the experts' input
quantizers were calibrated, whether both checkpoints have the same tensor names, and whether the
expert weights and weight scales are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

START, END = "<!-- modelopt-alone:start -->", "<!-- modelopt-alone:end -->"
#: The modelopt version the README's table is generated on (constraints.txt): the table differs
#: between releases, so the README states the pinned one and the test checks it only there.
PINNED_MODELOPT = "0.47.0"
QFORMAT = "nvfp4"
#: Calibration for both sides: the built-in text, few and short samples (the measurement is about
#: which tensors get quantized and how, not about calibration quality).
CALIB = {"calib_size": 4, "seq_len": 32, "batch_size": 2}


@dataclass
class Row:
    """One family's measurement."""

    arch: str
    projections: int  # expert projections moe_unfuse quantizes (each expert's gate, up, down ...)
    plain_quantized: int  # of those, held quantized in plain modelopt's checkpoint under the same name
    plain_inputs: int  # enabled input quantizers inside the experts modules under plain modelopt
    plain_inputs_calibrated: int  # of those, with a finite positive amax
    same_keys: bool  # both checkpoints hold the same tensor names
    missing: int  # names of moe_unfuse's checkpoint plain modelopt's lacks
    extra: int  # names plain modelopt's checkpoint has and moe_unfuse's does not
    identical: int  # quantized expert projections whose weight and weight scales are byte-identical
    error: str | None = None  # plain modelopt's error, if it raised


def _bits(t: Any) -> Any:
    return t.contiguous().reshape(-1).view(__import__("torch").uint8)


def _scale_names(weight: str, fused: bool) -> list[str]:
    stem = weight if fused else weight.removesuffix(".weight")
    sep = "_" if fused else "."
    return [f"{stem}{sep}weight_scale", f"{stem}{sep}weight_scale_2"]


def _projections(experts: Any, weight: str) -> int:
    """Expert projections one exported weight holds: one per-expert weight, or a fused tensor's experts
    times the projections stacked in it."""
    if experts.layout != "fused":
        return 1
    for param, into, _ in experts.params:
        if weight.endswith(f".{param}"):
            return experts.num_experts * len(into)
    return experts.num_experts


def compare(arch: str, contract: Any, ours: Path, plain: Path, found: dict[str, Any]) -> Row:
    """One row from the two checkpoint folders and what the child found."""
    from ..hub.checkpoint import read_tensors

    mine = read_tensors(ours)
    theirs = read_tensors(plain) if found.get("error") is None else {}
    projections = quantized = identical = 0
    for experts in contract.experts.values():
        fused = experts.layout == "fused"
        for weight in experts.weights:
            count = _projections(experts, weight)
            scales = [s for s in _scale_names(weight, fused) if s in mine]
            if weight not in mine or not scales:
                continue
            projections += count
            if weight in theirs and mine[weight].dtype == theirs[weight].dtype and all(s in theirs for s in scales):
                quantized += count
                names = [weight, *scales]
                if all(
                    mine[n].shape == theirs[n].shape
                    and mine[n].dtype == theirs[n].dtype
                    and bool((_bits(mine[n]) == _bits(theirs[n])).all())
                    for n in names
                ):
                    identical += count
    keys_mine, keys_theirs = set(mine), set(theirs)
    return Row(
        arch,
        projections,
        quantized,
        found.get("input_quantizers", 0),
        found.get("input_calibrated", 0),
        bool(theirs) and keys_mine == keys_theirs,
        len(keys_mine - keys_theirs),
        len(keys_theirs - keys_mine),
        identical,
        found.get("error"),
    )


def measure(archs: list[str] | None = None, work: Path | None = None) -> list[Row]:
    """Run both sides for ``archs`` (default: every spec with a whole tiny model in the installed
    transformers) under ``work`` (default: a temporary folder) and compare."""
    import torch

    from ..base.options import QFORMATS
    from ..hub.loading import load_model
    from ..hub.naming import model_contract
    from ..hub.tiny import byte_tokenizer, tiny_gemma4, tiny_model_for
    from ..quant.calibration import calibration_batches, read_calibration_texts
    from ..quant.export import export_checkpoint
    from ..quant.quantize import quantize_model
    from ..spec.catalog import specs as catalog_specs

    specs = catalog_specs()
    if archs is None:
        archs = sorted(a for a, s in specs.items() if (s.golden or {}).get("model") and s.resolve_class() is not None)
    with tempfile.TemporaryDirectory(prefix="moe-unfuse-modelopt-alone-") as tmp:
        root = Path(work) if work is not None else Path(tmp)
        tokenizer = byte_tokenizer()
        batches = calibration_batches(tokenizer, read_calibration_texts(None, tokenizer), **CALIB)
        torch.save(batches, root / "batches.pt")
        jobs = []
        for arch in archs:
            folder = root / arch / "model"
            model = tiny_gemma4() if arch == "gemma4" else tiny_model_for(specs[arch])
            model.save_pretrained(folder)
            experts = [e.module for e in model_contract(model, [specs[arch]]).experts.values()]
            jobs.append({"arch": arch, "folder": str(folder), "out": str(root / arch / "plain"), "experts": experts})
        job = {"qformat_config": QFORMATS[QFORMAT], "batches": str(root / "batches.pt"), "models": jobs}
        job["result"] = str(root / "plain.json")
        (root / "job.json").write_text(json.dumps(job))
        script = Path(__file__).with_name("plain_modelopt.py")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_UNFUSE")}
        child = subprocess.Popen([sys.executable, "-P", str(script), str(root / "job.json")], env=env)
        rows = []
        contracts = {}
        try:
            for arch in archs:  # moe_unfuse's side, while the child runs plain modelopt's
                model = load_model(str(root / arch / "model"), "cpu", "auto")
                result = quantize_model(model, QFORMAT, batches, progress=False)
                contracts[arch] = model_contract(model, result.specs)
                # engine trtllm: every family's experts quantized, as plain modelopt quantizes them
                # (for vLLM and SGLang, GPT-OSS's stay BF16: its spec's export.engines)
                _, report = export_checkpoint(
                    model, root / arch / "ours", specs=result.specs, qformat=QFORMAT, progress=False, engine="trtllm"
                )
                if not report.ok:
                    raise AssertionError(f"{arch}: moe_unfuse's export fails verification: {report.summary()}")
        finally:
            child.wait()
        found = json.loads((root / "plain.json").read_text()) if (root / "plain.json").is_file() else {}
        for arch in archs:
            entry = found.get(arch, {"error": "the child process died before this family"})
            rows.append(compare(arch, contracts[arch], root / arch / "ours", root / arch / "plain", entry))
    return rows


def _cell(row: Row) -> list[str]:
    if row.error:
        quantized = f"0 / {row.projections}"
    else:
        quantized = f"{row.plain_quantized} / {row.projections}"
    inputs = f"{row.plain_inputs_calibrated} / {row.plain_inputs}" if not row.error else "-"
    keys = "yes" if row.same_keys else ("-" if row.error else f"no ({row.missing} missing, {row.extra} extra)")
    same = f"{row.identical} / {row.projections}" if not row.error else "-"
    note = row.error or ""
    return [row.arch, quantized, inputs, keys, same, note.replace("|", "/")]


def markdown(rows: list[Row], modelopt_version: str) -> str:
    lines = [
        START,
        f"Generated by `python -m moe_unfuse.tools.modelopt_alone --write README.md` on nvidia-modelopt {modelopt_version} "
        f"(`tests/test_modelopt_alone.py` checks it on that version); do not edit by hand. Each spec's whole tiny "
        f"model (seeded random weights), {QFORMAT.upper()}, the same {CALIB['calib_size']} calibration samples of "
        f"{CALIB['seq_len']} tokens for both. Plain modelopt: `mtq.quantize(model, mtq.{'NVFP4_DEFAULT_CFG'}, "
        "forward_loop)` + `export_hf_checkpoint`, in a process that never imported moe_unfuse. Projections: expert "
        "projections plain modelopt's checkpoint holds quantized under moe_unfuse's name / those moe_unfuse quantizes. "
        "Inputs: the experts modules' input quantizers plain modelopt calibrated / enabled. Identical: projections "
        "whose weight and weight scales are byte-identical in both checkpoints.",
        "",
        "| arch | projections quantized | inputs calibrated | same tensor names | identical | plain modelopt's error |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(_cell(r))} |" for r in rows]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(
        prog="python -m moe_unfuse.tools.modelopt_alone", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--write", type=Path, metavar="README", help="replace the section between the markers")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every row as JSON")
    parser.add_argument("archs", nargs="*", help="only these families (default: every whole tiny model)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from ..quant.export_context import quiet
    from .export_table import replace_section

    hf_logging.disable_progress_bar()
    with quiet():
        rows = measure(args.archs or None)
    section = markdown(rows, version("nvidia-modelopt"))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if args.write is None:
        print(section)
        return 0
    args.write.write_text(replace_section(args.write.read_text(), section, START, END))
    return 0


if __name__ == "__main__":
    sys.exit(main())
