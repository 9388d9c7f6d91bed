"""Data-parallel training on PyTorch's own engine (torchrun + DistributedDataParallel).

``torchrun --nproc_per_node N -m charnn train ...`` starts N processes with
RANK/WORLD_SIZE/LOCAL_RANK set; each joins the process group (NCCL on CUDA,
gloo on CPU). A single process (no torchrun) gets a context whose collective
operations do nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .devices import pick_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        device = pick_device(name)
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # -- collectives (no-ops for one process) -------------------------------------------------
    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """True where any process says True (so every process stops at the same step)."""
        if not self.enabled:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather_rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every process's ``t`` along ``dim`` in rank order."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_from_env(device_name: str = "auto") -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if ctx.device(device_name).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return ctx


def shutdown(*, synchronise: bool = True) -> None:
    """Leave the process group. With ``synchronise``, first wait for every rank, so that no rank tears
    down gloo's connections while another still uses them (which now and then aborted a rank at exit)."""
    if dist.is_available() and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()
