"""Per-rank bodies for multi-process tests (spawned processes import them from here)."""

from __future__ import annotations

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
