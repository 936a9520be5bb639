"""A checkpoint folder read for checking: every tensor's key, shape and dtype from the safetensors
headers alone (a 50 GB checkpoint in seconds), tensors on demand, its JSON files, and what its index
gets wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..base.errors import MoeUnfuseError, first_line
from .checkpoint_input import check_weight_map


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MoeUnfuseError(f"{path}: not valid JSON ({first_line(exc, 80)}); fix: re-export the checkpoint") from None


class Checkpoint:
    """Keys, shapes and dtypes of every tensor (headers only), tensors on demand, and the index's faults."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self.where: dict[str, Path] = {}
        self.shape: dict[str, list[int]] = {}
        self.dtype: dict[str, str] = {}
        self.index_problems: list[str] = []
        index = read_json(path / "model.safetensors.index.json")
        if index is not None:
            weight_map = check_weight_map(f"{path}/model.safetensors.index.json", index)
            names = set(weight_map.values())
            for name in sorted(names):
                if Path(name).name != name:
                    self.index_problems.append(f"{name} (shard outside the folder)")
            files = sorted(path / n for n in names if Path(n).name == n)
        else:
            weight_map = None
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MoeUnfuseError(
                f"{path}: no *.safetensors files; fix: point at a checkpoint folder written by save_pretrained/export"
            )
        for f in files:
            if not f.is_file():
                raise MoeUnfuseError(f"{f}: shard named in the index is missing; fix: copy the whole checkpoint folder")
            try:
                with safe_open(f, "pt") as fh:
                    for k in fh.keys():
                        if k in self.where:
                            self.index_problems.append(f"{k} (in {self.where[k].name} and {f.name})")
                        sl = fh.get_slice(k)
                        self.where[k], self.shape[k], self.dtype[k] = f, list(sl.get_shape()), sl.get_dtype()
            except MoeUnfuseError:
                raise
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types on a corrupt file
                raise MoeUnfuseError(
                    f"{f}: not a readable safetensors file ({first_line(exc, 80)}); fix: re-export the checkpoint"
                ) from None
        if weight_map is not None:
            for k, fname in weight_map.items():
                if k not in self.where:
                    self.index_problems.append(f"{k} (in the index, in no shard)")
                elif self.where[k].name != fname:
                    self.index_problems.append(f"{k} (index says {fname}, found in {self.where[k].name})")
            self.index_problems.extend(
                f"{k} (in {self.where[k].name}, not in the index)" for k in self.where if k not in weight_map
            )

    def tensor(self, key: str) -> Any:
        from safetensors import safe_open

        with safe_open(self.where[key], "pt") as fh:
            return fh.get_tensor(key)

    def json(self, name: str) -> Any:
        return read_json(self.path / name)
