"""Export a quantized, unfused model to a HF checkpoint the serving engines load, then verify it.

modelopt's ``export_hf_checkpoint`` writes the per-expert keys and ``hf_quant_config.json``, and
reverses transformers' load-time conversion so names are the hub checkpoint's own (the moe_unfuse
handlers in its export registries make that work for every spec: see ``modelopt_backend``). Then,
following the naming contract (:mod:`moe_unfuse.hub.naming`):

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
(:func:`moe_unfuse.hub.verify.verify_checkpoint`), then swapped into ``<out>`` atomically (a good earlier
``<out>`` stays in place until then). A checkpoint that fails verification, or an export that fails
on the way, is left at ``<out>.invalid`` with ``moe_unfuse.json`` saying why.
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import json
import math
import os
import re
import shutil
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..base.errors import MoeUnfuseError, first_line
from ..base.layout import Narrow
from ..core.experts import unfuse_state
from ..hub.checkpoint import (
    FUSED_EXPERT_KEY_RE,
    METADATA_FILE,
    SCALE_SUFFIXES,
    STACKED_SCALES,
    excluded,
    fused_scale_base,
    has_scale,
    must_exclude,
    quantized_modules,
    shard_files,
)
from ..hub.checkpoint_reader import Checkpoint
from ..hub.naming import ExpertsNaming, NamingContract, model_contract, unplaced_source_keys
from ..hub.verify import verify_checkpoint
from ..plugins.manager import registry
from ..spec.model import Spec
from .calibration import input_device, unfused_experts
from .streaming import has_split_rules, streaming_export


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
    """An exclusive lock on ``<out>.lock`` for the whole job (``quantize`` takes it before loading the
    model): a second run on the same ``--out`` fails at once instead of calibrating and then sharing
    ``<out>.partial``. Not reentrant: a second ``out_lock`` on the same ``out`` fails, in this process too.

    The lock file is removed by its holder, while still holding it; a run that opened the file just
    before that finds its lock on a removed file and takes the new one instead."""
    lock = out.with_name(out.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MoeUnfuseError(
                f"--out {out}: another moe-unfuse run is writing it (lock {lock}); fix: wait for it, or pass another --out"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file as we locked it: lock the current one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


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


def exclude_pattern(module: str) -> str:
    """The exclude entry for a module and everything under it: ``prefix*``, which every vLLM version
    matches (0.22-0.26 expand only ``X*`` with no ``.`` before the ``*``, modelopt.py:266-285)."""
    return f"{module}*"


#: A module under one expert of an experts module: ``a.experts.3.up_proj`` (group 1: ``a.experts``).
_EXPERT_ROW = re.compile(r"^(.*\.experts)\.\d+(\.|$)")


def _collapse_expert_names(names: Iterable[str]) -> list[str]:
    """``a.experts.3.up_proj`` ... -> ``a.experts*`` so a whole excluded layer is one entry."""
    out: list[str] = []
    for n in sorted(set(names)):
        m = _EXPERT_ROW.match(n)
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
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> tuple[int, list[str], list[str], int]:
    """Name every key as the hub does (``contract.hub_key``: where modelopt's reverse conversion fell
    back to in-memory names), re-stack ``targets``, apply ``renames``, write each unquantized tensor
    named in ``dtypes`` (hub name -> the source checkpoint's dtype) in that dtype, and fix
    ``exclude_modules``/``ignore`` in place (each shard is rewritten through a temporary file, so an
    interrupted run leaves no half-written shard). Returns (keys renamed, unquantized modules fused
    back, exclusions added, tensors written back in their source dtype)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    files, weight_map = shard_files(path)
    where: dict[str, Path] = {}
    stored: dict[str, str] = {}  # hub name -> the key modelopt wrote
    meta: dict[Path, dict[str, str]] = {}
    shapes: dict[str, list[int]] = {}  # as modelopt wrote them (the shards are rewritten below)
    for f in files:
        with safe_open(f, "pt") as fh:
            meta[f] = fh.metadata() or {}
            for k in fh.keys():
                where[k], stored[k] = f, k
                shapes[k] = fh.get_slice(k).get_shape()
    added: dict[Path, dict[str, torch.Tensor]] = {f: {} for f in files}
    dropped: set[str] = set()
    pending = _to_hub_names(contract, where, stored, dropped, files) if contract is not None else {}

    def convert(keys: list[str]) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        for k in keys:
            with safe_open(where[k], "pt") as fh:
                values[k] = fh.get_tensor(stored[k])
        return contract.to_hub(values) if contract is not None else values

    last: list[Any] = [None, {}]  # the group of keys converted last, and what it converted to

    def get(key: str) -> torch.Tensor:
        for extra in added.values():
            if key in extra:
                return extra[key]
        for keys, names in (g for groups in pending.values() for g in groups):
            if key in names:
                if last[0] is not keys:  # a re-stack reads one layer's keys in a row: convert it once
                    last[:] = [keys, convert(keys)]
                return last[1][key]
        if key not in where:
            raise MoeUnfuseError(
                f"{path}: cannot re-stack, {key} is missing from the export; fix: export without --fuse-unquantized and report this"
            )
        with safe_open(where[key], "pt") as fh:
            return fh.get_tensor(stored[key])

    converted_in = {n: f for f, groups in pending.items() for _, names in groups for n in names}
    fused_back: list[str] = []
    for t in targets:
        fused, used = restack_tensors(
            t, get, lambda k: k in where or k in converted_in or any(k in extra for extra in added.values())
        )
        home = next((f for f, extra in added.items() if used[0] in extra), None) or where.get(used[0])
        home = home or converted_in[used[0]]
        for extra in added.values():
            for k in used:
                extra.pop(k, None)
        added[home].update(fused)
        dropped.update(used)
        if not t.quantized:
            fused_back.append(t.naming.hub)

    renamed = restored = 0
    dtypes = dtypes or {}
    final_keys = {k for k in stored if k not in dropped} | {k for extra in added.values() for k in extra}
    final_keys |= {n for groups in pending.values() for _, names in groups for n in names}

    def source_dtype(name: str, tensor: torch.Tensor) -> torch.Tensor:
        """An unquantized tensor in its source dtype: loading may upcast (transformers keeps some
        modules in fp32, e.g. DeepSeek-V3's ``e_score_correction_bias``), the checkpoint must not."""
        nonlocal restored
        want = dtypes.get(name)
        if want is None or tensor.dtype == want or not tensor.is_floating_point() or has_scale(name, final_keys):
            return tensor
        if tensor.dtype.itemsize < 2:  # an FP8 tensor without a scale next to it is no unquantized weight
            return tensor
        restored += 1
        return tensor.to(want)

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
                tensors[new] = source_dtype(name, fh.get_tensor(k))
        tensors.update({k: source_dtype(k, t) for k, t in added[f].items()})
        for keys, _ in pending.get(f, ()):
            tensors.update((n, source_dtype(n, t)) for n, t in convert(keys).items() if n not in dropped)
        tmp = f.with_name(f.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta[f] or {"format": "pt"})
        os.chmod(tmp, mode)
        os.replace(tmp, f)
        new_map.update({k: f.name for k in tensors})
        fused_candidates.update(k for k, v in tensors.items() if v.dim() >= 3 and FUSED_EXPERT_KEY_RE.search(k))
    unquantized_fused = {
        k.rsplit(".", 1)[0]
        for k in fused_candidates
        if fused_scale_base(k, new_map) is None and not any(f"{k}_{s}" in new_map for s in STACKED_SCALES)
    }
    if weight_map is not None:
        index_path = path / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict(sorted(new_map.items()))
        index_path.write_text(json.dumps(index, indent=2) + "\n")

    def hub_modules(name: str) -> list[str]:
        """The hub modules an exclude entry stands for: one, or each piece a split rule makes of it."""
        if contract is None:
            return [name]
        if name.endswith("*") and not any(c in name[:-1] for c in "*?["):
            return [_hub_prefix(name[:-1], contract)]
        if any(c in name for c in "*?["):
            return [name]
        if name in contract.linear_hubs:
            return [contract.linear_hubs[name][0]]
        key = contract.hub_key(f"{name}.weight")
        if contract.base(key) is not None or key not in shapes:
            return [key[: -len(".weight")] if key.endswith(".weight") else name]
        try:
            pieces = contract.to_hub({key: torch.empty(shapes[key], device="meta")})
        except Exception:  # noqa: BLE001 - transformers cannot reverse it: the entry stays as written
            return [name]
        hubs = [n[: -len(".weight")] for n in pieces if n.endswith(".weight") and contract.base(n) is not None]
        return hubs or [name]

    carried = {k.rsplit(".", 1)[0] for k in (contract.carried if contract else ())}
    carried = {m.group(1) if (m := _EXPERT_ROW.match(n)) else n for n in carried}  # an MTP head's experts: one entry
    exclusions = _fix_exclusions(path, renames, fused_back, new_map, [*unquantized_fused, *carried], hub_modules)
    return renamed, fused_back, exclusions, restored


#: The config.json entries an export changes: modelopt's ``quantization_config`` (written by its
#: export, its exclude list fixed by :func:`_fix_exclusions`). Every other field is the source's.
QUANT_CONFIG_KEYS = ("quantization_config",)
#: Files of the source folder an export carries over as they are (transformers v5 would re-serialize them).
SOURCE_CONFIG_FILES = ("generation_config.json",)


def source_dtypes(source: Path, contract: NamingContract) -> dict[str, torch.dtype]:
    """Each hub name's dtype in the source checkpoint's safetensors (headers only; empty when it
    has none). Per-expert names an export expands from a fused hub tensor take that tensor's dtype."""
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    try:
        stored = Checkpoint(source).dtype
    except MoeUnfuseError:  # no safetensors (a .bin checkpoint): nothing to compare with
        return {}
    out = {k: names[d] for k, d in stored.items() if d in names}
    for e in contract.experts.values():
        fused = {out.get(k) for k, _ in e.hub_fused_names}
        if len(fused) == 1 and None not in fused:
            out.update(dict.fromkeys(e.names, fused.pop()))
    return out


def keep_source_config(path: Path, source: Path) -> None:
    """Write the source's config.json back with only :data:`QUANT_CONFIG_KEYS` taken from the export:
    transformers v5's ``save_pretrained`` (which modelopt's export calls) rewrites fields hub
    checkpoints spell otherwise (``architectures``: the hub's ``PhiMoEForCausalLM`` becomes the class
    name ``PhimoeForCausalLM``, which vLLM's registry does not know; ``torch_dtype``, ``auto_map`` ...)."""
    src = source / "config.json"
    exported = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in json.loads(src.read_text()).items() if k not in QUANT_CONFIG_KEYS}
    config.update({k: exported[k] for k in QUANT_CONFIG_KEYS if k in exported})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in SOURCE_CONFIG_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, path / name)


