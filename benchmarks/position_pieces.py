"""What cutting a prefill call into position pieces costs one tp=P rank's compute, on one GPU.

    python benchmarks/position_pieces.py [--rows tp4-8x4096 ...] [--pieces 2 4] [--rounds 3]

A position piece holds the same stretch of positions of every sequence: piece p of Q holds
positions [p L/Q, (p+1) L/Q) of all n sequences, and later pieces continue from the state slots.
Cut this way, a piece keeps every (sequence, head) program of the core's sequential pass and a Q-th
of its chunks. Pieces of whole sequences (`GDNLayer.forward(overlap=N)`, `Batch.token_pieces`)
keep the chunks and lose programs instead, so there the pass takes about as long for a piece as
for the whole call. An all-reduce hidden behind the core (piece p's all-reduce while piece p+1
computes) would need position pieces. At tp >= 4 the output's all-reduce outlasts the tail (gated
norm and out_proj) that `forward(tail=N)` hides it behind; see benchmarks/RESULTS.md, forty-seventh
session.

No all-reduce runs here. A row `tpP-NxL` is one tp=P rank's share of the Qwen3-Next-80B layer (nk/P,
nv/P heads; compare_versions.py's layer-NxL-tpP), as a tp=1 layer, bf16, on N fresh sequences of L
tokens. Each row times:
- one call;
- "cut": Q pieces on x already in piece order, which is the cut alone;
- "gather": Q pieces with x gathered into piece order by `index_select` and each piece's y put back
  by `index_copy_`, which is what a layer would pay doing the cut with torch's copies.
The pieces' outputs and final states are first compared with the one call's. Then, for each
variant, it prints medians over interleaved rounds of three timings: the sum of its kernels' times
under the profiler, single calls (a sync after each), and calls back to back.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

DEFAULT_ROWS = ["tp4-8x4096", "tp2-8x4096", "tp8-8x4096"]


def parse_row(text: str) -> tuple[int, int, int]:
    """(P, n, L) from 'tpP-NxL'; ValueError says what a row takes."""
    from bench_layer import CFG
    from tp_gdn.batch import CHUNK

    m = re.fullmatch(r"tp(\d+)-(\d+)x(\d+)", text)
    if m and int(m[1]) >= 1 and CFG.num_k_heads % int(m[1]) == 0 and int(m[2]) >= 1 and \
            int(m[3]) >= CHUNK and int(m[3]) % CHUNK == 0:
        return int(m[1]), int(m[2]), int(m[3])
    raise ValueError(f"{text!r}: rows are tpP-NxL (P dividing {CFG.num_k_heads}, L a positive multiple of "
                     f"{CHUNK}), e.g. tp4-8x4096")


def piece_order(n: int, L: int, pieces: int, device=None):
    """(perm, batches) for cutting n packed sequences of L tokens (slots 0..n-1, fresh) into
    `pieces` position pieces: x.index_select(0, perm) puts the rows in piece order, piece p being
    rows [p n L/Q, (p+1) n L/Q) of that, and batches[p] its Batch (piece 0 starts fresh, the later
    ones continue from the slots). Each piece must span whole chunks, so that the chunks stay
    those of the one call."""
    from tp_gdn import Batch
    from tp_gdn.batch import CHUNK

    if pieces < 1 or L % pieces or (L // pieces) % CHUNK:
        raise ValueError(f"{pieces} pieces of {L} positions: each piece must hold a whole number of "
                         f"{CHUNK}-token chunks")
    Lp = L // pieces
    base = (torch.arange(n, device=device)[:, None] * L + torch.arange(Lp, device=device)[None, :]).flatten()
    perm = torch.cat([base + p * Lp for p in range(pieces)])
    batches = [Batch([Lp] * n, list(range(n)), [p > 0] * n) for p in range(pieces)]
    return perm, batches


def piece_calls(layer, x: torch.Tensor, cache, n: int, L: int, pieces: int):
    """(cut, gather, perm): cut() runs the pieces on x's rows already in piece order (a list of the
    pieces' outputs, in piece order); gather() gathers x into piece order, runs the pieces and puts
    each piece's output back in x's order (one tensor)."""
    perm, batches = piece_order(n, L, pieces, x.device)
    rows = n * (L // pieces)
    parts = [perm[p * rows:(p + 1) * rows] for p in range(pieces)]
    x_cut = x.index_select(0, perm)

    def cut():
        return [layer(x_cut[p * rows:(p + 1) * rows], batches[p], cache) for p in range(pieces)]

    def gather():
        xg = x.index_select(0, perm)
        y = torch.empty_like(x)
        for p in range(pieces):
            y.index_copy_(0, parts[p], layer(xg[p * rows:(p + 1) * rows], batches[p], cache))
        return y

    return cut, gather, perm


def run_row(P: int, n: int, L: int, pieces: list[int], rounds: int) -> None:
    from bench_layer import CFG, full_weights
    from timing import back_to_back, kernel_times, rel, timeit
    from tp_gdn import Batch, GDNLayer, StateCache

    dev, bf = torch.device("cuda"), torch.bfloat16
    cfg = dataclasses.replace(CFG, num_k_heads=CFG.num_k_heads // P, num_v_heads=CFG.num_v_heads // P)
    layer = GDNLayer.from_full(cfg, 0, full_weights(cfg=cfg), 0, 1, dtype=bf, device=dev, backend="triton")
    cache = StateCache(cfg, [0], n, dtype=bf, device=dev, tp_size=1)
    x = torch.randn(n * L, cfg.hidden_size, device=dev, dtype=bf, generator=torch.Generator(device=dev).manual_seed(1))
    whole = Batch([L] * n, list(range(n)), [False] * n)
    fns = {"one call": lambda: layer(x, whole, cache)}
    y1 = fns["one call"]().clone()
    s1 = cache.ssm[0].clone()
    print(f"tp={P} share ({cfg.num_k_heads}/{cfg.num_v_heads} heads), {n}x{L}", flush=True)
    for Q in pieces:
        cut, gather, perm = piece_calls(layer, x, cache, n, L, Q)
        yg = gather()
        sg = cache.ssm[0].clone()
        yc = torch.cat(cut())
        sc = cache.ssm[0].clone()
        print(f"  {Q} pieces against the one call: gather: output {rel(yg, y1):.1e} (bit-equal {yg.equal(y1)}), "
              f"state {rel(sg, s1):.1e}; cut: output {rel(yc, y1.index_select(0, perm)):.1e}, "
              f"state {rel(sc, s1):.1e}", flush=True)
        fns[f"{Q} pieces, cut"] = cut
        fns[f"{Q} pieces, gather"] = gather
    res = {k: {"kernels": [], "single": [], "back to back": []} for k in fns}
    last = {}
    for _ in range(rounds):
        for k, fn in fns.items():
            last[k] = kernel_times(fn, 5)
            res[k]["kernels"].append(sum(ms for ms, _ in last[k].values()))
            res[k]["single"].append(timeit(fn, iters=20))
            res[k]["back to back"].append(back_to_back(fn, iters=20))
    print(f"  medians of {rounds} interleaved rounds, ms:", flush=True)
    for k in fns:
        m = {c: statistics.median(v) for c, v in res[k].items()}
        print(f"  {k:18s} kernels {m['kernels']:.4f}  single {m['single']:.4f}  back to back {m['back to back']:.4f}",
              flush=True)
    print("  kernels of the last round (ms per call, launches per call):", flush=True)
    for k in fns:
        top = sorted(last[k].items(), key=lambda kv: -kv[1][0])[:8]
        print(f"  [{k}] " + ", ".join(f"{name[:32]} {ms:.3f} x{c}" for name, (ms, c) in top), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help=f"default: {' '.join(DEFAULT_ROWS)}")
    ap.add_argument("--pieces", type=int, nargs="+", default=[2, 4], help="piece counts (default 2 4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = ap.parse_args(argv)
    try:
        rows = [parse_row(r) for r in args.rows]
        for P, n, L in rows:
            for Q in args.pieces:
                piece_order(1, L, Q)
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("position_pieces.py times Triton kernels: it needs a CUDA GPU")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for P, n, L in rows:
        run_row(P, n, L, args.pieces, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
