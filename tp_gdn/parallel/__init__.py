"""Tensor-parallel building blocks; nothing here knows about GDN."""

from .comm import all_reduce_sum_
from .dist import destroy_distributed, get_rank, get_world_size, init_distributed, local_device
from .linear import ColumnParallelLinear, RowParallelLinear
from .sharding import Replicate, Rule, Split, gather_full, load_full_, sharded_parameter

__all__ = [
    "init_distributed", "destroy_distributed", "get_rank", "get_world_size", "local_device",
    "all_reduce_sum_", "ColumnParallelLinear", "RowParallelLinear",
    "Split", "Replicate", "Rule", "sharded_parameter", "load_full_", "gather_full",
]
