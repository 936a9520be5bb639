"""Every export of every spec with a whole tiny model (FP8 and NVFP4, as ``moe-unfuse quantize --engine
vllm`` writes it) through vLLM's own model classes and weight loading (:mod:`vllm_loader`): every
checkpoint tensor copied into a parameter, every parameter element written, no packed or FP8 tensor
copied into a parameter of another dtype, and vLLM's own "not initialized from checkpoint" check on the
unquantized checkpoints it runs it on.

The outcome per family and format must be the one ``moe_unfuse/tools/engine_loads.json`` records (which
``verify --engine vllm`` and the README's export table read; ``--update-results`` rewrites it), and
``verify --engine vllm`` (run when the export was made) must pass every export that loads. An export
that fails is triaged by loading the unquantized checkpoint it was made from (saved as the hub has it):
when that fails too, the failure is not the quantization's ("fails unquantized too", with that
checkpoint's error), otherwise it is ours ("fails"). A model vLLM cannot build from the tiny config on a CPU (a missing hub config field, a CPU or
kernel limit) and an architecture its registry does not know (vLLM would fall back to its generic
Transformers backend, not loaded here) are recorded as such, with the reason. Exports for another engine
that vLLM cannot serve (GPT-OSS experts or Jamba's Mamba mixer quantized, Exaone-MoE's head BF16:
``--engine hf``) must fail here and be refused by ``verify --engine vllm``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import vllm
import vllm_loader

ROOT = Path(__file__).resolve().parent.parent
# moe_unfuse itself is not installed here (it needs the main environment's torch and modelopt): its
# results module has no dependencies and is loaded from its file.
_spec = importlib.util.spec_from_file_location("engine_loads", ROOT / "moe_unfuse" / "tools" / "engine_loads.py")
engine_loads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_loads)


@pytest.fixture(scope="session")
def unquantized() -> dict[str, vllm_loader.LoadResult]:
    """source folder -> what the loader did with it (each loaded once, for the first export that fails)."""
    return {}


@pytest.fixture(scope="session")
def results(request: pytest.FixtureRequest):
    """arch -> qformat -> outcome, written to engine_loads.json at the end under ``--update-results``
    (families this run did not export, ``make_exports.py --arch``, keep their recorded outcomes when
    the vLLM version is the same)."""
    found: dict[str, dict[str, dict[str, str]]] = {}
    yield found
    if request.config.getoption("--update-results"):
        data = json.loads(engine_loads.LOADS_PATH.read_text()) if engine_loads.LOADS_PATH.is_file() else {}
        old = data.get("vllm") or {}
        archs = dict(old.get("archs") or {}) if old.get("version") == vllm.__version__ else {}
        archs.update({a: dict(sorted(found[a].items())) for a in found})
        data["vllm"] = {
            "version": vllm.__version__,
            "written_by": "tests_vllm/test_vllm_loader.py --update-results",
            "archs": dict(sorted(archs.items())),
        }
        engine_loads.LOADS_PATH.write_text(json.dumps(data, indent=1) + "\n")


def test_export_through_vllm_loader(
    entry: dict, results: dict, unquantized: dict, request: pytest.FixtureRequest
) -> None:
    path = Path(entry["root"]) / entry["path"]
    arch_name = json.loads((path / "config.json").read_text())["architectures"][0]
    if not vllm_loader.registered(arch_name):
        outcome = {
            "status": engine_loads.NOT_REGISTERED,
            "reason": f"vLLM {vllm.__version__}'s registry has no {arch_name}",
        }
    else:
        r = vllm_loader.load(path)
        failed = engine_loads.FAILS if r.phase == "weights" else engine_loads.NOT_BUILT
        outcome = {"status": engine_loads.LOADS} if r.loads else {"status": failed, "reason": r.reason()}
        if failed == engine_loads.FAILS and not r.loads:
            source = Path(entry["root"]) / entry["source"]
            if str(source) not in unquantized:
                unquantized[str(source)] = vllm_loader.load(source)
            u = unquantized[str(source)]
            if not u.loads:
                outcome = {"status": engine_loads.FAILS_UNQUANTIZED, "reason": u.reason()}
    if entry["engine"] != "vllm":
        # An export for another engine that vLLM cannot serve: the loader fails and verify refuses it.
        assert outcome["status"] == engine_loads.FAILS, f"{entry['path']} loads in vLLM; drop its export.engines.vllm"
        assert not entry["verify_vllm"], f"verify --engine vllm passes {entry['path']}, which vLLM fails: {outcome}"
        return
    notes = [f"{', '.join(entry['kept_unquantized'])} left BF16"] if entry["kept_unquantized"] else []
    notes += [f"{', '.join(entry['quantized_for_engine'])} quantized"] if entry["quantized_for_engine"] else []
    if notes:
        outcome["note"] = f"{' and '.join(notes)} for vLLM per the spec's export.engines"
    results.setdefault(entry["arch"], {})[entry["qformat"]] = outcome
    if request.config.getoption("--update-results"):
        return
    recorded = engine_loads.load_result("vllm", entry["arch"], entry["qformat"])
    assert recorded is not None and recorded["status"] == outcome["status"], (
        f"{entry['path']}: vLLM {vllm.__version__}'s loader now says {outcome}, engine_loads.json {recorded}; "
        "fix: rerun with --update-results and regenerate the README table"
    )
    if outcome["status"] == engine_loads.LOADS:
        assert entry["verify_vllm"], (
            f"{entry['path']}: verify --engine vllm {'passes' if entry['verify_vllm'] else 'fails'} "
            f"({entry['verify_vllm_failed']}) but the loader says {outcome}"
        )


def test_a_missing_expert_slice_is_caught(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The sentinel check sees what vLLM's own check cannot: one expert's up_proj missing leaves half of
    that expert's rows of the shared ``w13_weight`` unwritten, while the parameter counts as loaded."""
    import shutil

    from conftest import manifest
    from safetensors.torch import load_file, save_file

    data = manifest(request.config)
    source = Path(data["root"]) / "qwen3_moe" / "fp8"
    if not source.is_dir():
        pytest.skip("no qwen3_moe fp8 export in --exports (run make_exports.py without --arch)")
    shutil.copytree(source, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.1.up_proj.weight"]
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    result = vllm_loader.load(tmp_path / "ckpt")
    assert not result.loads
    # vLLM names the fused parameter under the experts module, or under its routed_experts child
    w13 = re.compile(r"model\.layers\.0\.mlp\.experts\.(routed_experts\.)?w13_weight \(")
    assert any(w13.match(n) for n in result.not_written), result.reason()
