"""Command-line start-up, measured side by side in one run (ratios, not absolute claims).

    .venv/bin/python benchmarks/bench_cli.py [--repeats 7]

Each of ``moe-unfuse --help``, ``list`` and ``show gemma4`` in a fresh interpreter, against a bare
interpreter start (``python -c pass``) and one that imports torch, run in turn so machine noise hits
all alike; medians. Target: ``list`` and ``show`` under 1 s warm, well under a torch import (every
command line loads the plugins and the spec catalog; neither imports torch or transformers).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "moe-unfuse --help": "from moe_unfuse.cli.main import main; main(['--help'])",
    "moe-unfuse list": "from moe_unfuse.cli.main import main; main(['list'])",
    "moe-unfuse show gemma4": "from moe_unfuse.cli.main import main; main(['show', 'gemma4'])",
}


def run_once(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for code in CASES.values():  # warm the file cache
        run_once(code)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, code in CASES.items():
            times[name].append(run_once(code))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    bare, torch_import = medians["python -c pass"], medians["import torch"]
    print(f"{'case':24} {'median s':>9} {'x bare python':>14} {'x import torch':>15}")
    for name, m in medians.items():
        print(f"{name:24} {m:9.3f} {m / bare:14.2f} {m / torch_import:15.2f}")
    ok = all(medians[n] < 1.0 and medians[n] < torch_import for n in ("moe-unfuse list", "moe-unfuse show gemma4"))
    print(f"list and show under 1 s and under a torch import: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
