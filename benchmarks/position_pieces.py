"""Prefill cut into position pieces, against the one call: one tp=P rank's compute on one GPU, or
the whole tp=P layer with each piece's all-reduce running while the next piece computes.

    python benchmarks/position_pieces.py [--rows tp4-8x4096 ...] [--pieces 2 4] [--rounds 3]
    torchrun --standalone --nproc-per-node P benchmarks/position_pieces.py --rows tpP-8x4096 [--pieces 2 4]

A position piece holds the same stretch of positions of every sequence: piece p of Q holds
positions [p L/Q, (p+1) L/Q) of all n sequences, and later pieces continue from the state slots.
Cut this way, a piece keeps every (sequence, head) program of the core's sequential pass and a Q-th
of its chunks. Pieces of whole sequences (`GDNLayer.forward(overlap=N)`, `Batch.token_pieces`)
keep the chunks and lose programs instead, so there the pass takes about as long for a piece as
for the whole call. An all-reduce hidden behind the core (piece p's all-reduce while piece p+1
computes) would need position pieces. At tp >= 4 the output's all-reduce outlasts the tail (gated
norm and out_proj) that `forward(tail=N)` hides it behind; see benchmarks/RESULTS.md, forty-seventh
session.

A row `tpP-NxL` is the Qwen3-Next-80B layer (bench_layer.py's weights), bf16, on N fresh sequences
of L tokens, at tp=P:
- In one process, one tp=P rank's share of it (nk/P, nv/P heads; compare_versions.py's
  layer-NxL-tpP) runs as a tp=1 layer: the rank's compute, with no all-reduce.
- Under torchrun with P processes (one GPU each), the layer runs sharded, and each piece's output
  is all-reduced as soon as its out_proj product is formed. That goes through the layer's own
  row-chunk path (`GDNLayer._out_proj_by_rows`, which the tail uses) on NCCL's stream ("group"),
  and also on the copy engines ("copy") where they apply. Every rank runs the same fixed number of
  calls.

Each row times these variants:
- one call (the layer's default path);
- "cut": Q pieces on x already in piece order, with output in piece order (the cut alone);
- "gather": Q pieces with x gathered into piece order and y put back in x's order, both by
  `index_select` (what a layer doing the cut with torch's copies would pay).
The pieces' outputs and final states are first compared with the one call's. Then, for each
variant, it prints medians over interleaved rounds of three timings:
- the sum of the GPU work under the profiler, every stream's (at tp > 1 the all-reduce's kernels
  and copies too, though they overlap);
- single calls (a sync after each);
- calls back to back.
Output from rank 0.
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
    """(cut, gather, perm), for a layer at any tp: cut(kind) runs the pieces on x's rows already in
    piece order, each piece's out_proj rows all-reduced as they are formed (kind: "copy" for the
    copy engines, else the process group's all-reduce on its stream; none on one rank), and
    returns y in piece order; gather(kind) gathers x into piece order, does the same and returns y
    in x's order."""
    perm, batches = piece_order(n, L, pieces, x.device)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    rows = n * (L // pieces)
    x_cut = x.index_select(0, perm)

    def run(xc, kind):
        parts = ((p * rows, (p + 1) * rows, layer.partial_core(xc[p * rows:(p + 1) * rows], batches[p], cache))
                 for p in range(pieces))
        return layer._out_proj_by_rows(xc, parts, kind)

    def cut(kind):
        return run(x_cut, kind)

    def gather(kind):
        return run(x.index_select(0, perm), kind).index_select(0, inv)

    return cut, gather, perm


def run_row(P: int, n: int, L: int, pieces: list[int], rounds: int, rank: int, world: int, dev) -> None:
    from bench_layer import CFG, full_weights
    from timing import back_to_back, kernel_times, rel, timeit
    from tp_gdn import Batch, GDNLayer, StateCache

    bf = torch.bfloat16
    if world == 1:      # one rank's share as a tp=1 layer of its heads
        cfg = dataclasses.replace(CFG, num_k_heads=CFG.num_k_heads // P, num_v_heads=CFG.num_v_heads // P)
        layer = GDNLayer.from_full(cfg, 0, full_weights(cfg=cfg), 0, 1, dtype=bf, device=dev, backend="triton")
        kinds = ["none"]
        what = f"tp={P} share ({cfg.num_k_heads}/{cfg.num_v_heads} heads) as a tp=1 layer, no all-reduce"
    else:
        cfg = CFG
        layer = GDNLayer.from_full(cfg, 0, full_weights(), rank, world, dtype=bf, device=dev, backend="triton")
        kinds = ["group"] + (["copy"] if layer.out_proj.copy is not None else [])
        what = f"the layer at tp={P} ({world} GPUs), each piece all-reduced on {' and '.join(kinds)}"
    cache = StateCache(cfg, [0], n, dtype=bf, device=dev, tp_size=world)
    x = torch.randn(n * L, cfg.hidden_size, device=dev, dtype=bf, generator=torch.Generator(device=dev).manual_seed(1))
    whole = Batch([L] * n, list(range(n)), [False] * n)
    fns = {"one call": lambda: layer(x, whole, cache)}
    y1 = fns["one call"]().clone()
    s1 = cache.ssm[0].clone()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{what}, {n}x{L}", flush=True)
    for Q in pieces:
        cut, gather, perm = piece_calls(layer, x, cache, n, L, Q)
        y_order = y1.index_select(0, perm)
        for kind in kinds:
            tag = "" if kind == "none" else f", {kind}"
            yc = cut(kind)
            sc = cache.ssm[0].clone()
            say(f"  {Q} pieces{tag}, cut, against the one call: output {rel(yc, y_order):.1e} "
                f"(bit-equal {yc.equal(y_order)}), state {rel(sc, s1):.1e} (bit-equal {sc.equal(s1)})", flush=True)
            fns[f"{Q} pieces{tag}, cut"] = lambda cut=cut, kind=kind: cut(kind)
        yg = gather(kinds[-1])
        tag = "" if kinds[-1] == "none" else f", {kinds[-1]}"
        say(f"  {Q} pieces{tag}, gather, against the one call: output {rel(yg, y1):.1e} (bit-equal {yg.equal(y1)})",
            flush=True)
        fns[f"{Q} pieces{tag}, gather"] = lambda gather=gather, kind=kinds[-1]: gather(kind)
    res = {k: {"gpu work": [], "single": [], "back to back": []} for k in fns}
    last = {}
    for _ in range(rounds):
        for k, fn in fns.items():
            last[k] = kernel_times(fn, 5)
            res[k]["gpu work"].append(sum(ms for ms, _ in last[k].values()))
            res[k]["single"].append(timeit(fn, iters=20))
            res[k]["back to back"].append(back_to_back(fn, iters=20))
    say(f"  medians of {rounds} interleaved rounds, ms (rank 0):", flush=True)
    for k in fns:
        m = {c: statistics.median(v) for c, v in res[k].items()}
        say(f"  {k:26s} GPU work {m['gpu work']:.4f}  single {m['single']:.4f}  back to back {m['back to back']:.4f}",
            flush=True)
    say("  GPU work of the last round (ms per call, launches per call):", flush=True)
    for k in fns:
        top = sorted(last[k].items(), key=lambda kv: -kv[1][0])[:9]
        say(f"  [{k}] " + ", ".join(f"{name[:32]} {ms:.3f} x{c}" for name, (ms, c) in top), flush=True)


def main(argv=None) -> int:
    from tp_gdn.parallel import destroy_distributed, get_rank, get_world_size, init_distributed, local_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                    help=f"default: {' '.join(DEFAULT_ROWS)} in one process, tpP-8x4096 under torchrun with P ranks")
    ap.add_argument("--pieces", type=int, nargs="+", default=[2, 4], help="piece counts (default 2 4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = ap.parse_args(argv)
    init_distributed()
    rank, world = get_rank(), get_world_size()
    if world > 1 and args.rows == DEFAULT_ROWS:
        args.rows = [f"tp{world}-8x4096"]
    try:
        rows = [parse_row(r) for r in args.rows]
        for P, n, L in rows:
            if world > 1 and P != world:
                raise ValueError(f"tp{P}-{n}x{L}: under torchrun a row's tp is the number of ranks ({world})")
            for Q in args.pieces:
                piece_order(1, L, Q)
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("position_pieces.py times Triton kernels: it needs a CUDA GPU (one per rank)")
    # alone (no process group) on the current GPU; under torchrun on the rank's GPU (NCCL)
    dev = local_device() if world > 1 else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        raise SystemExit("position_pieces.py: the ranks' process group is not on their GPUs (NCCL); "
                         "start it under torchrun on a CUDA machine")
    torch.cuda.set_device(dev)
    if rank == 0:
        print(f"device {torch.cuda.get_device_name(dev)} x{world}, torch {torch.__version__}", flush=True)
    for P, n, L in rows:
        run_row(P, n, L, args.pieces, args.rounds, rank, world, dev)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
