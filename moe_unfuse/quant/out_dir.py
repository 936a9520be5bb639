"""The export's output folder: refused where it would overwrite what it must not, locked for the
whole job, and replaced atomically.

The checkpoint is written to ``<out>.partial`` under a lock on ``<out>`` (:func:`out_lock`), then
swapped into ``<out>`` atomically (:func:`replace_dir`): a good earlier ``<out>`` stays in place until then.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..base.errors import MoeUnfuseError


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


def umask() -> int:
    """The process's umask, read without changing it: what the export writes is ``0o666 & ~umask()``."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
