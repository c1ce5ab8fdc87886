"""Per-rank bodies for multi-process tests (spawned processes import them from here)."""

from __future__ import annotations

import contextlib

import torch

from tp_gdn import GDNLayer, StateCache, load_layers
from tp_gdn.workload import run_steps


def sharded_workload(rank, world, cfg, full_by_layer, steps, num_slots, dtype=torch.float32):
    """Build this rank's shard of each layer from full weights and run the steps."""
    layers = {i: GDNLayer.from_full(cfg, i, full, rank, world, dtype=dtype) for i, full in full_by_layer.items()}
    cache = StateCache(cfg, list(layers), num_slots, dtype=dtype)
    return run_steps(layers, cache, steps)


def checkpoint_workload(rank, world, ckpt_dir, steps, num_slots, dtype=torch.float32):
    """Load this rank's shard of every GDN layer from a checkpoint and run the steps."""
    layers = load_layers(ckpt_dir, dtype=dtype)
    cache = StateCache(layers[next(iter(layers))].cfg, list(layers), num_slots, dtype=dtype)
    return run_steps(layers, cache, steps)


def _forward_each_step(rank, world, cfg, full_by_layer, steps, num_slots, **forward_kw):
    """Like sharded_workload, calling every layer with the keyword arguments `forward_kw`."""
    layers = {i: GDNLayer.from_full(cfg, i, full, rank, world) for i, full in full_by_layer.items()}
    cache = StateCache(cfg, list(layers), num_slots)
    out = {i: [] for i in layers}
    for st in steps:
        for i, layer in layers.items():
            out[i].append(layer(st.x, st.batch, cache, **forward_kw))
    return out


def overlapped_workload(rank, world, cfg, full_by_layer, steps, num_slots, pieces):
    """Like sharded_workload, with every call cut into `pieces` token pieces whose all-reduces
    overlap the next piece (GDNLayer.forward(overlap=pieces))."""
    return _forward_each_step(rank, world, cfg, full_by_layer, steps, num_slots, overlap=pieces)


def all_reduce_choice(rank, world, cfg, full, mode):
    """Build a layer under TP_GDN_ALL_REDUCE=mode and report which all-reduce its out_proj takes
    for 1 and 10^6 rows, and for 10^6 rows formed in row chunks (the layer's tail), or the error
    its construction raised."""
    import os

    os.environ["TP_GDN_ALL_REDUCE"] = mode
    try:
        layer = GDNLayer.from_full(cfg, 0, full, rank, world)
    except ValueError as e:
        return f"ValueError: {e}"
    o = layer.out_proj
    return o.all_reduce_kind(1), o.all_reduce_kind(10 ** 6), o.chunked_all_reduce_kind(10 ** 6)


def tail_chunks_workload(rank, world, cfg, full_by_layer, steps, num_slots, chunks):
    """Like sharded_workload, with every call's gated norm, out_proj and all-reduce cut into
    `chunks` row chunks (GDNLayer.forward(tail=chunks); None: the layer's default); also returns
    the rows of each chunk all-reduce that was started."""
    from tp_gdn import layer as layer_module

    started = []
    start = layer_module.all_reduce_sum_async_

    def counted(x, group=None):
        started.append(x.shape[0])
        return start(x, group)

    layer_module.all_reduce_sum_async_ = counted
    return _forward_each_step(rank, world, cfg, full_by_layer, steps, num_slots, tail=chunks), started


class GlooChunkedAllReduce:
    """Stands in for comm.CopyEngineAllReduce on CPU ranks: the same calls (start, then partial
    and reduce per chunk, then finish), each chunk summed through the process group (gloo); logs
    every call, so a test sees how the layer drives it."""

    MAX_CHUNKS = 6

    def __init__(self, min_rows: int, group=None):
        self.MIN_ROWS, self.group, self.log = min_rows, group, []

    def start(self, rows, cols, dtype):
        self.log.append(("start", rows, cols))
        return _GlooChunkedCall(self, torch.full((rows, cols), float("nan"), dtype=dtype))


class _GlooChunkedCall:
    def __init__(self, ar, own):
        self.ar, self.own = ar, own

    def partial(self, r0, r1):
        return self.own[r0:r1]

    def reduce(self, r0, r1, out, last=False):
        import torch.distributed as dist

        out.copy_(self.own[r0:r1])
        dist.all_reduce(out, group=self.ar.group)
        self.ar.log.append(("reduce last" if last else "reduce", r1 - r0))

    def finish(self):
        self.ar.log.append(("finish",))

    def abort(self):
        self.ar.log.append(("abort",))


