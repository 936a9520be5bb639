"""Export a quantized, unfused model to a HF checkpoint the serving engines load, then verify it.

modelopt's ``export_hf_checkpoint`` writes the per-expert keys (``...experts.{E}.{gate,up,down}_proj.
{weight,weight_scale,weight_scale_2,input_scale}``) and ``hf_quant_config.json``. On top of that:

- ``--refuse-unquantized``: experts modules left unquantized are written back as the model's own
  fused tensors, rebuilt from the exported per-expert weights with the spec's layout reverse
  (``Layout.refuse``), so ``from_pretrained`` loads them into an identical model;
- the spec's ``export.renames`` for the target engine are applied to every key and to the
  module names in ``exclude_modules`` (``hf_quant_config.json``) and ``ignore`` (``config.json``);
- modules that must stay unquantized (routers, towers, projectors, lm_head, excluded experts) are
  added to those lists under their final names when modelopt's list misses them;
- ``moe_unfuse.json`` records the job (qformat, engine, specs, expert modules, routing counts).

The checkpoint is written to ``<out>.partial``, verified (:func:`moe_unfuse.verify.verify_checkpoint`)
and only then moved to ``<out>``; a checkpoint that fails verification is kept at ``<out>.invalid``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import MoeUnfuseError
from .spec import Spec

METADATA_FILE = "moe_unfuse.json"
#: Module-name regexes (searched) of modules that engines load unquantized.
KEEP_UNQUANTIZED_RE = re.compile(r"(^|\.)(router|lm_head|vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector|vision_model|visual|mm_projector)(\.|$)")
#: A key under an experts module (``experts``, ``experts.``, ``shared_experts.``, ...): with 3+ dims, a fused expert tensor.
FUSED_EXPERT_KEY_RE = re.compile(r"(^|\.|_)experts?(\.|$)")
EXPERT_KEY_RE = re.compile(r"^(?P<prefix>.*?\.?experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?P<suffix>[A-Za-z0-9_]+)$")
SCALE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "weight_scale_inv", "pre_quant_scale")


def engine_renames(specs: Iterable[Spec], engine: str) -> list[tuple[re.Pattern, str]]:
    """The ``export.renames`` of ``specs`` that apply to ``engine``, compiled, in spec order."""
    out = []
    for spec in specs:
        for r in spec.renames:
            if r.get("engine") in (engine, "*", None):
                out.append((re.compile(r["match"]), r["replace"]))
    return out


def rename_key(key: str, renames: Sequence[tuple[re.Pattern, str]]) -> str:
    for pattern, replace in renames:
        key = pattern.sub(replace, key)
    return key


def rename_module(name: str, renames: Sequence[tuple[re.Pattern, str]]) -> str:
    """A module name (or an ``exclude_modules`` pattern) renamed as its keys are: renames match
    ``.experts.{E}.`` with a trailing dot, which a module name ``...experts.3`` lacks."""
    return rename_key(name + ".", renames)[:-1]


def excluded(name: str, patterns: Iterable[str]) -> bool:
    """Whether module ``name`` is covered by ``exclude_modules``: a glob match, or the name or one of
    its parents listed exactly (how vLLM and TRT-LLM read the list)."""
    for p in patterns:
        if name == p or name.startswith(p + ".") or ("*" in p or "?" in p or "[" in p) and fnmatch.fnmatchcase(name, p):
            return True
    return False


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write over a non-empty ``out`` unless ``overwrite``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MoeUnfuseError(f"--out {out} exists and is not empty; fix: pass --overwrite or another --out")


# ----------------------------------------------------------------------------------------------
# which experts modules stay unquantized


def _is_quantized(linear: nn.Module) -> bool:
    q = getattr(linear, "weight_quantizer", None)
    return q is not None and bool(getattr(q, "is_enabled", False))


@dataclass
class RefuseTarget:
    """An unquantized experts module to write back in its fused layout."""

    path: str
    spec: Spec
    num_experts: int
    rests: dict[str, torch.Tensor] = field(default_factory=dict)  # rows a Narrow layout set aside


def refuse_targets(model: nn.Module) -> tuple[list[RefuseTarget], list[str]]:
    """(targets, skipped): experts modules whose every per-expert linear is unquantized, and the
    paths of those that cannot be re-fused (partly quantized, or a layout without a tensor reverse)."""
    from .calibration import unfused_experts
    from .layout import Narrow

    targets, skipped = [], []
    for path, module in unfused_experts(model):
        st = module._moe_unfuse
        linears = [getattr(expert, proj, None) for expert in module for proj in st.spec.projection_names()]
        if any(lin is None for lin in linears):
            skipped.append(f"{path} (not a gate/up/down expert)")
            continue
        if any(_is_quantized(lin) for lin in linears):
            if not all(_is_quantized(lin) for lin in linears):
                skipped.append(f"{path} (partly quantized)")
            continue
        target = RefuseTarget(path, st.spec, st.num_experts)
        ok = True
        for p in st.spec.params:
            layout = p.layout(st.num_experts)
            if p.packing == "separate":
                ok = False
            elif any(isinstance(op, Narrow) for op in layout.prepare):
                rest = layout.rest(st.originals[p.name])
                if rest is None or rest.device.type == "meta":
                    ok = False
                else:
                    target.rests[p.name] = rest.detach().clone()
        if ok:
            targets.append(target)
        else:
            skipped.append(f"{path} (layout has no single-tensor reverse)")
    return targets, skipped


# ----------------------------------------------------------------------------------------------
# post-processing the written checkpoint


def shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, for a sharded one, its index weight_map."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / f for f in weight_map.values()}), weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MoeUnfuseError(f"{path}: no *.safetensors files; fix: point at a checkpoint folder written by save_pretrained/export")
    return files, None


def _refuse_tensors(target: RefuseTarget, prefix: str, get: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fused tensors of ``target`` from its exported per-expert tensors (``get(key)``); and the keys used."""
    fused: dict[str, torch.Tensor] = {}
    used: list[str] = []
    for p in target.spec.params:
        layout = p.layout(target.num_experts)
        for attr, name, lay in ((p.name, "weight", layout), *(((p.bias, "bias", p.bias_layout()),) if p.bias else ())):
            keys = [[f"{prefix}.{e}.{proj}.{name}" for e in range(target.num_experts)] for proj in p.into]
            pieces = [[get(k) for k in row] for row in keys]
            rest = target.rests.get(p.name) if name == "weight" else None
            fused[f"{prefix}.{attr}"] = lay.refuse(pieces, rest) if rest is not None else lay.refuse(pieces)
            used.extend(k for row in keys for k in row)
    return fused, used


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    path: Path
    engine: str
    qformat: str
    files: list[str]
    bytes_after: int
    renamed: int
    renames: list[str]
    refused: list[str]
    refuse_skipped: list[str]
    exclusions_added: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["path"] = str(self.path)
        return d

    def summary(self) -> str:
        parts = [f"{len(self.files)} safetensors file(s)"]
        if self.renames:
            parts.append(f"{self.renamed} keys renamed for {self.engine} ({'; '.join(self.renames)})")
        else:
            parts.append(f"no renames for {self.engine}")
        if self.refused:
            parts.append(f"{len(self.refused)} unquantized experts module(s) re-fused")
        if self.refuse_skipped:
            parts.append(f"not re-fused: {', '.join(self.refuse_skipped)}")
        if self.exclusions_added:
            parts.append(f"added to exclude_modules: {', '.join(self.exclusions_added)}")
        return "; ".join(parts)


