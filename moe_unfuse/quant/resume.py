"""Resuming a layer-by-layer run: per-call calibration state in ``OUT.resume`` next to ``--out``.

After each decoder-layer call (a layer, or one pass of a looped layer), the run commits what a
restart needs to go on from the next one: the calibration state of that layer's quantizers (and of
those outside the decoder layers, which see every call's forward), its experts' token counts, its
outputs (the next call's inputs), and for a looped layer's call before its last, its first batch's
inputs (the layer's forced pass runs on each pass's). Each call is written to ``layer-N.tmp`` and
renamed to ``layer-N`` (a rename is atomic: a run killed while writing leaves a ``.tmp`` that no
restart takes as complete); earlier calls' outputs that no later call reads are removed only after
that. ``fingerprint.json`` says which model (path, and each file's size and mtime), calibration data
(a hash of every batch), options and versions the state belongs to: a restart with anything
different discards the state in one line and starts afresh. A run that finishes removes the folder.
Max calibration of a layer depends only on its inputs, so a resumed run writes the same checkpoint
as an uninterrupted one (``tests/test_resume.py`` and ``tests/test_layerwise.py`` kill runs for real).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

STATE_VERSION = 1
#: Test hook: ``after-layer:K`` / ``mid-save:K`` / ``before-export`` SIGKILLs the process at that point.
KILL_ENV = "MOE_UNFUSE_TEST_SIGKILL"


def kill_point(point: str) -> None:
    """SIGKILL this process when ``MOE_UNFUSE_TEST_SIGKILL`` names ``point`` (kill-and-resume tests)."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def resume_dir(out: Path) -> Path:
    """The staging folder next to ``--out`` that holds a layer-by-layer run's state."""
    return out.with_name(out.name + ".resume")


def fingerprint(
    model_path: Path, batches: Sequence[dict[str, torch.Tensor]], options: dict[str, Any]
) -> dict[str, Any]:
    """What the state belongs to: the model folder's files, the calibration batches, the options
    that change calibration, and the versions that compute it."""
    from importlib.metadata import PackageNotFoundError, version

    model_path = Path(model_path).resolve()
    files = {
        f.name: [f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(model_path.iterdir())
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin")
    }
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key].contiguous().cpu()
            digest.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.numpy().tobytes())
    versions = {}
    for package in ("moe-unfuse", "torch", "transformers", "nvidia-modelopt", "accelerate"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "state_version": STATE_VERSION,
        "model": {"path": str(model_path), "files": files},
        "calibration": digest.hexdigest(),
        "options": options,
        "versions": versions,
    }


_WHY = {
    "state_version": "it was written by another moe_unfuse state format",
    "model": "the model folder or its files changed",
    "calibration": "the calibration data differ",
    "options": "the options differ",
    "versions": "the installed versions differ",
}


class ResumeState:
    """The per-layer state in ``folder`` (``OUT.resume/state``), checked against ``fingerprint``."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], log: Callable[[str], None] | None = None):
        self.folder = folder
        log = log or (lambda line: print(line, file=sys.stderr))
        stamp = folder / "fingerprint.json"
        if stamp.is_file():
            try:
                saved = json.loads(stamp.read_text())
            except ValueError:
                saved = {}
            differ = [k for k in _WHY if saved.get(k) != fingerprint.get(k)]
            if differ:
                detail = ""
                if differ[0] == "options":
                    keys = sorted(
                        k
                        for k in {*saved.get("options", {}), *fingerprint["options"]}
                        if saved.get("options", {}).get(k) != fingerprint["options"].get(k)
                    )
                    detail = f" ({', '.join(keys)})"
                log(
                    f"moe-unfuse: discarded the saved layer-by-layer state in {folder.parent}: {_WHY[differ[0]]}{detail}; starting from layer 0"
                )
                shutil.rmtree(folder)
        if not stamp.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = stamp.with_name(stamp.name + ".tmp")
            tmp.write_text(json.dumps(fingerprint, indent=2) + "\n")
            os.replace(tmp, stamp)
        for stale in folder.glob("layer-*.tmp"):  # a run killed while committing a layer
            shutil.rmtree(stale, ignore_errors=True)

    resumed = 0  # layers restored from the state instead of calibrated

    def restored(self, count: int, total: int) -> None:
        """Say, in one line on stderr, that ``count`` of ``total`` layers come from the state."""
        self.resumed = count
        if count:
            print(
                f"moe-unfuse: resuming from {self.folder.parent}: decoder layers 0-{count - 1} of {total} were calibrated by an earlier run",
                file=sys.stderr,
            )

    def layer(self, i: int) -> Path:
        return self.folder / f"layer-{i}"

    def completed(self) -> int:
        """How many layers, from the first, are committed."""
        n = 0
        while self.layer(n).is_dir():
            n += 1
        return n

    def commit(self, i: int, write: Callable[[Path], None], release: Sequence[Path] = ()) -> None:
        """Call ``i``'s state, written by ``write`` into a fresh folder, committed by one rename; then
        the files and folders in ``release`` go (earlier calls' outputs no later call reads)."""
        tmp = self.folder / f"layer-{i}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        kill_point(f"mid-save:{i}")
        os.replace(tmp, self.layer(i))
        for path in release:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        kill_point(f"after-layer:{i}")


def _calibrators(modules: Sequence[tuple[str, nn.Module]]) -> dict[str, Any]:
    return {name: m._calibrator for name, m in modules if getattr(m, "_calibrator", None) is not None}


def save_calibration(path: Path, modules: Sequence[tuple[str, nn.Module]]) -> None:
    """The calibration state (what max calibration has collected so far, still in each quantizer's
    calibrator until modelopt loads it as amax at the end) of ``modules`` (name, quantizer), to ``path``."""
    state = {
        name: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(cal).items()}
        for name, cal in _calibrators(modules).items()
    }
    torch.save(state, path)


def load_calibration(path: Path, modules: Sequence[tuple[str, nn.Module]], device: torch.device) -> None:
    """Put a state :func:`save_calibration` wrote back into the calibrators of ``modules``."""
    state = torch.load(path, map_location=device, weights_only=False)  # written by moe_unfuse
    calibrators = _calibrators(modules)
    for name, values in state.items():
        cal = calibrators.get(name)
        if cal is not None:
            vars(cal).update(values)
