"""Core GDN kernels, ours against fla-core, on one GPU, in the same run on the same inputs.

    python benchmarks/bench_kernels.py [--sweep split|scan|fused|all|decode|conv] [--launch JSON] [--json OUT.json]
                                       [--rows TEXT ...] [--no-variants]

Workloads (Qwen3-Next-80B GDN dims, dk = dv = 128, bf16 q/k/v, fp32 state, l2norm and gating
inside on both sides, initial states read and final states written on both sides):
  prefill 8x4096 at nk/nv 16/32, 8/16, 4/8; prefill 1x32768 at 4/8;
  decode 256 sequences at nv 32 and 1 sequence at nv 32, each replayed from a CUDA graph (both
  sides) and called eagerly.
Times are medians of CUDA-event timings after warm-up; ratio = fla time / our time. Prefill rows
are timed as single calls (a sync after each: what the ratio and the issue's goals take), and
also back to back (the host runs ahead, so its launch work is hidden) and, on both sides, by the
time of the kernels alone under the profiler (kernel_ms: the sum of their GPU times, without the
gaps between them): the three show how much of a single call is not kernel time, and the kernels'
ratio does not move with the host's speed, as the other two do (fla-core's calls hold more host
work than ours). Each prefill row also times the kernel paths ("split", "fused" at several dv
blocks, "scan" at its own blocks and segment length), next to the one `choose_path` picks, and
the solve launch that every path starts with on its own; `--no-variants` leaves those out (they
take most of the run's time).
`--sweep` first tries launch settings and keeps the fastest; a prefill path's settings are timed
on workloads that take that path (check_launch.SWEEP_ROWS), not on the table's rows. After each
row the GPU's SM clock, power draw and clock event reasons are printed (timing.gpu_clocks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from tp_gdn import Batch
from tp_gdn.kernels import triton_chunk, triton_decode
from tp_gdn.kernels.triton_ops import gdn_decode, gdn_prefill
from tp_gdn.loader.synthetic import gate_parameters

sys.path.insert(0, str(Path(__file__).parent))
from timing import back_to_back, copy_bandwidth, graphed, kernel_times, record_clocks, rel, timeit  # noqa: E402

DK = DV = 128


def graph_time(fn, replays=200):
    """Average ms of `replays` back-to-back replays of fn captured in a CUDA graph."""
    return back_to_back(graphed(fn), replays, warmup=10)


def peer_graph_time(fn, label, replays=200):
    """graph_time of a peer's call, or nan (said, not hidden) where it cannot be captured."""
    try:
        return graph_time(fn, replays)
    except Exception as e:
        print(f"fla {label} could not be captured in a CUDA graph: {type(e).__name__}: {e}")
        return float("nan")


def prefill_inputs(n_seq, seq_len, nk, nv, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = n_seq * seq_len
    bf = torch.bfloat16
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    A_log, dt_bias = (t.cuda() for t in gate_parameters(nv, torch.Generator().manual_seed(seed)))
    x = dict(q=r(T, nk, DK).to(bf), k=r(T, nk, DK).to(bf), v=r(T, nv, DV).to(bf), a=r(T, nv).to(bf),
             b=r(T, nv).to(bf), A_log=A_log, dt_bias=dt_bias, h0=r(n_seq, nv, DK, DV) * 0.1)
    x["batch"] = Batch([seq_len] * n_seq, list(range(n_seq)), [True] * n_seq)
    x["cu"] = torch.tensor(x["batch"].cu_seqlens, device="cuda", dtype=torch.long)
    return x


def ours_prefill(x, pool, BV=None, path=None):
    return lambda: gdn_prefill(x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], pool, x["batch"],
                               BV=BV, path=path)


def solve_alone(x, nk, nv):
    """The intra-chunk solve (gating, T = (I + A)^-1) on its own, as both prefill paths launch it."""
    T = x["q"].shape[0]
    meta = x["batch"].meta(x["q"].device)
    return lambda: triton_chunk.intra_solve(x["k"].reshape(T, -1), x["a"], x["b"], x["A_log"], x["dt_bias"], meta,
                                            0, nk, nv, DK, True)


