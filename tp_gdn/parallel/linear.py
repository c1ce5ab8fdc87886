"""Column- and row-parallel linear layers (no bias, as in the GDN projections).

ColumnParallelLinear: each rank holds a block of output rows (of every segment of a fused
projection) and produces its slice of the output; no communication.
RowParallelLinear: each rank holds a block of input columns, so each rank's product is a partial
sum; `forward` all-reduces it, so every rank returns the full output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import all_reduce_sum_
from .sharding import Split, sharded_parameter


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_segments: tuple[int, ...], world: int, dtype, device):
        super().__init__()
        self.weight = sharded_parameter((sum(out_segments), in_features), Split(0, tuple(out_segments)),
                                        world, dtype, device)

    def forward(self, x_TI: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TI, self.weight)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, world: int, dtype, device, group=None):
        super().__init__()
        self.group, self.world = group, world
        self.weight = sharded_parameter((out_features, in_features), Split(1, (in_features,)),
                                        world, dtype, device)

    def partial(self, x_TI: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the output, before the all-reduce."""
        return F.linear(x_TI, self.weight)

    def forward(self, x_TI: torch.Tensor) -> torch.Tensor:
        y = self.partial(x_TI)
        # a layer sharded for one rank holds the whole sum, even inside a larger process group
        return all_reduce_sum_(y, self.group) if self.world > 1 else y
