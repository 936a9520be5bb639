"""Data-parallel calibration on ``torch.distributed``: ``torchrun --nproc-per-node N -m moe_unfuse quantize ...``.

Each rank calibrates on every N-th batch (``batches[rank::N]``); then every quantizer's amax is
reduced with MAX and every expert's token count with SUM, so each rank holds what one process
calibrating on all batches would: max and sum do not depend on the order or the split, and the
export rank 0 writes is bit-identical to the single-process one on the same data (tested). Forced
routing, decided on the summed counts, runs on rank 0 alone over its first batch, which is the
whole run's first batch, as in a single process. gloo on CPU, NCCL on GPU (each rank on its
``LOCAL_RANK``'s GPU: :func:`execution_device`).

modelopt's own max calibration syncs amax over the default group too, but skips a quantizer whose
amax is missing on one rank (an expert that rank never routed to) while the others call the
collective: the ranks would deadlock. So its sync is turned off and this one, which first agrees
on which quantizers have data anywhere, runs instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Group:
    """This process's place in the job: ``rank`` of ``world`` processes."""

    rank: int
    world: int

    @property
    def writer(self) -> bool:
        """The rank that exports and reports."""
        return self.rank == 0

    def shard(self, batches: Sequence[Any]) -> list[Any]:
        return list(batches[self.rank :: self.world])


def execution_device(requested: str | torch.device | None = None) -> torch.device:
    """Where this process computes: ``requested`` (``cuda`` without an index: this rank's GPU), else
    this rank's GPU (``LOCAL_RANK`` under torchrun, else the first) when CUDA is available, else the CPU."""
    from ..base.errors import MoeUnfuseError

    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise MoeUnfuseError(f"--device {requested}: not a device; fix: pass cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and (not torch.cuda.is_available() or device.index >= torch.cuda.device_count()):
        raise MoeUnfuseError(
            f"--device {requested}: no such CUDA GPU here ({torch.cuda.device_count()} visible); fix: pass --device cpu or a GPU that exists"
        )
    if device.type not in ("cpu", "cuda"):
        raise MoeUnfuseError(f"--device {requested}: only cpu and cuda are supported; fix: pass cpu, cuda or cuda:N")
    return device


def from_env(device: torch.device | None = None) -> Group | None:
    """The process group torchrun describes in the environment (``WORLD_SIZE`` > 1), joined on first
    use (NCCL when this rank computes on a GPU, ``device``, else gloo); None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    device = device if device is not None else execution_device()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size())


def _collective_device() -> torch.device:
    """Where collectives' tensors must be: this rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_counts(table: dict[str, list[int]]) -> None:
    """Sum a table of per-expert token counts (``RoutingStats.counts`` or ``.forced``) over the
    ranks, in place. Every rank holds the same modules, so the same paths in the same order."""
    import torch.distributed as dist

    paths = sorted(table)
    flat = torch.tensor([c for p in paths for c in table[p]], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    values = flat.tolist()
    for p in paths:
        n = len(table[p])
        table[p], values = values[:n], values[n:]


def _quantizers(model: nn.Module) -> list[tuple[str, Any]]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def reduce_amax(model: nn.Module) -> int:
    """MAX-reduce every quantizer's amax over the ranks; a quantizer without data on one rank takes
    the others'. The ranks first agree on each amax's shape (``all_gather_object``), so every rank
    makes the same collectives in the same order. Returns how many amax were reduced."""
    import torch.distributed as dist

    quantizers = _quantizers(model)
    shapes = [tuple(q._amax.shape) if getattr(q, "_amax", None) is not None else None for _, q in quantizers]
    gathered: list[list[tuple[int, ...] | None]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, shapes)
    reduced = 0
    for i, (_, q) in enumerate(quantizers):
        shape = next((s[i] for s in gathered if s[i] is not None), None)
        if shape is None:
            continue
        amax = getattr(q, "_amax", None)
        home = amax.device if amax is not None else _collective_device()
        value = amax.detach().float().clone() if amax is not None else torch.full(shape, float("-inf"))
        value = value.to(_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        q.amax = value.to(home, amax.dtype if amax is not None else value.dtype)
        reduced += 1
    return reduced


def without_modelopt_sync(cfg: dict) -> dict:
    """``cfg`` with modelopt's own cross-rank amax sync off (see the module docstring)."""
    algorithm = cfg.get("algorithm", "max")
    algorithm = {"method": algorithm} if isinstance(algorithm, str) else dict(algorithm or {"method": "max"})
    algorithm["distributed_sync"] = False
    return {**cfg, "algorithm": algorithm}


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
