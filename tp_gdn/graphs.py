"""Decode steps replayed from CUDA graphs.

`GraphedDecoder(layers, cache)` captures, per batch size, one graph that runs every given layer
on the same input [B, H] (each sequence one token, continuing from its slot), all-reduce
included (NCCL collectives are captured too). A step copies the input rows and the slot indices
into the graph's static buffers and replays it: no allocation, no host synchronisation. The
graph is bound to this cache's tensors; the returned outputs are the graph's static buffers,
valid until the next step.
"""

from __future__ import annotations

import torch

from .batch import Batch
from .cache import StateCache


class GraphedDecoder:
    def __init__(self, layers: dict, cache: StateCache):
        if not layers:
            raise ValueError("GraphedDecoder needs at least one layer")
        first = next(iter(layers.values()))
        if first.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA layers; these are on {first.device}")
        if first.backend != "triton":
            raise ValueError("GraphedDecoder replays the Triton kernels; load the layers with backend 'triton'")
        self.layers, self.cache = layers, cache
        self.device, self.dtype, self.H = first.device, first.dtype, first.cfg.hidden_size
        self._graphs: dict[int, tuple] = {}

    def _capture(self, B: int):
        batch = Batch([1] * B, list(range(B)), [True] * B)
        meta = batch.meta(self.device)                 # static index buffers the graph reads
        x = torch.zeros(B, self.H, device=self.device, dtype=self.dtype)
        # compile kernels and warm cuBLAS on a scratch cache, so the real slots stay untouched
        scratch = StateCache(self.cache.cfg, list(self.layers), B, dtype=self.cache.dtype, device=self.device,
                             state_dtype=self.cache.state_dtype, tp_size=self.cache.tp_size)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for layer in self.layers.values():
                layer(x, batch, scratch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ys = {i: layer(x, batch, self.cache) for i, layer in self.layers.items()}
        return graph, x, meta, ys

    def __call__(self, x_BH: torch.Tensor, slots: list[int]) -> dict[int, torch.Tensor]:
        """One decode step of B = len(slots) sequences: {layer id: y [B, H]} (static buffers)."""
        B = len(slots)
        Batch([1] * B, slots, [True] * B)              # the usual checks: distinct slots >= 0
        bad = [s for s in slots if s >= self.cache.num_slots]
        if bad:
            raise ValueError(f"slot {bad[0]} is out of range: the cache has {self.cache.num_slots} slots")
        if tuple(x_BH.shape) != (B, self.H):
            raise ValueError(f"x has shape {tuple(x_BH.shape)}, expected [{B}, {self.H}]")
        if B not in self._graphs:
            self._graphs[B] = self._capture(B)
        graph, x, meta, ys = self._graphs[B]
        x.copy_(x_BH, non_blocking=True)
        meta.slots.copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
        graph.replay()
        return ys
