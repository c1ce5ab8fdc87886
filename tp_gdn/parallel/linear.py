"""Column- and row-parallel linear layers (no bias, as in the GDN projections).

ColumnParallelLinear: each rank holds a block of output rows (of every segment of a fused
projection) and produces its slice of the output; no communication.
RowParallelLinear: each rank holds a block of input columns, so each rank's product is a partial
sum; `forward` all-reduces it, so every rank returns the full output. Small outputs go through the
symmetric-memory all-reduce where it applies (comm.symmetric_all_reduce_for): the product is
written straight into its staging buffer (with torch's one-shot kernel, the mapped buffer itself),
and one kernel per rank sums the ranks' partial outputs; where that kernel is the flag-in-word one,
a first product that can (`pushing`: the few-row product at one token) also sends the peers their
words as it forms them, and the kernel only waits and sums. `forward(x, norm=...)` has the first
product form a gated norm of x as it reads it (the layer's decode steps of one token). Large
outputs that a caller forms in row chunks (the layer's tail) can take the copy-engine all-reduce
(`copy`, chunked_all_reduce_kind).
Either may hold `products` (set by the layer): functions product(x, W, out) -> x W^T, or None
where they leave x to the next; the first that takes x forms the product, else torch's cuBLAS
call. The layer's are its backend's kernel for decode steps of few tokens, then the cuBLASLt
products whose algorithm is picked by timing (blaslt.TunedGemm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import all_reduce_sum_, copy_engine_all_reduce_for, symmetric_all_reduce_for
from .sharding import Split, sharded_parameter


def product(module, x_TI: torch.Tensor, out: torch.Tensor | None = None, norm: tuple | None = None) -> torch.Tensor:
    """x W^T of a linear module: through the first of its `products` that takes x (returns other
    than None), else torch's cuBLAS call; into `out` where given. norm: a gated norm of x that the
    module's first product forms as it reads x (few_rows_product's); no other product takes one,
    so a call the first does not take is refused."""
    if norm is not None:
        y = module.products[0](x_TI, module.weight, out, norm=norm) if module.products else None
        if y is None:
            raise ValueError(f"no product of this module forms a gated norm of x {tuple(x_TI.shape)}")
        return y
    for p in module.products:
        y = p(x_TI, module.weight, out)
        if y is not None:
            return y
    if out is None:
        return F.linear(x_TI, module.weight)
    return torch.matmul(x_TI, module.weight.t(), out=out)


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_segments: tuple[int, ...], world: int, dtype, device):
        super().__init__()
        self.weight = sharded_parameter((sum(out_segments), in_features), Split(0, tuple(out_segments)),
                                        world, dtype, device)
        # product(x, W, out) -> x W^T, or None to leave x to the next (the last: torch's cuBLAS call)
        self.products = ()

    def forward(self, x_TI: torch.Tensor) -> torch.Tensor:
        return product(self, x_TI)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, world: int, dtype, device, group=None):
        super().__init__()
        self.group, self.world = group, world
        self.weight = sharded_parameter((out_features, in_features), Split(1, (in_features,)),
                                        world, dtype, device)
        # a collective where tp > 1 under a process group: every rank builds its layers in the same order
        self.symm = symmetric_all_reduce_for(group, device) if world > 1 else None
        # for outputs formed in row chunks (GDNLayer.forward's tail); None where it does not apply
        self.copy = copy_engine_all_reduce_for(group, device) if world > 1 else None
        self.products = ()     # as ColumnParallelLinear's

    def all_reduce_kind(self, rows: int) -> str:
        """Which all-reduce `forward` runs on an output of `rows` rows: "none" (tp = 1), "symm"
        (comm.SymmetricAllReduce) or "group" (the process group's own: NCCL, or gloo on CPUs)."""
        if self.world == 1:
            return "none"
        fits = self.symm is not None and self.symm.fits(rows * self.weight.shape[0], self.weight.dtype)
        return "symm" if fits else "group"

    def chunked_all_reduce_kind(self, rows: int) -> str:
        """Which all-reduce an output of `rows` rows formed in row chunks takes (GDNLayer.forward's
        tail): "copy" (comm.CopyEngineAllReduce) where the whole output would take the process
        group's, the copy-engine one applies and rows >= its MIN_ROWS, else all_reduce_kind(rows)."""
        kind = self.all_reduce_kind(rows)
        return "copy" if kind == "group" and self.copy is not None and rows >= self.copy.MIN_ROWS else kind

    def partial(self, x_TI: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
        """This rank's partial sum of the output, before the all-reduce (norm: as forward's)."""
        return product(self, x_TI, norm=norm)

    def forward(self, x_TI: torch.Tensor, norm: tuple | None = None) -> torch.Tensor:
        """The full output of x (every rank's the same). norm: x is the mixer's o, and the first
        product forms its gated norm as it reads it (`product`'s norm)."""
        kind = self.all_reduce_kind(x_TI.numel() // x_TI.shape[-1])
        if kind == "symm":      # the product goes straight into the all-reduce's staging buffer
            staged = self.symm.staging((*x_TI.shape[:-1], self.weight.shape[0]), x_TI.dtype)
            # where the all-reduce takes words that the first product can push as it forms them (the
            # few-row product at one token), it does, and the all-reduce only waits and sums
            push = self.symm.word_push(staged)
            pushing = getattr(self.products[0], "pushing", None) if self.products else None
            pushed = push is not None and pushing is not None and \
                pushing(x_TI, self.weight, staged, push, norm=norm) is not None
            if not pushed:
                product(self, x_TI, out=staged, norm=norm)
            return self.symm.reduce_out(staged, torch.empty_like(staged), pushed=pushed)
        y = self.partial(x_TI, norm)
        # a layer sharded for one rank holds the whole sum, even inside a larger process group
        return all_reduce_sum_(y, self.group) if kind == "group" else y
