"""Sharded layers equal the unsharded layer built from the same weights, and all ranks agree."""

import pytest
import torch

from helpers import random_full_weights, rel_err, run_ranks, tiny_config
from tp_gdn import GDNLayer, StateCache
from tp_gdn.workload import mixed_workload, run_steps
from workers import sharded_workload


@pytest.mark.parametrize("tp,nk,nv", [(2, 4, 8), (4, 4, 16), (8, 8, 16)])
def test_sharded_layer_equals_unsharded_layer(tmp_path, tp, nk, nv, seed):
    cfg = tiny_config("qwen3_next", nk=nk, nv=nv, dk=16, dv=8, layers=2)
    full = {i: random_full_weights(cfg, seed + i) for i in cfg.linear_layer_ids}
    steps = mixed_workload(cfg.hidden_size, seed)
    unsharded = {i: GDNLayer.from_full(cfg, i, w) for i, w in full.items()}
    want = run_steps(unsharded, StateCache(cfg, list(full), 8, tp_size=1), steps)
    results = run_ranks(tp, sharded_workload, tmp_path, cfg, full, steps, 8)
    for i in full:
        for n, w in enumerate(want[i]):
            for r in range(tp):
                assert torch.equal(results[r][i][n], results[0][i][n]), f"rank {r} differs, layer {i} step {n}"
            assert rel_err(results[0][i][n], w) < 1e-5, f"layer {i} step {n}"