def _collapse_expert_names(names: Iterable[str]) -> list[str]:
    """``a.experts.3.up_proj`` ... -> ``a.experts.*`` so a whole excluded layer is one entry."""
    out: list[str] = []
    for n in sorted(set(names)):
        m = re.match(r"^(.*\.experts)\.\d+(\.|$)", n)
        entry = f"{m.group(1)}.*" if m else n
        if entry not in out:
            out.append(entry)
    return out


def postprocess_checkpoint(
    path: Path,
    renames: Sequence[tuple[re.Pattern, str]],
    targets: Sequence[RefuseTarget] = (),
    progress: bool = True,
) -> tuple[int, list[str], list[str]]:
    """Re-fuse ``targets``, rename keys, and fix ``exclude_modules``/``ignore`` in place (each shard
    is rewritten through a temporary file, so an interrupted run leaves no half-written shard).
    Returns (keys renamed, modules re-fused, exclusions added)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    files, weight_map = shard_files(path)
    where: dict[str, Path] = {}
    meta: dict[Path, dict[str, str]] = {}
    for f in files:
        with safe_open(f, "pt") as fh:
            meta[f] = fh.metadata() or {}
            for k in fh.keys():
                where[k] = f

    def get(key: str) -> torch.Tensor:
        if key not in where:
            raise MoeUnfuseError(f"{path}: cannot re-fuse, {key} is missing; fix: export without --refuse-unquantized and report this")
        with safe_open(where[key], "pt") as fh:
            return fh.get_tensor(key)

    added: dict[Path, dict[str, torch.Tensor]] = {f: {} for f in files}
    dropped: set[str] = set()
    refused: list[str] = []
    for t in targets:
        fused, used = _refuse_tensors(t, t.path, get)
        home = where[used[0]]
        added[home].update(fused)
        dropped.update(used)
        refused.append(t.path)

    renamed = 0
    new_map: dict[str, str] = {}
    fused_modules: set[str] = set()
    for f in tqdm(files, desc="post-processing shards", unit="file", disable=not progress, leave=False):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                if k in dropped:
                    continue
                new = rename_key(k, renames)
                renamed += new != k
                tensors[new] = fh.get_tensor(k)
        tensors.update(added[f])
        fused_modules.update(k.rsplit(".", 1)[0] for k, t in tensors.items() if t.dim() >= 3 and FUSED_EXPERT_KEY_RE.search(k))
        tmp = f.with_name(f.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta[f] or {"format": "pt"})
        os.chmod(tmp, f.stat().st_mode & 0o777)
        os.replace(tmp, f)
        new_map.update({k: f.name for k in tensors})
    if weight_map is not None:
        index_path = path / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict(sorted(new_map.items()))
        index_path.write_text(json.dumps(index, indent=2) + "\n")

    exclusions = _fix_exclusions(path, renames, refused, new_map, fused_modules)
    return renamed, refused, exclusions


def unquantized_modules(keys: Iterable[str]) -> set[str]:
    """Module names whose ``weight`` is in ``keys`` without any scale next to it."""
    keys = set(keys)
    return {k[: -len(".weight")] for k in keys if k.endswith(".weight") and not any(f"{k[: -len('.weight')]}.{s}" in keys for s in SCALE_SUFFIXES)}


def must_exclude(keys: Iterable[str]) -> set[str]:
    """Unquantized modules an engine must be told about: routers, towers, projectors, lm_head, experts."""
    return {m for m in unquantized_modules(keys) if KEEP_UNQUANTIZED_RE.search(m) or re.search(r"\.experts\.\d+\.", m + ".")}


def _fix_exclusions(path: Path, renames: Sequence[tuple[re.Pattern, str]], refused: Sequence[str], keys: Iterable[str], fused_modules: Iterable[str] = ()) -> list[str]:
    """Rename the exclude list, and add what must be excluded but is not: re-fused experts, fused
    expert tensors left in place (``--allow-uncovered``: they stay in their original dtype), lm_head,
    and every module :func:`must_exclude` finds. Writes both configs; returns the entries added."""
    hf_path, cfg_path = path / "hf_quant_config.json", path / "config.json"
    if not hf_path.is_file():
        return []  # not quantized: nothing is excluded from anything
    hf = json.loads(hf_path.read_text())
    quant = hf.setdefault("quantization", {})
    original = list(quant.get("exclude_modules") or [])
    final = []
    for name in original:
        n = rename_module(name, renames)
        if n not in final:
            final.append(n)
    for name in [*refused, *sorted(fused_modules)]:
        if not excluded(name, final):
            final.append(name)
    if "lm_head" not in final:
        final.append("lm_head")
    missing = sorted(m for m in must_exclude(keys) if not excluded(m, final))
    added = _collapse_expert_names(missing)
    final.extend(a for a in added if a not in final)
    added_all = [n for n in final if n not in original]
    quant["exclude_modules"] = final
    hf_path.write_text(json.dumps(hf, indent=4) + "\n")
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        qc = cfg.get("quantization_config")
        if isinstance(qc, dict):
            qc["ignore"] = list(final)
            if "exclude_modules" in qc:
                qc["exclude_modules"] = list(final)
            cfg_path.write_text(json.dumps(cfg, indent=4) + "\n")
    return added_all


# ----------------------------------------------------------------------------------------------
# the export


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the warnings modelopt and transformers print on every run that say nothing about this one
    (untested-version notice, torch_dtype deprecation, tensor copy-construct)."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        for message in ("transformers .* is not tested", "To copy construct from a tensor", ".*torch_dtype.* is deprecated"):
            warnings.filterwarnings("ignore", message=message)
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-unfuse")
    except PackageNotFoundError:
        return "0+local"


def _expert_prefixes(model: nn.Module, renames: Sequence[tuple[re.Pattern, str]], refused: Iterable[str]) -> dict[str, dict[str, Any]]:
    from .calibration import unfused_experts

    refused = set(refused)
    out = {}
    for path, module in unfused_experts(model):
        st = module._moe_unfuse
        final = path if path in refused else rename_key(f"{path}.0.", renames)[: -len(".0.")]
        out[final] = {"module": path, "arch": st.spec.arch, "experts": st.num_experts, "projections": list(st.spec.projection_names()), "fused": path in refused}
    return out


def export_checkpoint(
    model: nn.Module,
    out: Path,
    *,
    engine: str = "vllm",
    specs: Sequence[Spec] = (),
    refuse_unquantized: bool = False,
    tokenizer: Any = None,
    qformat: str = "",
    routing: Any = None,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[ExportResult, Any]:
    """Export ``model`` (quantized by :func:`moe_unfuse.quantize.quantize_model`) to ``out`` and verify it.

    A non-empty ``out`` is an error unless ``overwrite`` (then it is replaced once the new export passes).

    Returns (ExportResult, VerifyReport). On a failed verification the checkpoint is moved to
    ``<out>.invalid`` instead of ``out`` (``ExportResult.path`` says where).
    """
    from modelopt.torch.export import export_hf_checkpoint

    from .verify import verify_checkpoint

    out = Path(out)
    prepare_out_dir(out, overwrite)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]  # modelopt's export needs it
    staging = out.with_name(out.name + ".partial")
    invalid = out.with_name(out.name + ".invalid")
    for d in (staging, invalid):
        if d.exists():
            shutil.rmtree(d)
    renames = engine_renames(specs, engine)
    targets, skipped = refuse_targets(model) if refuse_unquantized else ([], [])
    experts = _expert_prefixes(model, renames, [t.path for t in targets])
    with quiet():
        export_hf_checkpoint(model, export_dir=staging)
    renamed, refused, exclusions = postprocess_checkpoint(staging, renames, targets, progress)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    metadata = {
        "producer": f"moe_unfuse {_version()}",
        "qformat": qformat,
        "engine": engine,
        "specs": [{"arch": s.arch, "class": s.target_class, "renames": [dict(r) for r in s.renames]} for s in specs],
        "experts": experts,
        "refused": refused,
        "routing": routing.to_dict() if routing is not None else None,
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    report = verify_checkpoint(staging, engine=engine)
    target = out if report.ok else invalid
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    staging.rename(target)
    report.path = target
    files, _ = shard_files(target)
    result = ExportResult(
        path=target, engine=engine, qformat=qformat, files=[f.name for f in files],
        bytes_after=sum(f.stat().st_size for f in files), renamed=renamed,
        renames=[f"{p.pattern} -> {r}" for p, r in renames], refused=refused, refuse_skipped=skipped, exclusions_added=exclusions,
    )
    return result, report


# ----------------------------------------------------------------------------------------------
# size estimate


def _quantizer_enabled(name: str, quant_cfg: Any) -> bool:
    """Whether modelopt's list-form ``quant_cfg`` enables quantizer ``name`` (later entries win;
    ``parent_class`` entries target non-Linear classes and are ignored here)."""
    enabled = False
    for entry in quant_cfg:
        if "parent_class" in entry or not fnmatch.fnmatchcase(name, entry["quantizer_name"]):
            continue
        enabled = entry.get("enable", True)
    return enabled


def estimate_tensor_bytes(model: nn.Module, qformat: str, exclude: Iterable[str] = ()) -> int:
    """Bytes of tensors an export of ``model`` in ``qformat`` holds, without quantizing anything:
    ``model`` may live on the meta device (a full-size config costs no memory). Linears (fused
    experts counted per expert) whose weight quantizer the qformat's config enables take FP8
    (1 B/weight + weight/input scale) or NVFP4 (0.5 B/weight + one FP8 scale per 16 + two fp32
    scalars); everything else keeps its dtype; tied weights count once."""
    from .coverage import expert_count, find_fused_params
    from .quantize import build_quant_config

    cfg = build_quant_config(qformat, exclude)
    quant_cfg = cfg["quant_cfg"] if cfg else []
    fp4 = "fp4" in qformat
    weight_only = qformat.startswith("w4a16")

    def linear_bytes(qname: str, out_f: int, in_f: int, dtype_size: int) -> int:
        if not _quantizer_enabled(f"{qname}.weight_quantizer", quant_cfg):
            return out_f * in_f * dtype_size
        scalars = (0 if weight_only else 1) + (1 if fp4 else 1)  # input_scale; weight_scale_2 (fp4) or weight_scale (fp8)
        if fp4:
            return out_f * in_f // 2 + out_f * (in_f // 16) + 4 * scalars
        return out_f * in_f + 4 * scalars

    fused = {f.path: f for f in find_fused_params(model)}
    total = 0
    for name, p in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        size = p.element_size()
        f = fused.get(name)
        if f is not None and f.spec is not None:
            ps = f.spec.param(leaf)
            parts = ps.layout(expert_count(f.module) or p.shape[0]).unfuse(torch.empty(p.shape, device="meta"))
            for proj, experts in zip(ps.into, parts):
                for e, w in enumerate(experts):
                    total += linear_bytes(f"{module_path}.{e}.{proj}", w.shape[0], w.shape[1], size)
            continue
        owner = model.get_submodule(module_path) if module_path else model
        if isinstance(owner, nn.Linear) and leaf == "weight":
            total += linear_bytes(module_path, p.shape[0], p.shape[1], size)
        else:
            total += p.numel() * size
    for path, module in model.named_modules():
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                total += b.numel() * b.element_size()
    return total
