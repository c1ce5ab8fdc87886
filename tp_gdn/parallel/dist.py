"""Process-group set-up: one small function that creates a group only when asked or when
torchrun's variables are there, and one that tears it down only if one exists."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .comm import release_symmetric_buffers


def init_distributed(
    backend: str | None = None,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_s: float = 600.0,
) -> None:
    """Join the default process group.

    With no arguments this reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...);
    with none set it does nothing and the process runs alone (rank 0 of 1). Backend: nccl when
    CUDA is available, else gloo. On CUDA the process binds to device LOCAL_RANK first.
    `init_method`/`rank`/`world_size` allow an explicit rendezvous (a file:// or tcp:// URL).
    It returns on a rank only once every rank of the group has joined it.
    """
    if dist.is_initialized():
        return
    if init_method is None and "RANK" not in os.environ:
        return
    if rank is None:
        rank = int(os.environ["RANK"])
    if world_size is None:
        world_size = int(os.environ["WORLD_SIZE"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_id = None
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        device_id = torch.device("cuda", local)
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device_id,
    )
    if backend == "gloo":
        # Building a gloo group is not a rendezvous: a rank can finish its own connections, do
        # work that needs no collective, tear the group down and exit while a peer is still
        # connecting, and the peer's init then fails with "Connection closed by peer" (seen once
        # in CI). One barrier makes every rank return only once all of them hold a working
        # group. NCCL's init is collective already: device_id makes it create the communicator
        # now, which every rank must join.
        dist.barrier()


def destroy_distributed() -> None:
    if dist.is_initialized():
        release_symmetric_buffers()
        dist.destroy_process_group()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def local_device() -> torch.device:
    """The device this rank computes on: its CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