def fla_prefill(x, varlen: bool):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    n = x["h0"].shape[0]
    T = x["q"].shape[0]
    shape = (1, T) if varlen else (n, T // n)
    q, k, v, a, b = (x[name].reshape(*shape, *x[name].shape[1:]) for name in ("q", "k", "v", "a", "b"))
    kw = dict(initial_state=x["h0"], output_final_state=True, use_qk_l2norm_in_kernel=True,
              use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"], use_beta_sigmoid_in_kernel=True)
    if varlen:
        kw["cu_seqlens"] = x["cu"]
    return lambda: chunk_gated_delta_rule(q, k, v, a, b, **kw)[0].reshape(T, *x["v"].shape[1:])


def decode_inputs(N, nv, seed=0):
    nk = nv // 2
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    A_log, dt_bias = (t.cuda() for t in gate_parameters(nv, torch.Generator().manual_seed(seed)))
    x = dict(nk=nk, nv=nv, qkvba=r(N, 2 * nk * DK + nv * DV + 2 * nv).to(torch.bfloat16),
             A_log=A_log, dt_bias=dt_bias, pool=r(N, nv, DK, DV) * 0.1)
    x["batch"] = Batch([1] * N, list(range(N)), [True] * N)
    x["batch"].meta("cuda")
    return x


def ours_decode(x, pool):
    return lambda: gdn_decode(x["qkvba"], x["nk"], x["nv"], DK, DV, x["A_log"], x["dt_bias"], pool, x["batch"])


def fla_decode(x, pool):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    N, nk, nv = x["qkvba"].shape[0], x["nk"], x["nv"]
    kd = nk * DK
    t = x["qkvba"]
    q = t[:, :kd].reshape(N, 1, nk, DK).contiguous()
    k = t[:, kd:2 * kd].reshape(N, 1, nk, DK).contiguous()
    v = t[:, 2 * kd:2 * kd + nv * DV].reshape(N, 1, nv, DV).contiguous()
    b = t[:, 2 * kd + nv * DV:2 * kd + nv * DV + nv].reshape(N, 1, nv).contiguous()
    a = t[:, 2 * kd + nv * DV + nv:].reshape(N, 1, nv).contiguous()
    return lambda: fused_recurrent_gated_delta_rule(
        q, k, v, a, beta=b, initial_state=pool, output_final_state=True, use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True, A_log=x["A_log"], dt_bias=x["dt_bias"], use_beta_sigmoid_in_kernel=True)[0].reshape(N, nv, DV)


PREFILL = [("prefill 8x4096, 16/32", 8, 4096, 16, 32), ("prefill 8x4096, 8/16", 8, 4096, 8, 16),
           ("prefill 8x4096, 4/8", 8, 4096, 4, 8), ("prefill 1x32768, 4/8", 1, 32768, 4, 8)]


# the triton_chunk.LAUNCH entry that each prefill path's sweep tries settings of
SWEEP_KERNELS = {"split": "pass", "scan": "scan", "fused": "fused"}


def sweep_prefill(paths):
    """Each launch setting of each path's sequential kernels in its own process (a faulting setting
    cannot poison the rest), timed on workloads that take that path (check_launch.SWEEP_ROWS);
    keeps the fastest setting per path and prints every time."""
    best = {}
    for path, kernel in SWEEP_KERNELS.items():
        if path not in paths:
            continue
        for nw in (4, 8):
            for ns in (1, 2, 3):      # 1: the fused pass's committed setting
                setting = {kernel: dict(num_warps=nw, num_stages=ns)}
                run = subprocess.run([sys.executable, str(Path(__file__).with_name("check_launch.py")), path,
                                      json.dumps(setting)], capture_output=True, text=True, timeout=300)
                line = (run.stdout.strip().splitlines() or ["failed"])[-1]
                if run.returncode != 0 or not line.startswith("{"):
                    print(f"sweep {path} nw={nw} ns={ns}: {line} {run.stderr.strip()[-300:]}", flush=True)
                    continue
                times = json.loads(line)
                total = sum(min(t.values()) for t in times.values())
                print(f"sweep {path} nw={nw} ns={ns}: total {total:.3f} ms; " + "; ".join(
                    f"{w}: " + ", ".join(f"{bv if bv == 'auto' else f'BV{bv}'} {t:.3f}" for bv, t in ts.items())
                    for w, ts in times.items()),
                    flush=True)
                if path not in best or total < best[path][0]:
                    best[path] = (total, setting)
    for total, setting in best.values():
        triton_chunk.LAUNCH.update(setting)


def sweep_decode():
    for N in (1, 256):
        x = decode_inputs(N, 32)
        res = []
        for w in (1, 2, 4, 8):
            for bv in (16, 32, 64, 128):
                triton_decode.LAUNCH["decode"] = dict(num_warps=w, num_stages=1)
                pool = x["pool"].clone()
                f = lambda: gdn_decode(x["qkvba"], x["nk"], x["nv"], DK, DV, x["A_log"], x["dt_bias"], pool,
                                       x["batch"], BV=bv)
                res.append((timeit(f, iters=20, warmup=3), w, bv))
        res.sort()
        print(f"sweep decode N={N}: " + ", ".join(f"nw={w} BV={bv} {t * 1e3:.1f} us" for t, w, bv in res[:6]))
    triton_decode.LAUNCH["decode"] = dict(num_warps=4, num_stages=1)


def kernel_ms(fn, rounds: int = 5) -> float:
    """Median over `rounds` of the GPU time of fn's kernels per call under the profiler (5 calls a
    round): the time of a single call with a sync, as timeit takes it, also holds the host's
    launch, which for the conv moved the settings' order (seventeenth session: 4 warps over 8
    heads came out 4% faster that way and 2.4% slower in the layer's profile)."""
    import statistics
    return statistics.median(sum(ms for ms, _ in kernel_times(fn, 5).values()) for _ in range(rounds))


def sweep_conv():
    """The prefill conv (+ l2norm) alone on the tp=1 layer's projection of 8x4096 tokens, at several
    rows per program, warp counts, channels per program and rows loaded ahead, by kernel time
    (kernel_ms); every setting's output is checked against the fp32 torch reference, and
    fla-core's causal_conv1d (conv + silu, no l2norm) is timed on the same input the same way."""
    from tp_gdn.kernels import reference as ref
    from tp_gdn.kernels import triton_conv

    nk, dk, vd, K = 16, 128, 4096, 4
    C, P, T = 2 * nk * dk + vd, 2 * nk * dk + 2 * vd + 64, 8 * 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    proj = torch.randn(T, P, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(C, K, device="cuda", generator=g) / 2).to(torch.bfloat16)
    pool = torch.randn(8, K - 1, C, device="cuda", generator=g).to(torch.bfloat16)
    lens, slots, has = [4096] * 8, list(range(8)), [True] * 4 + [False] * 4
    meta = Batch(lens, slots, has).meta("cuda")
    y = ref.causal_conv1d(proj[:, :C].float(), w.float(), pool.float().clone(), lens, slots, has)
    want = torch.cat([ref.l2norm(y[:, :nk * dk].reshape(T, nk, dk)).reshape(T, -1) * dk ** -0.5,
                      ref.l2norm(y[:, nk * dk:2 * nk * dk].reshape(T, nk, dk)).reshape(T, -1), y[:, 2 * nk * dk:]], 1)
    del y
    moved = 2 * T * C * 2
    default = {k: v for k, v in triton_conv.LAUNCH.items()}
    res = []
    settings = [(16, 2, 4, 4, 4), (16, 2, 4, 4, 2), (16, 2, 4, 4, 1), (32, 2, 4, 4, 4), (64, 2, 4, 4, 4),
                (16, 1, 2, 2, 4), (8, 1, 2, 2, 4), (16, 4, 8, 8, 4)]
    for rows, nw, qk_heads, v_groups, ahead in settings:
        triton_conv.LAUNCH.update({"conv": dict(num_warps=nw), "rows": rows, "qk_heads": qk_heads,
                                   "v_groups": v_groups, "ahead": ahead})
        out = torch.empty(T, C, device="cuda", dtype=torch.bfloat16)
        f = lambda: triton_conv.conv_prefill(proj, w, pool, out, meta.chunks, meta.num_chunks, meta.cu_seqlens,
                                             meta.slots, meta.has_state, nk, dk)
        f()
        t = kernel_ms(f)
        res.append((t, rows, nw, qk_heads, v_groups, ahead))
        print(f"sweep conv rows={rows} nw={nw} qk_heads={qk_heads} v_groups={v_groups} ahead={ahead}: {t:.3f} ms, "
              f"{moved / (t * 1e-3) / 1e12:.2f} TB/s of q|k|v in and out, err vs fp32 reference {rel(out, want):.1e}",
              flush=True)
    triton_conv.LAUNCH.update(default)
    try:
        from fla.modules.causal_conv1d import causal_conv1d
        x = proj[:, :C][None]
        cu = meta.cu_seqlens.long()
        t = kernel_ms(lambda: causal_conv1d(x, weight=w, activation="silu", cu_seqlens=cu,
                                                 output_final_state=True))
        print(f"fla causal_conv1d (conv + silu, no l2norm) on the same input: {t:.3f} ms, "
              f"{moved / (t * 1e-3) / 1e12:.2f} TB/s", flush=True)
    except Exception as e:  # said, not hidden
        print(f"fla causal_conv1d could not run: {type(e).__name__}: {e}")
    t, *best = min(res)
    print(f"fastest: rows, nw, qk_heads, v_groups, ahead = {tuple(best)}: {t:.3f} ms (default {default})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", choices=["split", "scan", "fused", "all", "decode", "conv"], default=None,
                    help="search launch settings first: of one prefill path's sequential kernels (scan: its "
                         "summary and pass), of the three paths' and the decode kernel (all), or of the decode "
                         "or conv kernel alone")
    ap.add_argument("--launch", default=None,
                    help='JSON launch settings to use, e.g. \'{"fused": {"num_warps": 8, "num_stages": 2}}\'')
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--rows", nargs="+", default=None, metavar="TEXT",
                    help="run only the workloads whose name contains one of these (e.g. 1x32768 decode)")
    ap.add_argument("--no-variants", action="store_true",
                    help="time only the path choose_path picks (and fla), not every path and the solve alone: "
                         "each variant compiles and runs, which takes most of a full table's time")
    args = ap.parse_args()
    want = lambda name: args.rows is None or any(r in name for r in args.rows)
    import fla
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; triton {__import__('triton').__version__}; fla {fla.__version__}")
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (bytes read + written)")
    if args.launch:
        triton_chunk.LAUNCH.update(json.loads(args.launch))
    if args.sweep == "conv":
        sweep_conv()
        return
    if args.sweep:
        if args.sweep != "decode":
            sweep_prefill(["split", "scan", "fused"] if args.sweep == "all" else [args.sweep])
        if args.sweep in ("all", "decode"):
            sweep_decode()
    print("launch settings:", triton_chunk.LAUNCH, triton_decode.LAUNCH, flush=True)

    rows = []
    for name, n, L, nk, nv in filter(lambda w: want(w[0]), PREFILL):
        x = prefill_inputs(n, L, nk, nv)
        pool = x["h0"].clone()
        ours = ours_prefill(x, pool)
        o_ours = ours()
        pool_after_one = pool.clone()
        chosen = triton_chunk.choose_path(n, nv, DV, num_chunks=x["batch"].meta("cuda").num_chunks)
        variants = {}
        for path, bv in [] if args.no_variants else [("split", None), ("split", 16), ("fused", 64), ("fused", 128),
                                                     ("scan", None)]:
            if bv is None and path == "split":
                bv = triton_chunk.split_bv(n, nv, DV)
            label = f"{path} BV{bv}" if bv else path
            if label not in variants:
                variants[label] = timeit(ours_prefill(x, pool.clone(), bv, path), iters=10)
        if not args.no_variants:
            variants["solve alone"] = timeit(solve_alone(x, nk, nv), iters=10)   # the first launch of every path
            print(f"{name}: " + ", ".join(f"{k} {t:.3f}" for k, t in variants.items()) + f" ms; chosen {chosen}",
                  flush=True)
        fla_var, fla_bat = fla_prefill(x, True), fla_prefill(x, False)
        o_fla = fla_var()
        t_ours = timeit(ours)
        t_var, t_bat = timeit(fla_var), timeit(fla_bat)
        t_fla = min(t_var, t_bat)
        b_ours = back_to_back(ours, iters=20)
        fla_best = fla_var if t_var <= t_bat else fla_bat
        b_fla = back_to_back(fla_best, iters=20)
        k_ours, k_fla = kernel_ms(ours), kernel_ms(fla_best)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # final state check on a fresh call
        _, h_fla = chunk_gated_delta_rule(x["q"][None], x["k"][None], x["v"][None], x["a"][None], x["b"][None],
                                          initial_state=x["h0"], output_final_state=True, cu_seqlens=x["cu"],
                                          use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=x["A_log"],
                                          dt_bias=x["dt_bias"], use_beta_sigmoid_in_kernel=True)
        rows.append(dict(workload=name, path=chosen, variants_ms=variants, ours_ms=t_ours, fla_ms=t_fla, fla_varlen_ms=t_var, fla_batched_ms=t_bat,
                         ours_back_to_back_ms=b_ours, fla_back_to_back_ms=b_fla, ours_kernels_ms=k_ours,
                         fla_kernels_ms=k_fla,
                         ratio=t_fla / t_ours, tokens_per_s=n * L / (t_ours * 1e-3),
                         rel_err_vs_fla=rel(o_ours, o_fla), state_rel_err_vs_fla=rel(pool_after_one, h_fla)))
        print(f"{name}: ours {t_ours:.3f} ms ({chosen[0]}), fla {t_fla:.3f} ms "
              f"(varlen {t_var:.3f}, batched {t_bat:.3f}), "
              f"x{t_fla / t_ours:.2f}, |ours-fla|/|fla| = {rows[-1]['rel_err_vs_fla']:.1e} "
              f"(state {rows[-1]['state_rel_err_vs_fla']:.1e}); back to back ours {b_ours:.3f}, fla {b_fla:.3f} "
              f"(x{b_fla / b_ours:.2f}); kernels alone ours {k_ours:.3f} ms, fla {k_fla:.3f} ms per call "
              f"(x{k_fla / k_ours:.2f})", flush=True)
        print(f"  {record_clocks(rows[-1])}", flush=True)

    for decode_row in (decode_256_row, decode_1_row):
        if want(decode_row.__doc__):
            rows.append(decode_row(bw))
            print(f"  {record_clocks(rows[-1])}", flush=True)
    print_table(rows, dev)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, copy_TBps=bw / 1e12, launch=dict(chunk=triton_chunk.LAUNCH,
                                                                         decode=triton_decode.LAUNCH), rows=rows), f,
                      indent=1)