def chunked_stand_in_workload(rank, world, cfg, full_by_layer, steps, num_slots, refused_tail, min_rows):
    """Every layer's out_proj with GlooChunkedAllReduce (taking outputs from min_rows rows) as its
    copy-engine all-reduce, the steps run with forward's defaults: (outputs, the stand-in's log,
    the error a call with tail=refused_tail raised, or None)."""
    layers = {i: GDNLayer.from_full(cfg, i, full, rank, world) for i, full in full_by_layer.items()}
    stand_in = GlooChunkedAllReduce(min_rows)
    for layer in layers.values():
        layer.out_proj.copy = stand_in
    cache = StateCache(cfg, list(layers), num_slots)
    out = run_steps(layers, cache, steps)
    err = None
    try:
        st = steps[0]
        layers[next(iter(layers))](st.x, st.batch, cache, tail=refused_tail)
    except ValueError as e:
        err = str(e)
    return out, stand_in.log, err


@contextlib.contextmanager
def failing_norm(layer, fail_at: int):
    """Within the block, the layer's gated norm raises RuntimeError("injected failure in norm
    call N") on its fail_at-th call (N = fail_at; 0: never) and computes as before otherwise."""
    norm, calls = layer.ops.gated_rmsnorm, []

    def failing(*args, **kw):
        calls.append(None)
        if len(calls) == fail_at:
            raise RuntimeError(f"injected failure in norm call {fail_at}")
        return norm(*args, **kw)

    layer.ops.gated_rmsnorm = failing
    try:
        yield
    finally:
        layer.ops.gated_rmsnorm = norm


def chunked_stand_in_failure(rank, world, cfg, full_by_layer, steps, num_slots, fail_at):
    """The first layer with GlooChunkedAllReduce (from 0 rows), its gated norm raising on its
    fail_at-th call on every rank (1: inside the tail's first part; 0: the stand-in's start
    raising instead), in a call of steps[0] with tail=4: (the stand-in's log, the error the call
    raised)."""
    lid, full = next(iter(full_by_layer.items()))
    layer = GDNLayer.from_full(cfg, lid, full, rank, world)
    stand_in = GlooChunkedAllReduce(0)
    layer.out_proj.copy = stand_in
    if fail_at == 0:
        def refuse(rows, cols, dtype):
            stand_in.log.append(("start refused",))
            raise RuntimeError("injected failure in start")
        stand_in.start = refuse
    try:
        with failing_norm(layer, fail_at):
            layer(steps[0].x, steps[0].batch, StateCache(cfg, [lid], num_slots), tail=4)
    except RuntimeError as e:
        return stand_in.log, str(e)
    return stand_in.log, None


def watchdog_ends_rank0(rank, world):
    """Rank 0 holds a watched count that never moves (a stand-in for a GPU waiting on a peer) under
    a 0.5 s watchdog with its real ending, and sleeps; the other ranks return at once."""
    import time

    from tp_gdn.parallel.watchdog import Progress, Watchdog

    if rank == 0:
        p = Progress("rank 0's stand-in", pinned=False)
        Watchdog(0.5, poll_s=0.05).watch(p)
        p.launched(1)
        time.sleep(60)
    return rank


def join_and_leave(rank, world, init_file, out_dir, hold_s):
    """Join a gloo group through init_distributed, rank 0 holding for `hold_s` seconds right
    after its group is built, then leave at once; write when the group was built and when
    init_distributed returned."""
    import json
    import time
    from pathlib import Path

    import torch.distributed as dist

    from tp_gdn.parallel import destroy_distributed, init_distributed

    build = dist.init_process_group
    built = []

    def build_then_hold(*args, **kwargs):
        build(*args, **kwargs)
        built.append(time.time())
        if rank == 0:
            time.sleep(hold_s)

    dist.init_process_group = build_then_hold
    init_distributed(backend="gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    returned = time.time()
    destroy_distributed()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"built": built[0], "returned": returned}))


def fail_on_rank(rank, world, failing, message):
    """Rank `failing` raises RuntimeError(message); every other rank waits in a barrier, which
    fails once the failing rank has left the group."""
    import torch.distributed as dist

    if rank == failing:
        raise RuntimeError(message)
    dist.barrier()


def position_pieces_workload(rank, world, cfg, full, seed, n, L, pieces):
    """benchmarks/position_pieces.py's pieces at this tp on the torch layer: the one call's output
    and state, then for each piece count the cut's (output in piece order, its permutation) and
    state, and the gather's output, each piece's rows all-reduced by the process group (gloo) as
    the layer's row-chunk path does it. The slots hold noise before each run (piece 0 starts fresh)."""
    from helpers import load_benchmark

    from tp_gdn import Batch

    pp = load_benchmark("position_pieces")
    layer = GDNLayer.from_full(cfg, 0, full, rank, world)
    cache = StateCache(cfg, [0], n, tp_size=world)
    x = torch.randn(n * L, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    out = {"one": (layer(x, Batch([L] * n, list(range(n)), [False] * n), cache), cache.ssm[0].clone())}
    for Q in pieces:
        cut, gather, perm = pp.piece_calls(layer, x, cache, n, L, Q)
        cache.ssm[0].normal_()
        y_cut = cut("group")
        s_cut = cache.ssm[0].clone()
        cache.ssm[0].normal_()
        out[Q] = (y_cut, perm, s_cut, gather("group"), cache.ssm[0].clone())
    return out
