"""Decode steps replayed from CUDA graphs.

`GraphedDecoder(layers, cache)` captures, per batch-size bucket, one graph that runs every given
layer on the same input [G, H] (each sequence one token, continuing from its slot), all-reduce
included (NCCL collectives are captured too). A step of B sequences replays the graph of the
smallest bucket G >= B (`buckets`; a B above the largest gets a graph of its own size): its rows
B..G-1 are padding, which all take the cache's padding slot (StateCache.padding_slot, past the
slots a batch can name), and whose outputs are left out. The kernels do the same work for them
as for any row and need no check for them (a check of a slot index -1 in the decode kernel cost
the 256-sequence step 0.3%: benchmarks/RESULTS.md, thirty-seventh session). Several padding rows
update the one padding slot at once, so its state means nothing, and no other row reads it.
A step copies the input rows into the graph's static buffer and replays it: no allocation, no
host synchronisation. The slot indices go to the graph's index buffer through a pinned host
buffer only when they differ from the last step's (and are checked then), so a steady decode
loop costs one copy and one replay on the host. A caller that writes the step's input straight
into `input_buffer(B)` and passes that buffer saves the copy too (as a model's previous stage
would). The graph is bound to this cache's tensors; the returned outputs are views of the
graph's static buffers, valid until the next step. Each replay counts the watched all-reduces
captured in it as queued (parallel/watchdog.py).
"""

from __future__ import annotations

import torch

from .batch import Batch
from .cache import StateCache
from .parallel import watchdog


# the default batch-size buckets: 1, 2, 4, then every multiple of 8 up to 512 (the decode sizes
# whose all-reduce fits the symmetric-memory kernel at hidden size 2048), so that a step pads at
# most 7 rows, and a loop whose batch shrinks as sequences end captures one graph per 8 sizes
DEFAULT_BUCKETS = (1, 2, 4, *range(8, 513, 8))


def check_buckets(buckets) -> tuple[int, ...] | None:
    """The buckets as a sorted tuple of distinct ints >= 1 (None: one graph per batch size)."""
    if buckets is None:
        return None
    out = []
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch-size buckets are ints >= 1, got {b!r}")
        out.append(b)
    if not out:
        raise ValueError("buckets must hold at least one size (None: one graph per batch size)")
    return tuple(sorted(set(out)))


def bucket_for(B: int, buckets: tuple[int, ...] | None) -> int:
    """The graph size a step of B sequences replays: the smallest bucket >= B, or B itself where
    none is (or buckets is None)."""
    if buckets is not None:
        for b in buckets:
            if b >= B:
                return b
    return B


def size_table(buckets: tuple[int, ...] | None) -> list[int]:
    """bucket_for(B, buckets) for B = 0 .. the largest bucket (empty where buckets is None): a
    step's graph size in one index."""
    return [bucket_for(B, buckets) for B in range(1 + buckets[-1])] if buckets else []


