"""Export a quantized, unfused model to a HF checkpoint the serving engines load, then verify it.

modelopt's ``export_hf_checkpoint`` writes the per-expert keys and ``hf_quant_config.json`` (run
under :mod:`.export_context`). Then, following the naming contract (:mod:`moe_unfuse.hub.naming`),
:func:`moe_unfuse.quant.postprocess.postprocess_checkpoint` names every key as the hub does:

- experts whose spec declares ``export.layout: fused`` (GPT-OSS), and with ``--fuse-unquantized``
  experts left unquantized whose hub checkpoint is fused, are re-stacked into the hub's fused
  tensors (:mod:`.restack`);
- a spec's ``export.renames`` for the target engine (none ship today) apply to keys and exclude lists
  (:mod:`.renaming`);
- modules that must stay unquantized are added to ``exclude_modules`` and ``ignore`` (:mod:`.exclusions`);
- the source checkpoint's config, dtypes and the tensors the model places nowhere are kept
  (:mod:`moe_unfuse.hub.from_source`);
- ``moe_unfuse.json`` records the job (qformat, engine, specs, expert modules, routing counts).

The checkpoint is written to ``<out>.partial`` under a lock on ``<out>``, verified
(:func:`moe_unfuse.hub.verify.verify_checkpoint`), then swapped into ``<out>`` atomically (a good earlier
``<out>`` stays in place until then: :mod:`.out_dir`). A checkpoint that fails verification, or an
export that fails on the way, is left at ``<out>.invalid`` with ``moe_unfuse.json`` saying why.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..base.errors import MoeUnfuseError, first_line
from ..hub.checkpoint import METADATA_FILE, shard_files
from ..hub.from_source import carry_source_tensors, keep_source_config, source_dtypes
from ..hub.naming import model_contract
from ..hub.verify import verify_checkpoint
from ..plugins.manager import registry
from ..spec.model import Spec
from . import renaming  # renaming.engine_renames is looked up at call time, where a test patches it
from .export_context import device_when_offloaded, no_carried_expert_sources, own_names_when_modelopt_disagrees, quiet
from .out_dir import out_lock, prepare_out_dir, replace_dir, umask
from .postprocess import postprocess_checkpoint
from .restack import plan_restacks
from .streaming import streaming_export


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
    fused_back: list[str]
    fuse_skipped: list[str]
    exclusions_added: list[str]
    fused: list[str] = field(default_factory=list)  # quantized experts written in the hub's fused layout
    source_dtypes: int = 0  # unquantized tensors written back in the source checkpoint's dtype

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["path"] = str(self.path)
        return d

    def summary(self) -> str:
        parts = [f"{len(self.files)} safetensors file(s), hub names"]
        if self.renames:
            parts.append(f"{self.renamed} keys renamed for {self.engine} ({'; '.join(self.renames)})")
        if self.fused:
            parts.append(f"{len(self.fused)} quantized experts module(s) in the hub's fused layout")
        if self.fused_back:
            parts.append(f"{len(self.fused_back)} unquantized experts module(s) fused back")
        if self.source_dtypes:
            parts.append(f"{self.source_dtypes} unquantized tensor(s) kept in their source dtype (upcast on load)")
        if self.fuse_skipped:
            parts.append(f"not fused back: {', '.join(self.fuse_skipped)}")
        if self.exclusions_added:
            shown = ", ".join(self.exclusions_added[:6]) + (
                f" (+{len(self.exclusions_added) - 6} more)" if len(self.exclusions_added) > 6 else ""
            )
            parts.append(f"added to exclude_modules: {shown}")
        return "; ".join(parts)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-unfuse")
    except PackageNotFoundError:
        return "0+local"


def export_checkpoint(
    model: nn.Module,
    out: Path,
    *,
    engine: str = "vllm",
    specs: Sequence[Spec] = (),
    fuse_unquantized: bool = False,
    tokenizer: Any = None,
    qformat: str = "",
    routing: Any = None,
    fallbacks: Sequence[Any] = (),
    progress: bool = True,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
    locked: bool = False,
    source: Path | str | None = None,
) -> tuple[ExportResult, Any]:
    """Export ``model`` (quantized by :func:`moe_unfuse.quant.quantize.quantize_model`) to ``out`` and verify it.

    A non-empty ``out`` is an error unless ``overwrite`` (then it is replaced once the new export passes).
    ``fallbacks``: input amax substitutes (:class:`moe_unfuse.quant.calibration.ScaleFallback`), each recorded in
    ``moe_unfuse.json``. ``max_shard_size``: modelopt's shard size (its default, 10GB, when None); an
    offloaded model is streamed one layer at a time, holding one shard in memory. ``locked``: the
    caller already holds :func:`~moe_unfuse.quant.out_dir.out_lock` on ``out`` (taken before the model was loaded). ``source``:
    the folder ``model`` was loaded from; its config.json (and generation_config.json) are written
    back with only the quantization entries changed (:data:`~moe_unfuse.hub.from_source.QUANT_CONFIG_KEYS`), and every unquantized
    tensor keeps its dtype there.

    Returns (ExportResult, VerifyReport). On a failed verification the checkpoint is moved to
    ``<out>.invalid`` instead of ``out`` (``ExportResult.path`` says where). An error on the way
    leaves ``<out>.invalid`` with ``moe_unfuse.json`` naming it and raises a one-line
    :class:`MoeUnfuseError`.
    """
    out = Path(out)
    prepare_out_dir(out, overwrite)
    with nullcontext() if locked else out_lock(out):
        return _export_locked(
            model,
            out,
            engine,
            list(specs),
            fuse_unquantized,
            tokenizer,
            qformat,
            routing,
            list(fallbacks),
            progress,
            max_shard_size,
            Path(source) if source is not None else None,
        )


def _export_locked(
    model: nn.Module,
    out: Path,
    engine: str,
    specs: list[Spec],
    fuse_unquantized: bool,
    tokenizer: Any,
    qformat: str,
    routing: Any,
    fallbacks: list[Any],
    progress: bool,
    max_shard_size: int | str | None,
    source: Path | None,
) -> tuple[ExportResult, Any]:
    from modelopt.torch.export import export_hf_checkpoint

    registry().backends["modelopt"].prepare_export()
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]  # modelopt's export needs it
    staging = out.with_name(out.name + ".partial")
    invalid = out.with_name(out.name + ".invalid")
    for d in (staging, invalid):
        if d.exists():
            shutil.rmtree(d)
    metadata: dict[str, Any] = {
        "producer": f"moe_unfuse {_version()}",
        "qformat": qformat,
        "engine": engine,
        "specs": [
            {
                "arch": s.arch,
                "class": s.target_class,
                "export_layout": s.export_layout,
                "renames": [dict(r) for r in s.renames],
            }
            for s in specs
        ],
    }
    step = "naming contract"
    try:
        contract = model_contract(model, specs)
        renames = renaming.engine_renames(specs, engine)
        targets, skipped = plan_restacks(model, contract, fuse_unquantized)
        step = "modelopt export_hf_checkpoint"
        with (
            quiet(),
            redirect_stdout(io.StringIO()),
            no_carried_expert_sources(contract),
            own_names_when_modelopt_disagrees(model, contract),
            device_when_offloaded(model),
            streaming_export(model),
        ):  # modelopt's prints say nothing the report does not
            shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            export_hf_checkpoint(model, export_dir=staging, **shards)
        step = "post-processing"
        dtypes = source_dtypes(source, contract) if source is not None else {}
        carried = carry_source_tensors(staging, source, contract) if source is not None else []
        contract.carried = frozenset(carried)
        renamed, fused_back, exclusions, restored = postprocess_checkpoint(
            staging, renames, targets, progress, contract, dtypes
        )
        if source is not None:
            keep_source_config(staging, source)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        restacked = {t.naming.hub for t in targets}
        metadata.update(
            {
                "experts": {
                    label: {
                        **e.to_dict(),
                        "fused": e.hub in restacked,
                        "quantized_fused": e.hub in restacked and e.hub not in fused_back,
                    }
                    for label, e in contract.experts.items()
                },
                "fused_back": fused_back,
                "carried_from_source": carried,
                "routing": routing.to_dict() if routing is not None else None,
                "input_scale_fallbacks": [vars(f) for f in fallbacks],
            }
        )
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        step = "verification"
        report = verify_checkpoint(staging, engine=engine)
    except (Exception, KeyboardInterrupt) as exc:
        staging.mkdir(parents=True, exist_ok=True)
        metadata["error"] = {"step": step, "message": first_line(exc, 300, with_type=True)}
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        staging.rename(invalid)
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, MoeUnfuseError):
            raise MoeUnfuseError(
                f"export to {out} failed in {step} ({exc}); the partial export is at {invalid}"
            ) from None
        raise MoeUnfuseError(
            f"export to {out} failed in {step} ({first_line(exc, 300, with_type=True)}); the partial export is at {invalid}; fix: report this with {invalid / METADATA_FILE}"
        ) from None
    for f in staging.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask())
    if report.ok:
        replace_dir(staging, out)
        target = out
    else:
        staging.rename(invalid)
        target = invalid
    report.path = target
    files, _ = shard_files(target)
    result = ExportResult(
        path=target,
        engine=engine,
        qformat=qformat,
        files=[f.name for f in files],
        bytes_after=sum(f.stat().st_size for f in files),
        renamed=renamed,
        renames=[f"{p.pattern} -> {r}" for p, r in renames],
        fused_back=fused_back,
        fuse_skipped=skipped,
        exclusions_added=exclusions,
        fused=sorted(h for h in restacked if h not in fused_back),
        source_dtypes=restored,
    )
    return result, report
