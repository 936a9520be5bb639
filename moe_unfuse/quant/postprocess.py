"""Post-processing modelopt's export in place, following the naming contract
(:mod:`moe_unfuse.hub.naming`).

modelopt's ``export_hf_checkpoint`` writes the per-expert keys and ``hf_quant_config.json``, and
reverses transformers' load-time conversion so names are the hub checkpoint's own (the moe_unfuse
handlers in its export registries make that work for every spec: see ``modelopt_backend``). Where
that reverse conversion fell back to in-memory names, :func:`postprocess_checkpoint` names every key
as the hub does; it also re-stacks the fused experts (:mod:`.restack`), applies the engine's renames
(:mod:`.renaming`), writes unquantized tensors back in their source dtype, and fixes the exclude
list (:mod:`.exclusions`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..base.errors import MoeUnfuseError
from ..hub.checkpoint import (
    FUSED_EXPERT_KEY_RE,
    SCALE_SUFFIXES,
    STACKED_SCALES,
    fused_scale_base,
    has_scale,
    shard_files,
)
from ..hub.naming import NamingContract
from .exclusions import EXPERT_ROW, fix_exclusions
from .out_dir import umask
from .renaming import rename_key
from .restack import Restack, restack_tensors


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
    mode = 0o666 & ~umask()
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
    carried = {m.group(1) if (m := EXPERT_ROW.match(n)) else n for n in carried}  # an MTP head's experts: one entry
    exclusions = fix_exclusions(path, renames, fused_back, new_map, [*unquantized_fused, *carried], hub_modules)
    return renamed, fused_back, exclusions, restored


#: The decoder layer (or other numbered block) a key belongs to: the tensors one conversion rule
#: reverses together all lie under it.
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


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
