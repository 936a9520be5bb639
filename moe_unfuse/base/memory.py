"""Host memory: what this process may still use, and handing freed heap back to the system.

The layer-by-layer path allocates and frees one layer's tensors per step. Tensors under glibc's mmap
threshold (which grows, after a large free, up to 32 MiB: per-expert weights, packed weights and
scales) come from the heap, and freed heap pages stay in the process: a 4-layer export of
Gemma-4-26B-A4B-sized layers peaked at 6.0 GB, 2.6 GB with :func:`map_large_allocations` (every
allocation of 64 KiB or more its own mapping, handed back on free; the export took 25% longer).
:func:`release_free_memory` also returns what the heap holds free between layers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Any, Callable

_libc = None


#: glibc mallopt parameter: allocations at least this large get their own mmap.
_M_MMAP_THRESHOLD = -3
LARGE_ALLOCATION = 64 << 10


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return _libc


def map_large_allocations() -> None:
    """From now on this process maps every allocation of ``LARGE_ALLOCATION`` bytes or more on its
    own (glibc ``mallopt(M_MMAP_THRESHOLD)``, which also stops the threshold from growing), so a freed
    tensor's memory goes back to the system at once instead of staying in the heap."""
    libc = _glibc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION)


def release_free_memory() -> None:
    """``malloc_trim(0)``: give free heap pages back to the system (glibc; a no-op elsewhere)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def available_memory() -> int:
    """Bytes this process may still use on the host: MemAvailable, capped by a cgroup limit (v2 or v1)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                continue
            room = int(raw) - int(Path(usage_file).read_text().strip())
            avail = room if avail is None else min(avail, room)
        except (OSError, ValueError):
            continue
    return avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


#: Runs ``python -m MODULE ARGS`` and, at exit, writes the process's peak resident memory
#: (``VmHWM``: its own, since exec) to a file.
_PROBE = """
import atexit, runpy, sys
module, report = sys.argv[1], sys.argv[2]
def write_peak():
    with open("/proc/self/status") as f, open(report, "w") as out:
        out.write(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
atexit.register(write_peak)
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_with_peak_rss(
    module: str, args: list[str], stdout: Path, stderr: Path, preexec_fn: Callable[[], None] | None = None
) -> tuple[int, int]:
    """Run ``python -m module *args`` to completion (output to the two files): its exit code and its
    own peak resident memory in bytes. The child reports its ``VmHWM`` itself at exit: rusage's
    ``ru_maxrss`` also counts the parent's pages the child held between fork and exec (a large
    pytest process doubled it). A child that cannot report (killed) gets its rusage figure."""
    import subprocess
    import sys

    report = stdout.with_name(stdout.name + ".peak")
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", _PROBE, module, str(report), *args]
    with stdout.open("w") as out, stderr.open("w") as err:
        pid = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=preexec_fn).pid
        _, status, usage = os.wait4(pid, 0)
    peak = int(report.read_text()) * 1024 if report.is_file() else usage.ru_maxrss * 1024  # both KiB
    return os.waitstatus_to_exitcode(status), peak