class GraphedDecoder:
    def __init__(self, layers: dict, cache: StateCache, buckets=DEFAULT_BUCKETS):
        """buckets: the graph sizes a step's batch is padded up to (check_buckets; None: one graph
        per batch size, no padding). Graphs are captured when a size is first asked for
        (`prepare` captures ahead)."""
        if not layers:
            raise ValueError("GraphedDecoder needs at least one layer")
        first = next(iter(layers.values()))
        if first.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA layers; these are on {first.device}")
        if first.backend != "triton":
            raise ValueError("GraphedDecoder replays the Triton kernels; load the layers with backend 'triton'")
        self.buckets = check_buckets(buckets)
        self._sizes = size_table(self.buckets)      # one index on a step's host path
        self.layers, self.cache = layers, cache
        self.device, self.dtype, self.H = first.device, first.dtype, first.cfg.hidden_size
        self._graphs: dict[int, dict] = {}      # per graph size: graph, static buffers, last slots, views

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

    def _views(self, g: dict, B: int) -> tuple:
        """(input rows, {layer id: output rows}) of the first B rows of graph g's buffers, formed
        once per B (the graph itself where B is its size)."""
        views = g.setdefault("views", {})
        if B not in views:
            n = g["x"].shape[0]
            views[B] = (g["x"], g["ys"]) if B == n else (g["x"][:B], {i: y[:B] for i, y in g["ys"].items()})
        return views[B]

    def graph_size(self, B: int) -> int:
        """The size of the graph that a step of B sequences replays (bucket_for)."""
        return self._sizes[B] if B < len(self._sizes) else B

    def prepare(self, B: int) -> None:
        """Capture the graph that B sequences replay now (a step captures it otherwise): it compiles
        and warms up on a scratch cache; the capture itself runs nothing."""
        if B < 1:
            raise ValueError(f"a decode step needs at least one sequence, got B={B}")
        G = self.graph_size(B)
        if G not in self._graphs:
            self._graphs[G] = self._capture(G)

    def input_buffer(self, B: int) -> torch.Tensor:
        """The static input rows [B, H] of the graph that B sequences replay (captured now if it is
        not yet): write a step's rows into it and pass it to the step, which then copies nothing."""
        self.prepare(B)
        return self._views(self._graphs[self.graph_size(B)], B)[0]

    def _check_slots(self, slots: tuple) -> tuple:
        """The slots as plain ints, after a Batch's checks plus the cache's range."""
        slots = Batch([1] * len(slots), slots, [True] * len(slots)).slots
        n = self.cache.num_slots
        bad = [s for s in slots if s >= n]
        if bad:
            raise ValueError(f"slot {bad[0]} is out of range: the cache has {n} slots")
        return slots

    def __call__(self, x_BH: torch.Tensor, slots: list[int]) -> dict[int, torch.Tensor]:
        """One decode step of B = len(slots) sequences: {layer id: y [B, H]} (views of the graph's
        static buffers).

        The host work before the replay is what a step that waits for its output adds to the
        GPU's time, so a steady loop takes a short path: x is the graph's own input buffer
        (nothing to check or copy) and slots is a list equal to the last step's (nothing to check
        or send)."""
        if not isinstance(slots, (list, tuple)):
            slots = list(slots)
        B = len(slots)
        if B == 0:
            raise ValueError("a decode step needs at least one sequence")
        G = self.graph_size(B)
        g = self._graphs.get(G)
        checked = g is None
        if checked:                 # refuse a bad x before capturing a graph for it
            self._check_input(x_BH, B)
            self.prepare(B)
            g = self._graphs[G]
        x_in, ys = self._views(g, B)
        if x_BH is not x_in and not checked:
            self._check_input(x_BH, B)
        if slots != g["last"]:          # a list, so a tuple or range never matches and is checked
            key = list(self._check_slots(tuple(slots)))
            if key != g["last"]:
                g["copied"].synchronize()        # the last copy out of the pinned buffer has run
                # rows B..G-1 pad the step to the graph's size, on the cache's padding slot
                g["host"].numpy()[:] = key + [self.cache.padding_slot] * (G - B)
                g["meta"].slots.copy_(g["host"], non_blocking=True)
                g["copied"].record()
                g["last"] = key
        if x_BH is not x_in and (x_BH.data_ptr() != x_in.data_ptr() or x_BH.stride() != x_in.stride()):
            x_in.copy_(x_BH, non_blocking=True)
        g["graph"].replay()
        if g["watched"]:
            watchdog.queue_replayed(g["watched"])
        return ys

    def _check_input(self, x_BH, B: int) -> None:
        if not isinstance(x_BH, torch.Tensor) or tuple(x_BH.shape) != (B, self.H):
            shape = tuple(x_BH.shape) if isinstance(x_BH, torch.Tensor) else type(x_BH).__name__
            raise ValueError(f"x has shape {shape}, expected [{B}, {self.H}]")
        if x_BH.dtype != self.dtype:
            raise ValueError(f"x is {x_BH.dtype}, but the layers hold {self.dtype} weights")