#: The decoder layer (or other numbered block) a key belongs to: the tensors one conversion rule
#: reverses together all lie under it.
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


#: Bytes per shard of carried source tensors (an MTP head can be tens of GB: never all in memory).
CARRY_SHARD_BYTES = 2 * 1024**3
#: safetensors dtype name -> bytes per element (sizes the carried shards).
_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "BF16": 2,
    "F16": 2,
    "I16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U8": 1,
    "I8": 1,
    "BOOL": 1,
}


def carry_source_tensors(path: Path, source: Path, contract: NamingContract) -> list[str]:
    """Copy into the export at ``path`` every tensor of the ``source`` checkpoint the model places
    nowhere (:func:`~moe_unfuse.hub.naming.unplaced_source_keys`: a hub's MTP head, AXK1's dense-layer
    ``post_mlp_layernorm``), as it is, unless the export holds it already (modelopt 0.48 carries them
    itself; 0.47 does not) or it belongs to an experts module. Written into ``model-carried-N.safetensors``
    shards listed in the index (made when the export had none). Returns every carried name the export
    now holds, for ``moe_unfuse.json``, where ``verify`` reads which names a checkpoint carries."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if contract.model is None or not any(source.glob("*.safetensors")):
        return []
    have = Checkpoint(source)
    unplaced = [k for k in unplaced_source_keys(contract.model, have.where) if not contract.expert_owned(k)]
    files, weight_map = shard_files(path)
    if weight_map is None:
        weight_map = {}
        for f in files:
            with safe_open(f, "pt") as fh:
                weight_map.update(dict.fromkeys(fh.keys(), f.name))
    todo = [k for k in unplaced if k not in weight_map]
    batches: list[list[str]] = [[]]
    size = 0
    for k in todo:
        n = math.prod(have.shape[k]) * _DTYPE_BYTES.get(have.dtype[k], 4)
        if batches[-1] and size + n > CARRY_SHARD_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(k)
        size += n
    for i, keys in enumerate(b for b in batches if b):
        name = f"model-carried-{i + 1:05d}.safetensors"
        tensors = {}
        for k in keys:
            with safe_open(have.where[k], "pt") as fh:
                tensors[k] = fh.get_tensor(k)
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if todo:
        total = sum(f.stat().st_size for f in {path / n for n in weight_map.values()})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(k for k in unplaced if k in weight_map)


def _to_hub_names(
    contract: NamingContract,
    where: dict[str, Path],
    stored: dict[str, str],
    dropped: set[str],
    files: Sequence[Path],
) -> dict[Path, list[tuple[list[str], set[str]]]]:
    """Where modelopt's reverse conversion fell back to in-memory names (a conversion mapping with ops
    it cannot reverse on quantized tensors, or split rules its layer-by-layer export leaves), finish
    it: unquantized tensors go through transformers' own reverse (``save_pretrained``'s: renames and
    ops such as re-fusing q/k/v), one decoder layer at a time; quantized ones are renamed (renames
    only; a name two keys would share is left as is, and verify reports it).

    Returns, per shard, the groups of keys to convert when that shard is rewritten (the first of the
    group's shards, so the others are still as written), each with the names it converts to: names
    are checked here on meta tensors, values are read only then, so memory holds one layer's
    converted tensors at a time."""
    from safetensors import safe_open

    unknown = [k for k in stored if contract.base(k) is None]
    pending: dict[Path, list[tuple[list[str], set[str]]]] = {}
    if not unknown:
        return pending
    for k in list(unknown):  # experts the hub stores per expert: renamed one by one, as their converter names them
        name = contract.per_expert_hub_key(k)
        if name is not None and name not in stored and contract.base(name) is not None:
            where[name], stored[name] = where.pop(k), stored.pop(k)
            unknown.remove(k)
    scaled = {k.rsplit(".", 1)[0] for k in stored if k.rsplit(".", 1)[-1] in SCALE_SUFFIXES}
    plain = [k for k in unknown if k.rsplit(".", 1)[0] not in scaled and k.rsplit(".", 1)[-1] not in SCALE_SUFFIXES]
    groups: dict[str, list[str]] = {}
    for k in plain:
        groups.setdefault(m.group(1) if (m := _BLOCK.match(k)) else "", []).append(k)
    order = {f: i for i, f in enumerate(files)}
    for keys in groups.values():
        shapes = {}
        for k in keys:
            with safe_open(where[k], "pt") as fh:
                shapes[k] = torch.empty(fh.get_slice(k).get_shape(), device="meta")
        try:
            converted = contract.to_hub(shapes)
        except Exception:  # noqa: BLE001 - transformers could not reverse them: verify names what is left
            continue
        if converted and all(n in contract.names for n in converted):
            dropped.update(keys)
            home = min((where[k] for k in keys), key=order.__getitem__)
            pending.setdefault(home, []).append((keys, set(converted)))
    targets: dict[str, list[str]] = {}
    for k in unknown:
        if k not in dropped:
            targets.setdefault(contract.hub_key(k), []).append(k)
    for name, ks in targets.items():
        if len(ks) == 1 and name != ks[0] and name not in stored:
            where[name], stored[name] = where.pop(ks[0]), stored.pop(ks[0])
    return pending


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _hub_prefix(prefix: str, contract: NamingContract) -> str:
    """A ``prefix*`` exclude entry modelopt writes under in-memory names (Inkling2's
    ``...self_attn.k_sconv*``) under the hub's: the module every tensor below it reverts under, plus
    ``*``. Unchanged when the prefix already names hub tensors, or no hub module holds just its tensors."""
    if contract.model is None or any(n.startswith(prefix) for n in contract.names):
        return prefix + "*"
    below = [n for n, _ in contract.model.state_dict(keep_vars=True).items() if n.startswith(prefix + ".")]
    hubs = [h.split(".") for h in (contract.hub_key(n) for n in below) if h in contract.names]
    if not below or len(hubs) != len(below):
        return prefix + "*"
    common = list(hubs[0][:-1])
    for h in hubs[1:]:
        while common and h[: len(common)] != common:
            common.pop()
    hub = ".".join(common)
    mine = {".".join(h) for h in hubs}
    if not common or any(n.startswith(hub) and n not in mine for n in contract.names):
        return prefix + "*"  # the hub module holds more than the prefix: excluding it would say too much
    return hub + "*"


def _fix_exclusions(
    path: Path,
    renames: Sequence[tuple[re.Pattern, str]],
    fused_back: Sequence[str],
    keys: Iterable[str],
    unquantized: Iterable[str] = (),
    hub_modules: Callable[[str], list[str]] = lambda m: [m],
) -> list[str]:
    """Rename the exclude list, write each entry in a form every engine matches, and add what must be
    excluded but is not: fused back experts, ``unquantized`` modules (fused expert tensors left
    unquantized by ``--allow-uncovered``, tensors carried from the source: an MTP head an engine would
    otherwise build quantized), lm_head (unless quantized), and every module :func:`must_exclude`
    finds. Writes both configs; returns the entries added."""
    hf_path, cfg_path = path / "hf_quant_config.json", path / "config.json"
    if not hf_path.is_file():
        return []  # not quantized: nothing is excluded from anything
    hf = json.loads(hf_path.read_text())
    quant = hf.setdefault("quantization", {})
    original = list(quant.get("exclude_modules") or [])
    final: list[str] = []
    for name in original:
        for hub in hub_modules(name):
            n = rename_module(hub, renames)
            if n.endswith(".*"):  # `a.experts.*` never matches the module `a.experts` in vLLM 0.22-0.26
                n = n[:-2] + "*"
            if n not in final:
                final.append(n)
    for name in [*fused_back, *sorted(unquantized)]:
        if not excluded(name, final):
            final.append(exclude_pattern(name))
    keys = set(keys)
    head_quantized = "lm_head" in quantized_modules(keys)  # for an engine that builds it quantized
    if not excluded("lm_head", final) and not head_quantized:
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

    def unplaced_keys_for(model: nn.Module, ckpt: Any) -> list[str]:
        return [k for k in original(model, ckpt) if not contract.expert_owned(k)]

    exporter.unplaced_keys_for = unplaced_keys_for
    try:
        yield
    finally:
        exporter.unplaced_keys_for = original


def _modelopt_names_disagree(model: nn.Module, contract: NamingContract) -> bool:
    """Whether modelopt's quant-aware reverse conversion would write a name the naming contract lacks
    for a tensor the contract names. It renames with ``re.sub`` (every occurrence) where transformers
    renames the first (HY-V4: ``hc_pre.hc_head.hc_pre.hc_head_base``), and applies renames meant for
    hub per-expert modules to per-expert names of fused ones (HY-V4 ``experts.E.linear_gate``)."""
    try:
        from modelopt.torch.export.quant_aware_conversion import build_reverse_name_mapper
    except ImportError:  # pragma: no cover - modelopt is a dependency
        return False
    try:
        try:
            mapper = build_reverse_name_mapper(model, tensor_keys=True)  # modelopt 0.48
        except TypeError:
            mapper = build_reverse_name_mapper(model)
    except Exception:  # noqa: BLE001 - modelopt cannot reverse it: it falls back to in-memory names itself
        return False
    if mapper is None:
        return False
    for name, _ in model.named_parameters():
        ours = contract.hub_key(name)
        if contract.base(ours) is not None and contract.base(mapper(name)) is None:
            return True
    return False


@contextmanager
def _own_names_when_modelopt_disagrees(model: nn.Module, contract: NamingContract) -> Iterator[None]:
    """For the export's duration, modelopt's reverse conversion is off when it would write names
    the contract lacks (:func:`_modelopt_names_disagree`) or the conversion mapping has split or
    merge rules (which the layer-by-layer export cannot hand modelopt: both paths then name them
    alike): it writes the in-memory names for weights and config alike, as on its own fallback, and
    :func:`postprocess_checkpoint` names every key through the contract (transformers' own reverse)."""
    if not (has_split_rules(model) or _modelopt_names_disagree(model, contract)):
        yield
        return
    import importlib

    patched = []
    for module in ("unified_export_hf", "unified_export_hf_streaming", "quant_aware_conversion"):
        try:
            mod = importlib.import_module(f"modelopt.torch.export.{module}")
        except ImportError:  # pragma: no cover - modelopt is a dependency
            continue
        for attr, stand_in in (
            ("build_reverse_name_mapper", lambda model, **kwargs: None),
            ("revert_weight_conversion_quant_aware", lambda model, state_dict: state_dict),
        ):
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, stand_in)
    try:
        yield
    finally:
        for mod, attr, original in patched:
            setattr(mod, attr, original)


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
    locked: bool = False,
    source: Path | str | None = None,
) -> tuple[ExportResult, Any]:
    """Export ``model`` (quantized by :func:`moe_unfuse.quant.quantize.quantize_model`) to ``out`` and verify it.

    A non-empty ``out`` is an error unless ``overwrite`` (then it is replaced once the new export passes).
    ``fallbacks``: input amax substitutes (:class:`moe_unfuse.quant.calibration.ScaleFallback`), each recorded in
    ``moe_unfuse.json``. ``max_shard_size``: modelopt's shard size (its default, 10GB, when None); an
    offloaded model is streamed one layer at a time, holding one shard in memory. ``locked``: the
    caller already holds :func:`out_lock` on ``out`` (taken before the model was loaded). ``source``:
    the folder ``model`` was loaded from; its config.json (and generation_config.json) are written
    back with only the quantization entries changed (:data:`QUANT_CONFIG_KEYS`), and every unquantized
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
        renames = engine_renames(specs, engine)
        targets, skipped = plan_restacks(model, contract, fuse_unquantized)
        step = "modelopt export_hf_checkpoint"
        with (
            quiet(),
            redirect_stdout(io.StringIO()),
            _no_carried_expert_sources(contract),
            _own_names_when_modelopt_disagrees(model, contract),
            _device_when_offloaded(model),
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
        source_dtypes=restored,
    )
    return result, report
