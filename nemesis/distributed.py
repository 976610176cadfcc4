"""Many processes through `torchrun`: which rank this process is, how work is split, the few collectives used.

`torchrun --nproc-per-node N` (and multi-node torchrun, or `srun torchrun` under SLURM) starts N
copies of the same command with RANK, WORLD_SIZE and LOCAL_RANK set. Work is split by position in
a list every rank builds the same way (`Ranks.share`), so the split needs no messages and a rank
can be given any subset. The process group itself is torch.distributed's; everything else is
passed around as a `Ranks` value.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

Item = TypeVar("Item")

# Ranks of an uneven grid wait at the end for the slowest one: hours, not torch's default 30 minutes.
WAIT_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank on this node: the GPU it takes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what is shared: run folders of a batch-sharded run, merged tables, summaries."""
        return self.rank == 0

    def share(self, items: Sequence[Item]) -> list[Item]:
        """This rank's items: every world_size-th, starting at its rank (each item goes to one rank)."""
        return list(items[self.rank :: self.world_size])

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks, in place (no-op in one process); returns it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE_PROCESS = Ranks()


def ranks_from_environment(environment: Mapping[str, str] | None = None) -> Ranks:
    """The rank torchrun gave this process, from RANK / WORLD_SIZE / LOCAL_RANK (one process without them)."""
    environment = os.environ if environment is None else environment
    world_size = int(environment.get("WORLD_SIZE", "1"))
    rank = int(environment.get("RANK", "0"))
    return Ranks(rank=rank, world_size=world_size, local_rank=int(environment.get("LOCAL_RANK", str(rank))))


def rank_device(ranks: Ranks, device: str | None) -> str | None:
    """Under torchrun each rank takes the GPU of its local rank unless a device is named with an index."""
    if ranks.distributed and device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device


def start(device: str | None = None) -> Ranks:
    """Join the job torchrun started (gloo on CPU, NCCL on GPUs) and return this process's ranks.

    Without torchrun this does nothing and returns one rank of one.
    """
    ranks = ranks_from_environment()
    if ranks.distributed and not dist.is_initialized():
        device = rank_device(ranks, device)
        use_cuda = device is not None and device.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=WAIT_TIMEOUT)
    return ranks


def stop() -> None:
    """Leave the process group (after a last barrier, so no rank exits while others still work)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
