"""Decode steps replayed from CUDA graphs.

`GraphedDecoder(layers, cache)` captures, per batch size, one graph that runs every given layer
on the same input [B, H] (each sequence one token, continuing from its slot), all-reduce
included (NCCL collectives are captured too). A step copies the input rows into the graph's
static buffer and replays it: no allocation, no host synchronisation. The slot indices go to
the graph's index buffer through a pinned host buffer only when they differ from the last
step's (and are checked then), so a steady decode loop costs one copy and one replay on the
host. A caller that writes the step's input straight into `input_buffer(B)` and passes that
buffer saves the copy too (as a model's previous stage would). The graph is bound to this
cache's tensors; the returned outputs are the graph's static buffers, valid until the next step.
Each replay counts the watched all-reduces captured in it as queued (parallel/watchdog.py).
"""

from __future__ import annotations

import torch

from .batch import Batch
from .cache import StateCache
from .parallel import watchdog


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
        self._graphs: dict[int, dict] = {}      # per batch size: graph, static buffers, last slots

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
        before = watchdog.captured_counts()
        with torch.cuda.graph(graph):
            ys = {i: layer(x, batch, self.cache) for i, layer in self.layers.items()}
        # the watched all-reduces a replay runs (their counts go up with each replay)
        watched = watchdog.replayed_calls(before, watchdog.captured_counts())
        host = torch.empty(B, dtype=torch.int64, pin_memory=True)
        return dict(graph=graph, x=x, meta=meta, ys=ys, host=host, copied=torch.cuda.Event(), last=None,
                    watched=watched)

    def prepare(self, B: int) -> None:
        """Capture the graph for B sequences now (a step captures it otherwise): it compiles and
        warms up on a scratch cache; the capture itself runs nothing."""
        if B < 1:
            raise ValueError(f"a decode step needs at least one sequence, got B={B}")
        if B not in self._graphs:
            self._graphs[B] = self._capture(B)

    def input_buffer(self, B: int) -> torch.Tensor:
        """The graph's static input [B, H] for B sequences (captured now if it is not yet): write a
        step's rows into it and pass it to the step, which then copies nothing."""
        self.prepare(B)
        return self._graphs[B]["x"]

    def _check_slots(self, slots: tuple) -> tuple:
        """The slots as plain ints, after a Batch's checks plus the cache's range."""
        slots = Batch([1] * len(slots), slots, [True] * len(slots)).slots
        n = self.cache.num_slots
        bad = [s for s in slots if s >= n]
        if bad:
            raise ValueError(f"slot {bad[0]} is out of range: the cache has {n} slots")
        return slots

    def __call__(self, x_BH: torch.Tensor, slots: list[int]) -> dict[int, torch.Tensor]:
        """One decode step of B = len(slots) sequences: {layer id: y [B, H]} (static buffers).

        The host work before the replay is what a step that waits for its output adds to the
        GPU's time, so a steady loop takes a short path: x is the graph's own input buffer
        (nothing to check or copy) and slots is a list equal to the last step's (nothing to check
        or send)."""
        if not isinstance(slots, (list, tuple)):
            slots = list(slots)
        B = len(slots)
        if B == 0:
            raise ValueError("a decode step needs at least one sequence")
        g = self._graphs.get(B)
        if g is None or x_BH is not g["x"]:
            self._check_input(x_BH, B)
        if g is None:
            self.prepare(B)
            g = self._graphs[B]
        if slots != g["last"]:          # a list, so a tuple or range never matches and is checked
            key = list(self._check_slots(tuple(slots)))
            if key != g["last"]:
                g["copied"].synchronize()        # the last copy out of the pinned buffer has run
                g["host"].numpy()[:] = key
                g["meta"].slots.copy_(g["host"], non_blocking=True)
                g["copied"].record()
                g["last"] = key
        if x_BH is not g["x"] and (x_BH.data_ptr() != g["x"].data_ptr() or x_BH.stride() != g["x"].stride()):
            g["x"].copy_(x_BH, non_blocking=True)
        g["graph"].replay()
        if g["watched"]:
            watchdog.queue_replayed(g["watched"])
        return g["ys"]

    def _check_input(self, x_BH, B: int) -> None:
        if not isinstance(x_BH, torch.Tensor) or tuple(x_BH.shape) != (B, self.H):
            shape = tuple(x_BH.shape) if isinstance(x_BH, torch.Tensor) else type(x_BH).__name__
            raise ValueError(f"x has shape {shape}, expected [{B}, {self.H}]")
        if x_BH.dtype != self.dtype:
            raise ValueError(f"x is {x_BH.dtype}, but the layers hold {self.dtype} weights")
