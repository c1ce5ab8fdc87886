"""One launch setting of one prefill path, in a process of its own: check it against the fp64
reference, then time that path's sweep workloads (SWEEP_ROWS) at each dv split (BV; the scan
path picks its own). Used by `bench_kernels.py --sweep`, so that a setting that faults cannot
poison the others.

    python benchmarks/check_launch.py split '{"pass": {"num_warps": 4, "num_stages": 2}}'
    python benchmarks/check_launch.py scan '{"scan": {"num_warps": 8, "num_stages": 3}}'
    python benchmarks/check_launch.py fused '{"fused": {"num_warps": 8, "num_stages": 2}}'
prints `bad <relative error>` or one JSON line {workload: {BV or "auto": ms}}.
"""

from __future__ import annotations

import json
import sys

import torch

from tp_gdn import Batch
from tp_gdn.kernels import reference as ref
from tp_gdn.kernels import triton_chunk
from tp_gdn.kernels.triton_ops import gdn_prefill
from tp_gdn.loader.synthetic import gate_parameters

BVS = {"split": (16, 32, 64, 128), "fused": (64, 128), "scan": (None,)}
# The workloads each path's sweep times: ones on which choose_path takes that path, so that the
# setting kept is the one such calls run with (tests/test_benchmarks.py checks it). Split: the tp=1
# layer's core at 1x4096 and a tp=8 rank's at 8x4096; scan: one long prompt on a tp=4 rank and
# a tp=2 rank's core at 1x4096. Until the thirty-third session the split and fused sweeps timed
# bench_kernels.py's rows, where the split path is never chosen.
SWEEP_ROWS = {
    "split": [("prefill 1x4096, 16/32", 1, 4096, 16, 32), ("prefill 8x4096, 2/4", 8, 4096, 2, 4)],
    "scan": [("prefill 1x32768, 4/8", 1, 32768, 4, 8), ("prefill 1x4096, 8/16", 1, 4096, 8, 16)],
    "fused": [("prefill 8x4096, 16/32", 8, 4096, 16, 32), ("prefill 8x4096, 8/16", 8, 4096, 8, 16),
              ("prefill 8x4096, 4/8", 8, 4096, 4, 8)],
}


def worst_error(path):
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for lens, nk, nv in [([700, 65, 2, 129], 2, 4), ([300, 64], 4, 4)]:
        T = sum(lens)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        q, k, v, a, b = r(T, nk, 128), r(T, nk, 128), r(T, nv, 128), r(T, nv), r(T, nv)
        A_log, dt = gate_parameters(nv, g, torch.float64)
        pool = r(len(lens), nv, 128, 128) * 0.1
        batch = Batch(lens, list(range(len(lens))), [i % 2 == 0 for i in range(len(lens))])
        gg, beta = ref.gdn_gating(a, b, A_log, dt)
        p64 = pool.clone()
        want = ref.gated_delta_rule_varlen(ref.l2norm(q) * 128 ** -0.5, ref.l2norm(k), v, gg, beta, p64,
                                           batch.seq_lens, batch.slots, batch.has_state)
        bf = lambda x: x.to("cuda", torch.bfloat16)
        for bv in BVS[path]:
            p = pool.float().cuda()
            got = gdn_prefill(bf(q), bf(k), bf(v), bf(a), bf(b), A_log.float().cuda(), dt.float().cuda(), p, batch,
                              BV=bv, path=path)
            torch.cuda.synchronize()
            worst = max(worst, ((got.double().cpu() - want).norm() / want.norm()).item(),
                        ((p.double().cpu() - p64).norm() / p64.norm()).item())
    return worst


def main():
    path = sys.argv[1]
    triton_chunk.LAUNCH.update(json.loads(sys.argv[2]))
    err = worst_error(path)
    if not err < 1e-2:
        print(f"bad {err:.2e}")
        return
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_kernels import prefill_inputs
    from timing import timeit
    times = {}
    for name, n, L, nk, nv in SWEEP_ROWS[path]:
        x = prefill_inputs(n, L, nk, nv)
        pool = x["h0"].clone()
        times[name] = {"auto" if bv is None else bv: timeit(
            lambda: gdn_prefill(x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], pool, x["batch"],
                                BV=bv, path=path), iters=5, warmup=1)
                       for bv in BVS[path]}
    print(json.dumps(times))


if __name__ == "__main__":
    main()