def decode_256_row(bw):
    """decode 256 seqs, nv 32"""
    x = decode_inputs(256, 32)
    pool = x["pool"].clone()
    ours, fla_f = ours_decode(x, pool), fla_decode(x, x["pool"])
    err = rel(ours(), fla_f())
    # graph replays: the kernels' time without the host's launch work (eager times beside them)
    t_ours = graph_time(ours, replays=50)
    t_fla = peer_graph_time(fla_f, "decode 256", replays=50)
    t_ours_eager, t_fla_eager = timeit(ours, iters=50), timeit(fla_f, iters=50)
    state_bytes = 2 * x["pool"].numel() * 4
    row = dict(workload="decode 256 seqs, nv 32", ours_ms=t_ours, fla_ms=t_fla, ratio=t_fla / t_ours,
               ours_eager_ms=t_ours_eager, fla_eager_ms=t_fla_eager,
               ours_state_TBps=state_bytes / (t_ours * 1e-3) / 1e12,
               fla_state_TBps=state_bytes / (t_fla * 1e-3) / 1e12,
               fraction_of_copy=state_bytes / (t_ours * 1e-3) / bw, rel_err_vs_fla=err)
    print(f"decode 256 (graph replay): ours {t_ours * 1e3:.0f} us ({row['ours_state_TBps']:.2f} TB/s state, "
          f"{100 * row['fraction_of_copy']:.0f}% of copy), fla {t_fla * 1e3:.0f} us "
          f"({row['fla_state_TBps']:.2f} TB/s); eager: ours {t_ours_eager * 1e3:.0f} us, fla "
          f"{t_fla_eager * 1e3:.0f} us; err {err:.1e}", flush=True)
    return row


