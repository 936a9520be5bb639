"""Export a quantized, unfused model to a HF checkpoint the serving engines load, then verify it.

modelopt's ``export_hf_checkpoint`` writes the per-expert keys and ``hf_quant_config.json``, and
reverses transformers' load-time conversion so names are the hub checkpoint's own (the moe_unfuse
handlers in its export registries make that work for every spec: see ``modelopt_backend``). Then,
following the naming contract (:mod:`moe_unfuse.naming`):

- experts whose spec declares ``export.layout: fused`` (GPT-OSS) are re-stacked into the hub's fused
  tensors through the spec's layout reverse, quantized weights and per-block scales alike, with
  modelopt's fused-tensor scale names (``{param}_weight_scale`` ...);
- ``--fuse-unquantized``: experts left unquantized whose hub checkpoint is fused are written back
  in that fused layout (``Layout.refuse``), so ``from_pretrained`` loads them into an identical model;
- a spec's ``export.renames`` for the target engine (none ship today) apply to keys and exclude lists;
- modules that must stay unquantized (routers, towers, projectors, lm_head, excluded experts) are
  added to ``exclude_modules`` and ``ignore`` under their final names, as ``prefix*`` patterns
  every engine version matches;
- ``moe_unfuse.json`` records the job (qformat, engine, specs, expert modules, routing counts).

The checkpoint is written to ``<out>.partial`` under a lock on ``<out>``, verified
(:func:`moe_unfuse.verify.verify_checkpoint`), then swapped into ``<out>`` atomically (a good earlier
``<out>`` stays in place until then). A checkpoint that fails verification, or an export that fails
on the way, is left at ``<out>.invalid`` with ``moe_unfuse.json`` saying why.
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import json
import os
import re
import shutil
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .calibration import input_device, unfused_experts
from .checkpoint import (
    FUSED_EXPERT_KEY_RE,
    METADATA_FILE,
    SCALE_SUFFIXES,
    STACKED_SCALES,
    excluded,
    must_exclude,
    shard_files,
)
from .default_plugins.modelopt_backend import install_export_handlers
from .errors import MoeUnfuseError, first_line
from .experts import unfuse_state
from .layout import Narrow
from .naming import ExpertsNaming, NamingContract, model_contract
from .spec import Spec
from .verify import verify_checkpoint


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


def prepare_out_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse to write over a non-empty ``out`` unless ``overwrite``, and ever over (or into) the
    model being quantized."""
    if source is not None:
        src, dst = Path(source).resolve(), Path(out).resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise MoeUnfuseError(
                f"--out {out} is, contains or lies inside MODEL {source}; fix: write the checkpoint to a folder outside the model"
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MoeUnfuseError(f"--out {out} exists and is not empty; fix: pass --overwrite or another --out")


@contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on ``<out>.lock`` for the whole export: a second run on the same ``--out``
    fails at once instead of sharing ``<out>.partial``."""
    lock = out.with_name(out.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MoeUnfuseError(
                f"--out {out}: another moe-unfuse run is writing it (lock {lock}); fix: wait for it, or pass another --out"
            ) from None
        yield
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` at ``out``: at every moment ``out`` is the old complete
    checkpoint or the new one (an atomic exchange), then the old one is removed."""
    if out.is_dir() and _exchange(new, out):
        shutil.rmtree(new)  # ``new`` now holds the old checkpoint
        return
    if out.is_dir():  # no atomic exchange here: the old one moves aside first, and back on failure
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        try:
            new.rename(out)
        except OSError:
            old.rename(out)
            raise
        shutil.rmtree(old)
        return
    if out.exists():
        out.unlink()
    new.rename(out)


# ----------------------------------------------------------------------------------------------
# which experts modules are re-stacked into fused tensors


def _is_quantized(linear: nn.Module) -> bool:
    q = getattr(linear, "weight_quantizer", None)
    return q is not None and bool(getattr(q, "is_enabled", False))


@dataclass
class Restack:
    """An experts module written in its hub's fused layout: ``quantized`` ones because the spec's
    export layout is fused, unquantized ones for ``--fuse-unquantized``."""

    naming: ExpertsNaming
    spec: Spec
    quantized: bool
    to_hub: Callable[[dict], dict]  # in-memory fused tensors -> the hub's names and layout
    hub_key: Callable[[str], str]  # an in-memory per-expert key -> the name the export wrote it under
    rests: dict[str, torch.Tensor] = field(default_factory=dict)  # rows a Narrow layout set aside


def plan_restacks(
    model: nn.Module, contract: NamingContract, fuse_unquantized: bool
) -> tuple[list[Restack], list[str]]:
    """(restacks, skipped): experts modules to write fused, and why others that asked could not be."""

    by_module = {e.module: e for e in contract.experts.values()}
    targets, skipped = [], []
    for path, module in unfused_experts(model):
        st = unfuse_state(module)
        naming = by_module.get(path)
        has_rest = any(isinstance(op, Narrow) for p in st.spec.params for op in p.layout(st.num_experts).prepare)
        if naming is None or not naming.hub_fused and not has_rest:
            continue  # stored per expert in the hub: the per-expert keys are its names
        linears = [getattr(expert, proj, None) for expert in module for proj in st.spec.projection_names()]
        if any(lin is None for lin in linears):
            if naming.layout == "fused" or fuse_unquantized:
                skipped.append(f"{path} (not a gate/up/down expert)")
            continue
        quantized = [_is_quantized(lin) for lin in linears]
        if any(quantized) and not all(quantized):
            skipped.append(f"{path} (partly quantized)")
            continue
        if all(quantized) and naming.layout != "fused":
            continue
        if not all(quantized) and not (fuse_unquantized or naming.layout == "fused" or not naming.hub_fused):
            continue  # (unquantized per-expert hub names with rows set aside: written with those rows, so it reloads)
        target = Restack(naming, st.spec, all(quantized), contract.to_hub, contract.hub_key)
        ok = True
        for p in st.spec.params:
            layout = p.layout(st.num_experts)
            if p.packing == "separate":
                ok = False
            elif any(isinstance(op, Narrow) for op in layout.prepare):
                rest = layout.rest(st.originals[p.name])
                if target.quantized or rest is None or rest.device.type == "meta":
                    ok = False
                else:
                    target.rests[p.name] = rest.detach().clone()
        if ok:
            targets.append(target)
        elif naming.layout == "fused":
            raise MoeUnfuseError(
                f"{st.spec.source}: export.layout: fused, but {path}'s layout has no single-tensor reverse; fix: use export.layout: per_expert"
            )
        else:
            skipped.append(f"{path} (layout has no single-tensor reverse)")
    return targets, skipped


# ----------------------------------------------------------------------------------------------
# post-processing the written checkpoint


def _stack_scalars(values: list[list[torch.Tensor]], name: str) -> torch.Tensor:
    """One 0-d scale when every expert and projection agrees, else one per expert ``[E]`` when the
    projections of each expert agree (gate and up share one fused row block)."""
    flat = [v.reshape(()) for row in values for v in row]
    if all(torch.equal(v, flat[0]) for v in flat):
        return flat[0].clone()
    per_expert = values[0]
    if all(torch.equal(a.reshape(()), b.reshape(())) for row in values[1:] for a, b in zip(per_expert, row)):
        return torch.stack([v.reshape(()) for v in per_expert])
    raise MoeUnfuseError(
        f"{name}: the projections stacked into one fused tensor have different scales; fix: quantize with moe_unfuse.quantize_model, which shares them"
    )


def restack_tensors(
    target: Restack, get: Callable[[str], torch.Tensor], has: Callable[[str], bool]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The fused tensors of ``target`` from its exported per-expert tensors; and the keys used."""
    naming, n = target.naming, target.naming.num_experts
    fused: dict[str, torch.Tensor] = {}
    used: list[str] = []

    def keys(into: Sequence[str], leaf: str) -> list[list[str]]:
        if naming.hub_fused:
            return [[naming.per_expert_key(e, proj, leaf) for e in range(n)] for proj in into]
        return [[target.hub_key(f"{naming.module}.{e}.{proj}.{leaf}") for e in range(n)] for proj in into]

    def hub_tensors(leaf: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """One in-memory fused tensor under the hub's names and layout (several per-expert tensors
        where the hub stores it per expert); a quantized one must keep its fused name."""
        converted = target.to_hub({f"{naming.module}.{leaf}": tensor})
        if target.quantized and list(converted) != [f"{naming.hub}.{leaf}"]:
            raise MoeUnfuseError(
                f"{target.spec.source}: export.layout: fused, but the hub stores {naming.module}.{leaf} as {', '.join(converted)}; fix: use export.layout: per_expert"
            )
        return converted

    for p in target.spec.params:
        layout = p.layout(n)
        wkeys = keys(p.into, "weight")
        pieces = [[get(k) for k in row] for row in wkeys]
        rest = target.rests.get(p.name)
        weights = hub_tensors(p.name, layout.refuse(pieces, rest) if rest is not None else layout.refuse(pieces))
        fused.update(weights)
        used.extend(k for row in wkeys for k in row)
        for scale in STACKED_SCALES if target.quantized else ():
            skeys = keys(p.into, scale)
            present = [has(k) for row in skeys for k in row]
            if not any(present):
                continue
            name = f"{next(iter(weights))}_{scale}"
            if not all(present):
                raise MoeUnfuseError(
                    f"{name}: some experts have no {scale}; fix: calibrate every expert (--force-routing)"
                )
            values = [[get(k) for k in row] for row in skeys]
            fused[name] = layout.refuse(values) if values[0][0].dim() >= 2 else _stack_scalars(values, name)
            used.extend(k for row in skeys for k in row)
        if p.bias:
            bkeys = keys(p.into, "bias")
            fused.update(hub_tensors(p.bias, p.bias_layout().refuse([[get(k) for k in row] for row in bkeys])))
            used.extend(k for row in bkeys for k in row)
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
    fused_back: list[str]
    fuse_skipped: list[str]
    exclusions_added: list[str]
    fused: list[str] = field(default_factory=list)  # quantized experts written in the hub's fused layout

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
        if self.fuse_skipped:
            parts.append(f"not fused back: {', '.join(self.fuse_skipped)}")
        if self.exclusions_added:
            shown = ", ".join(self.exclusions_added[:6]) + (
                f" (+{len(self.exclusions_added) - 6} more)" if len(self.exclusions_added) > 6 else ""
            )
            parts.append(f"added to exclude_modules: {shown}")
        return "; ".join(parts)


def exclude_pattern(module: str) -> str:
    """The exclude entry for a module and everything under it: ``prefix*``, which every vLLM version
    matches (0.22-0.26 expand only ``X*`` with no ``.`` before the ``*``, modelopt.py:266-285)."""
    return f"{module}*"


def _collapse_expert_names(names: Iterable[str]) -> list[str]:
    """``a.experts.3.up_proj`` ... -> ``a.experts*`` so a whole excluded layer is one entry."""
    out: list[str] = []
    for n in sorted(set(names)):
        m = re.match(r"^(.*\.experts)\.\d+(\.|$)", n)
        entry = exclude_pattern(m.group(1)) if m else n
        if entry not in out:
            out.append(entry)
    return out


def postprocess_checkpoint(
    path: Path,
    renames: Sequence[tuple[re.Pattern, str]],
    targets: Sequence[Restack] = (),
    progress: bool = True,
    contract: NamingContract | None = None,
) -> tuple[int, list[str], list[str]]:
    """Name every key as the hub does (``contract.hub_key``: where modelopt's reverse conversion fell
    back to in-memory names), re-stack ``targets``, apply ``renames``, and fix ``exclude_modules``/
    ``ignore`` in place (each shard is rewritten through a temporary file, so an interrupted run
    leaves no half-written shard). Returns (keys renamed, unquantized modules fused back, exclusions added)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    files, weight_map = shard_files(path)
    where: dict[str, Path] = {}
    stored: dict[str, str] = {}  # hub name -> the key modelopt wrote
    meta: dict[Path, dict[str, str]] = {}
    for f in files:
        with safe_open(f, "pt") as fh:
            meta[f] = fh.metadata() or {}
            for k in fh.keys():
                where[k], stored[k] = f, k
    added: dict[Path, dict[str, torch.Tensor]] = {f: {} for f in files}
    dropped: set[str] = set()
    if contract is not None:
        _to_hub_names(contract, where, stored, added, dropped)

    def get(key: str) -> torch.Tensor:
        for extra in added.values():
            if key in extra:
                return extra[key]
        if key not in where:
            raise MoeUnfuseError(
                f"{path}: cannot re-stack, {key} is missing from the export; fix: export without --fuse-unquantized and report this"
            )
        with safe_open(where[key], "pt") as fh:
            return fh.get_tensor(stored[key])

    fused_back: list[str] = []
    for t in targets:
        fused, used = restack_tensors(t, get, lambda k: k in where or any(k in extra for extra in added.values()))
        home = next((f for f, extra in added.items() if used[0] in extra), None) or where[used[0]]
        for extra in added.values():
            for k in used:
                extra.pop(k, None)
        added[home].update(fused)
        dropped.update(used)
        if not t.quantized:
            fused_back.append(t.naming.hub)

    renamed = 0
    new_map: dict[str, str] = {}
    fused_candidates: set[str] = set()  # 3-D+ tensors under an experts module, seen as the shards are rewritten
    mode = 0o666 & ~_umask()
    for f in tqdm(files, desc="post-processing shards", unit="file", disable=not progress, leave=False):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(f, "pt") as fh:
            for name, k in stored.items():
                if where[name] != f or name in dropped:
                    continue
                new = rename_key(name, renames)
                renamed += new != k
                tensors[new] = fh.get_tensor(k)
        tensors.update(added[f])
        tmp = f.with_name(f.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta[f] or {"format": "pt"})
        os.chmod(tmp, mode)
        os.replace(tmp, f)
        new_map.update({k: f.name for k in tensors})
        fused_candidates.update(k for k, v in tensors.items() if v.dim() >= 3 and FUSED_EXPERT_KEY_RE.search(k))
    unquantized_fused = {
        k.rsplit(".", 1)[0] for k in fused_candidates if not any(f"{k}_{s}" in new_map for s in STACKED_SCALES)
    }
    if weight_map is not None:
        index_path = path / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict(sorted(new_map.items()))
        index_path.write_text(json.dumps(index, indent=2) + "\n")

    def hub_module(name: str) -> str:
        if contract is None or any(c in name for c in "*?["):
            return name
        if name in contract.linear_hubs:
            return contract.linear_hubs[name][0]
        key = contract.hub_key(f"{name}.weight")
        return key[: -len(".weight")] if key.endswith(".weight") else name

    exclusions = _fix_exclusions(path, renames, fused_back, new_map, unquantized_fused, hub_module)
    return renamed, fused_back, exclusions


def _to_hub_names(
    contract: NamingContract,
    where: dict[str, Path],
    stored: dict[str, str],
    added: dict[Path, dict[str, torch.Tensor]],
    dropped: set[str],
) -> None:
    """Where modelopt's reverse conversion fell back to in-memory names (a conversion mapping with ops
    it cannot reverse on quantized tensors), finish it: unquantized tensors go through transformers'
    own reverse (``save_pretrained``'s: renames and ops such as re-fusing q/k/v), quantized ones are
    renamed (renames only; a name two keys would share is left as is, and verify reports it)."""
    from safetensors import safe_open

    unknown = [k for k in stored if contract.base(k) is None]
    if not unknown:
        return
    scaled = {k.rsplit(".", 1)[0] for k in stored if k.rsplit(".", 1)[-1] in SCALE_SUFFIXES}
    plain = [k for k in unknown if k.rsplit(".", 1)[0] not in scaled and k.rsplit(".", 1)[-1] not in SCALE_SUFFIXES]
    if plain:
        tensors = {}
        for k in plain:
            with safe_open(where[k], "pt") as fh:
                tensors[k] = fh.get_tensor(k)
        try:
            converted = contract.to_hub(tensors)
        except Exception:  # noqa: BLE001 - transformers could not reverse them: verify names what is left
            converted = {}
        if converted and all(n in contract.names for n in converted):
            home = where[plain[0]]
            for k in plain:
                dropped.add(k)
            for n, t in converted.items():
                added[home][n] = t
    targets: dict[str, list[str]] = {}
    for k in unknown:
        if k not in dropped:
            targets.setdefault(contract.hub_key(k), []).append(k)
    for name, ks in targets.items():
        if len(ks) == 1 and name != ks[0] and name not in stored:
            where[name], stored[name] = where.pop(ks[0]), stored.pop(ks[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fix_exclusions(
    path: Path,
    renames: Sequence[tuple[re.Pattern, str]],
    fused_back: Sequence[str],
    keys: Iterable[str],
    fused_modules: Iterable[str] = (),
    hub_module: Callable[[str], str] = lambda m: m,
) -> list[str]:
    """Rename the exclude list, write each entry in a form every engine matches, and add what must be
    excluded but is not: fused back experts, fused expert tensors left unquantized (``--allow-uncovered``),
    lm_head, and every module :func:`must_exclude` finds. Writes both configs; returns the entries added."""
    hf_path, cfg_path = path / "hf_quant_config.json", path / "config.json"
    if not hf_path.is_file():
        return []  # not quantized: nothing is excluded from anything
    hf = json.loads(hf_path.read_text())
    quant = hf.setdefault("quantization", {})
    original = list(quant.get("exclude_modules") or [])
    final: list[str] = []
    for name in original:
        n = rename_module(hub_module(name), renames)
        if n.endswith(".*"):  # `a.experts.*` never matches the module `a.experts` in vLLM 0.22-0.26
            n = n[:-2] + "*"
        if n not in final:
            final.append(n)
    for name in [*fused_back, *sorted(fused_modules)]:
        if not excluded(name, final):
            final.append(exclude_pattern(name))
    if not excluded("lm_head", final):
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
        for message in (
            "transformers .* is not tested",
            "To copy construct from a tensor",
            ".*torch_dtype.* is deprecated",
        ):
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


@contextmanager
def _no_carried_expert_sources(contract: NamingContract) -> Iterator[None]:
    """modelopt 0.48 copies source-checkpoint tensors the model has no parameter for (meant for MTP
    heads) into the export verbatim (``read_unplaced_weights``). Once experts are unfused, their
    source tensors look like such: the bf16 fused tensors would land next to the quantized
    per-expert ones (or, where the hub is per expert, over them). Its ``unplaced_keys_for`` decides
    what is carried and excluded; for the export's duration it leaves out every source key of an
    unfused experts module. On modelopt 0.47, which has no such step, this does nothing."""
    try:
        from modelopt.torch.export import unified_export_hf as exporter
    except ImportError:  # pragma: no cover - modelopt is a dependency
        yield
        return
    original = getattr(exporter, "unplaced_keys_for", None)
    if original is None:
        yield
        return
    prefixes = tuple(f"{e.hub}." for e in contract.experts.values())
    owned = {n for e in contract.experts.values() for n in (*e.names, *(k for k, _ in e.hub_fused_names))}

    def unplaced_keys_for(model: nn.Module, ckpt: Any) -> list[str]:
        return [k for k in original(model, ckpt) if k not in owned and not k.startswith(prefixes)]

    exporter.unplaced_keys_for = unplaced_keys_for
    try:
        yield
    finally:
        exporter.unplaced_keys_for = original


@contextmanager
def _device_when_offloaded(model: nn.Module) -> Iterator[None]:
    """modelopt's export runs a dummy forward on ``model.device``: the first parameter's device, which
    is ``meta`` when every module is offloaded to disk (layer by layer). For the export's duration the
    model reports the device its offloaded modules run on instead (a same-named subclass, so the
    class name modelopt and ``save_pretrained`` write is unchanged)."""
    first = next(model.parameters(), None)
    if first is None or not first.is_meta:
        yield
        return
    cls = type(model)
    device = input_device(model)
    model.__class__ = type(
        cls.__name__, (cls,), {"device": property(lambda self: device), "__module__": cls.__module__}
    )
    try:
        yield
    finally:
        model.__class__ = cls


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
) -> tuple[ExportResult, Any]:
    """Export ``model`` (quantized by :func:`moe_unfuse.quantize.quantize_model`) to ``out`` and verify it.

    A non-empty ``out`` is an error unless ``overwrite`` (then it is replaced once the new export passes).
    ``fallbacks``: input amax substitutes (:class:`moe_unfuse.calibration.ScaleFallback`), each recorded in
    ``moe_unfuse.json``. ``max_shard_size``: modelopt's shard size (its default, 10GB, when None); an
    offloaded model is streamed one layer at a time, holding one shard in memory.

    Returns (ExportResult, VerifyReport). On a failed verification the checkpoint is moved to
    ``<out>.invalid`` instead of ``out`` (``ExportResult.path`` says where). An error on the way
    leaves ``<out>.invalid`` with ``moe_unfuse.json`` naming it and raises a one-line
    :class:`MoeUnfuseError`.
    """
    out = Path(out)
    prepare_out_dir(out, overwrite)
    with out_lock(out):
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
) -> tuple[ExportResult, Any]:
    from modelopt.torch.export import export_hf_checkpoint

    install_export_handlers()
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
        renames = engine_renames(specs, engine)
        targets, skipped = plan_restacks(model, contract, fuse_unquantized)
        step = "modelopt export_hf_checkpoint"
        with (
            quiet(),
            redirect_stdout(io.StringIO()),
            _no_carried_expert_sources(contract),
            _device_when_offloaded(model),
        ):  # modelopt's prints say nothing the report does not
            shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            export_hf_checkpoint(model, export_dir=staging, **shards)
        step = "post-processing"
        renamed, fused_back, exclusions = postprocess_checkpoint(staging, renames, targets, progress, contract)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        restacked = {t.naming.hub for t in targets}
        metadata.update(
            {
                "experts": {
                    hub: {
                        **e.to_dict(),
                        "fused": hub in restacked,
                        "quantized_fused": hub in restacked and hub not in fused_back,
                    }
                    for hub, e in contract.experts.items()
                },
                "fused_back": fused_back,
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
            os.chmod(f, 0o666 & ~_umask())
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
    )
    return result, report
