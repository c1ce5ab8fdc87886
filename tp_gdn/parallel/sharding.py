"""How a full tensor splits across tensor-parallel ranks.

`Split(dim, sizes)`: the tensor's `dim` is a concatenation of segments of the given sizes (for a
fused projection: q, k, v, ...); each segment is cut into `world` equal blocks and rank p holds
block p of every segment, concatenated in segment order. `Replicate()`: every rank holds all.
Rules know nothing of what the tensor means; the model code and the loader's table pick them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Split:
    dim: int
    sizes: tuple[int, ...]

    def check(self, world: int) -> None:
        bad = [s for s in self.sizes if s % world]
        if bad:
            raise ValueError(f"segments {self.sizes} along dim {self.dim} do not split into {world} equal blocks")

    def ranges(self, rank: int, world: int) -> list[tuple[int, int]]:
        """[start, stop) index ranges along `dim` that rank `rank` holds, in order."""
        self.check(world)
        out, base = [], 0
        for size in self.sizes:
            block = size // world
            out.append((base + rank * block, base + (rank + 1) * block))
            base += size
        return out

    def full_size(self) -> int:
        return sum(self.sizes)

    def local_shape(self, full_shape: tuple[int, ...], world: int) -> tuple[int, ...]:
        self.check(world)
        shape = list(full_shape)
        shape[self.dim] = self.full_size() // world
        return tuple(shape)

    def take(self, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        if full.shape[self.dim] != self.full_size():
            raise ValueError(f"dim {self.dim} of a {tuple(full.shape)} tensor is not {self.full_size()}")
        parts = [full.narrow(self.dim, a, b - a) for a, b in self.ranges(rank, world)]
        return torch.cat(parts, dim=self.dim) if len(parts) > 1 else parts[0]

    def join(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece (pieces[r] = take(full, r, len(pieces)))."""
        world = len(pieces)
        self.check(world)
        out, off = [], 0
        for size in self.sizes:
            block = size // world
            out += [p.narrow(self.dim, off, block) for p in pieces]
            off += block
        return torch.cat(out, dim=self.dim)


@dataclass(frozen=True)
class Replicate:
    def check(self, world: int) -> None:
        pass

    def local_shape(self, full_shape: tuple[int, ...], world: int) -> tuple[int, ...]:
        return tuple(full_shape)

    def take(self, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        return full

    def join(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        return pieces[0]


Rule = Split | Replicate


def sharded_parameter(full_shape, rule: Rule, world: int, dtype, device) -> nn.Parameter:
    """An uninitialised parameter of this rank's shape that carries its rule as `shard_rule`."""
    p = nn.Parameter(torch.empty(rule.local_shape(tuple(full_shape), world), dtype=dtype, device=device),
                     requires_grad=False)
    p.shard_rule = rule
    p.full_shape = tuple(full_shape)
    return p


@torch.no_grad()
def load_full_(module: nn.Module, full: dict[str, torch.Tensor], rank: int, world: int) -> None:
    """Fill every parameter of `module` with its shard of the matching full tensor."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(full))
    extra = sorted(set(full) - set(params))
    if missing or extra:
        raise KeyError(f"full weights do not match the module: missing {missing}, unexpected {extra}")
    for name, p in params.items():
        t = full[name]
        if tuple(t.shape) != p.full_shape:
            raise ValueError(f"{name}: full tensor has shape {tuple(t.shape)}, expected {p.full_shape}")
        p.copy_(p.shard_rule.take(t, rank, world))


@torch.no_grad()
def gather_full(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The unsharded weights from every rank's module (modules[r] holds rank r's shards): the
    inverse of `load_full_`."""
    by_rank = [dict(m.named_parameters()) for m in modules]
    return {name: p.shard_rule.join([params[name] for params in by_rank]) for name, p in by_rank[0].items()}