def decode_1_row(bw):
    """decode 1 seq, nv 32"""
    x = decode_inputs(1, 32)
    pool = x["pool"].clone()
    ours, fla_f = ours_decode(x, pool), fla_decode(x, x["pool"])
    err = rel(ours(), fla_f())
    t_graph = graph_time(ours)
    t_eager = timeit(ours, iters=100)
    t_fla = timeit(fla_f, iters=100)
    t_fla_graph = peer_graph_time(fla_f, "decode 1")
    row = dict(workload="decode 1 seq, nv 32", ours_graph_us=t_graph * 1e3, ours_eager_us=t_eager * 1e3,
               fla_eager_us=t_fla * 1e3, fla_graph_us=t_fla_graph * 1e3, rel_err_vs_fla=err)
    print(f"decode 1: ours graph replay {t_graph * 1e3:.1f} us (eager {t_eager * 1e3:.1f} us), fla eager "
          f"{t_fla * 1e3:.1f} us, fla graph {t_fla_graph * 1e3:.1f} us, err {err:.1e}")
    return row


def print_table(rows, dev):
    print(f"\n| workload ({dev}) | ours | fla-core 0.6.0 | fla / ours |")
    # prefill rows: single calls; back to back; kernels alone (host-independent, from the profiler)
    print("|---|---|---|---|")
    for r in rows:
        if "ours_graph_us" in r:
            print(f"| {r['workload']} | {r['ours_graph_us']:.1f} us (graph) | {r['fla_eager_us']:.1f} us eager, "
                  f"{r['fla_graph_us']:.1f} us graph | {r['fla_graph_us'] / r['ours_graph_us']:.2f} (graph) |")
        elif "ours_state_TBps" in r:
            print(f"| {r['workload']} | {r['ours_ms'] * 1e3:.0f} us, {r['ours_state_TBps']:.2f} TB/s "
                  f"({100 * r['fraction_of_copy']:.0f}% of copy) | {r['fla_ms'] * 1e3:.0f} us | {r['ratio']:.2f} |")
        else:
            print(f"| {r['workload']} | {r['ours_ms']:.3f} ms; {r['ours_back_to_back_ms']:.3f} back to back; "
                  f"{r['ours_kernels_ms']:.3f} kernels | {r['fla_ms']:.3f} ms; {r['fla_back_to_back_ms']:.3f} back to "
                  f"back; {r['fla_kernels_ms']:.3f} kernels | {r['ratio']:.2f}; "
                  f"{r['fla_back_to_back_ms'] / r['ours_back_to_back_ms']:.2f} back to back; "
                  f"{r['fla_kernels_ms'] / r['ours_kernels_ms']:.2f} kernels |")


if __name__ == "__main__":
    main()
