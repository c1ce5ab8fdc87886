"""The collectives the tensor-parallel layer uses, each one call, visible at its call site."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum_(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `x` over the ranks of `group` in place and return it (a no-op on one rank)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_reduce_sum_async_(x: torch.Tensor, group=None):
    """Start summing `x` over the ranks of `group` in place; returns the work to `wait()` on
    (None on one rank). NCCL runs it on its own stream, so later kernels overlap it."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        return dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return None
