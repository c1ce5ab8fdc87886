"""The whole tensor-parallel GDN layer, ours against a layer composed the way serving engines do
it today, under torchrun on 1, 2 or 4 GPUs, in the same run on the same inputs and weights.

    torchrun --standalone --nproc-per-node N benchmarks/bench_layer.py [--profile] [--timeline] [--json OUT]
        [--only prefill|decode] [--decode-sizes 256 1] [--warm-seconds S]

Qwen3-Next-80B GDN dims (H 2048, nk 16, nv 32, dk = dv 128, K 4), bf16 weights and activations,
fp32 state. The peer: torch GEMMs for in_proj_qkvz / in_proj_ba (grouped layout, reordered the
way HF and vLLM do), fla-core 0.6.0's causal_conv1d / causal_conv1d_update and
chunk_gated_delta_rule / fused_recurrent_gated_delta_rule (gating, beta sigmoid and l2norm inside
fla), states gathered from and scattered to the slot pool, a torch gated RMSNorm, the out_proj
GEMM and an NCCL all-reduce. Ours: GDNLayer with the Triton backend; decode replayed from CUDA
graphs (GraphedDecoder), ours and the peer's graph timed in DECODE_ROUNDS interleaved rounds.
Every rank runs the same fixed number of iterations. After each row,
rank 0 prints its GPU's SM clock, power draw and clock event reasons (timing.gpu_clocks): a row
timed while the power cap held the clock down says so; --warm-seconds times the prefill rows
after that long under load on each side, at the clock sustained load gives. --timeline prints,
for our calls, how the GPU's streams spent a single call (timing.timeline): the main
stream's busy and idle time, and how much of the other streams' work (the copy engines'
transfers and sums of the all-reduce) ran beside the main stream's and how much was exposed; for
our decode steps, also every rank's kernels of a single step one by one (start and duration).
Each prefill row also times our call with its products as picked (TP_GDN_GEMM=tuned: cuBLASLt
algorithms picked by timing, parallel/blaslt.py) against the same call on torch's cuBLAS calls,
in interleaved rounds, and prints the picks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tp_gdn import Batch, GDNConfig, GDNLayer, StateCache
from tp_gdn.graphs import GraphedDecoder
from tp_gdn.parallel import destroy_distributed, get_rank, get_world_size, init_distributed, local_device
from tp_gdn.parallel.blaslt import TunedGemm

sys.path.insert(0, str(Path(__file__).parent))
from timing import back_to_back, copy_bandwidth, graphed, kernel_times, record_clocks, rel, timeit, warm  # noqa: E402

CFG = GDNConfig(model_type="qwen3_next", hidden_size=2048, num_k_heads=16, num_v_heads=32, head_k_dim=128,
                head_v_dim=128, conv_kernel=4, rms_norm_eps=1e-6, layer_types=("linear_attention",))


def full_weights(seed=0, cfg=CFG):
    from tp_gdn.layer import full_shapes
    from tp_gdn.loader.synthetic import gate_parameters

    g = torch.Generator().manual_seed(seed)
    s = full_shapes(cfg)
    A_log, dt_bias = gate_parameters(cfg.num_v_heads, g)
    return {"in_proj.weight": torch.randn(s["in_proj.weight"], generator=g) / cfg.hidden_size ** 0.5,
            "conv_weight": torch.randn(s["conv_weight"], generator=g) / 2,
            "A_log": A_log,
            "dt_bias": dt_bias,
            "norm_weight": 1 + 0.3 * torch.randn(s["norm_weight"], generator=g),
            "out_proj.weight": torch.randn(s["out_proj.weight"], generator=g) / cfg.value_dim ** 0.5}


class ComposedPeer:
    """The same rank-local weights, computed the way serving engines compose the layer today."""

    def __init__(self, layer: GDNLayer, num_slots: int):
        nk, nv, dk, dv, H = layer.nk, layer.nv, layer.dk, layer.dv, CFG.hidden_size
        r = nv // nk
        q, k, v, z, b, a = torch.split(layer.in_proj.weight, [nk * dk, nk * dk, nv * dv, nv * dv, nv, nv])
        self.w_qkvz = torch.cat([q.view(nk, dk, H), k.view(nk, dk, H), v.view(nk, r * dv, H),
                                 z.view(nk, r * dv, H)], 1).reshape(-1, H).contiguous()
        self.w_ba = torch.cat([b.view(nk, r, H), a.view(nk, r, H)], 1).reshape(-1, H).contiguous()
        self.conv_w = layer.conv_weight.contiguous()
        self.A_log, self.dt_bias, self.norm_w = layer.A_log, layer.dt_bias, layer.norm_weight
        self.w_out = layer.out_proj.weight
        self.nk, self.nv, self.dk, self.dv, self.r = nk, nv, dk, dv, r
        dev = layer.device
        C = 2 * nk * dk + nv * dv
        self.conv_cache = torch.zeros(num_slots, C, CFG.conv_kernel, device=dev, dtype=layer.dtype)
        self.ssm = torch.zeros(num_slots, nv, dk, dv, device=dev, dtype=torch.float32)

    def _project(self, x):
        T, (nk, nv, dk, dv, r) = x.shape[0], (self.nk, self.nv, self.dk, self.dv, self.r)
        qkvz = (x @ self.w_qkvz.T).view(T, nk, 2 * dk + 2 * r * dv)
        q, k, v, z = torch.split(qkvz, [dk, dk, r * dv, r * dv], dim=2)
        b, a = torch.split((x @ self.w_ba.T).view(T, nk, 2 * r), [r, r], dim=2)
        mixed = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], -1)
        return mixed, z.reshape(T, nv, dv), b.reshape(T, nv), a.reshape(T, nv)

    def _finish(self, o, z):
        of = o.float()
        y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + CFG.rms_norm_eps) * self.norm_w * F.silu(z.float())
        out = y.to(o.dtype).reshape(o.shape[0], -1) @ self.w_out.T
        if get_world_size() > 1:
            dist.all_reduce(out)
        return out

    def _split(self, mixed, T):
        kd = self.nk * self.dk
        q = mixed[..., :kd].reshape(1, T, self.nk, self.dk)
        k = mixed[..., kd:2 * kd].reshape(1, T, self.nk, self.dk)
        v = mixed[..., 2 * kd:].reshape(1, T, self.nv, self.dv)
        return q, k, v

    def prefill(self, x, cu_seqlens, slots):
        from fla.modules.causal_conv1d import causal_conv1d
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        T = x.shape[0]
        mixed, z, b, a = self._project(x)
        mixed, conv_final = causal_conv1d(mixed[None], weight=self.conv_w, activation="silu", cu_seqlens=cu_seqlens,
                                          output_final_state=True)
        self.conv_cache[slots] = conv_final.to(self.conv_cache.dtype)
        q, k, v = self._split(mixed, T)
        o, h = chunk_gated_delta_rule(q, k, v, a[None], b[None], initial_state=self.ssm[slots],
                                      output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True,
                                      use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias,
                                      use_beta_sigmoid_in_kernel=True)
        self.ssm[slots] = h
        return self._finish(o[0], z)

    def decode(self, x, slots):
        from fla.modules.causal_conv1d import causal_conv1d_update
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        B = x.shape[0]
        mixed, z, b, a = self._project(x)
        cache = self.conv_cache[slots]
        mixed, cache = causal_conv1d_update(mixed, cache=cache, weight=self.conv_w, activation="silu")
        self.conv_cache[slots] = cache
        q, k, v = (t.reshape(B, 1, *t.shape[2:]) for t in self._split(mixed, B))
        o, h = fused_recurrent_gated_delta_rule(q, k, v, a[:, None], beta=b[:, None], initial_state=self.ssm[slots],
                                                output_final_state=True, use_qk_l2norm_in_kernel=True,
                                                use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias,
                                                use_beta_sigmoid_in_kernel=True)
        self.ssm[slots] = h
        return self._finish(o.reshape(B, self.nv, self.dv), z)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="also print where our layer's time goes, per kernel")
    ap.add_argument("--timeline", action="store_true",
                    help="also print how our calls use the GPU's streams (busy, idle, overlapped, exposed); "
                         "for decode steps, every rank's kernels one by one")
    ap.add_argument("--only", choices=["prefill", "decode"], default=None, help="run only these workloads")
    ap.add_argument("--decode-sizes", type=int, nargs="+", default=None,
                    help="decode batch sizes (default: 256 at tp=1, 1 at tp > 1)")
    ap.add_argument("--warm-seconds", type=float, default=0.0, metavar="S",
                    help="prefill rows: before each timing of ours and of the peer (single calls, back to back), "
                         "run that side back to back for about S seconds, so the timing sees the clock sustained "
                         "load holds the GPU to (default 0: timings start from whatever clock the GPU is at)")
    args = ap.parse_args()
    if args.warm_seconds < 0:
        ap.error(f"--warm-seconds must be >= 0, got {args.warm_seconds}")
    init_distributed()
    rank, tp = get_rank(), get_world_size()
    dev = local_device() if torch.cuda.is_available() else None
    if dev is None or dev.type != "cuda":
        raise SystemExit("bench_layer.py needs CUDA GPUs (run it under torchrun, one process per GPU)")
    torch.cuda.set_device(dev)
    layer = GDNLayer.from_full(CFG, 0, full_weights(), rank, tp, dtype=torch.bfloat16, device=dev, backend="triton")
    rows = []
    g = torch.Generator(device=dev).manual_seed(1)

    def report(name, ours, peer, err, note=""):
        rows.append(dict(workload=name, tp=tp, ours_ms=ours, peer_ms=peer, ratio=peer / ours, rel_err=err, note=note))
        if rank == 0:       # rank 0 writes the JSON; its GPU's clock is read
            clocks = record_clocks(rows[-1], dev)
            print(f"{name} tp={tp}: ours {ours:.3f} ms, peer {peer:.3f} ms, peer/ours {peer / ours:.2f}, "
                  f"|ours-peer|/|peer| {err:.1e} {note}\n  {clocks}", flush=True)

    prefills = [(8, 4096)] + ([(1, 4096)] if tp == 1 else [])
    for n, L in prefills if args.only != "decode" else []:
        run_guarded(f"prefill {n}x{L}", rank,
                    lambda: bench_prefill(layer, n, L, dev, g, tp, rank, report, rows, args.profile,
                                          args.warm_seconds, args.timeline))
    decode_sizes = args.decode_sizes or ([256] if tp == 1 else [1])
    for B in decode_sizes if args.only != "prefill" else []:
        run_guarded(f"decode {B}", rank, lambda: bench_decode(layer, B, dev, g, tp, rank, report, rows, args.profile,
                                                                args.timeline))

    if rank == 0:
        name = torch.cuda.get_device_name(dev)
        print(f"\n| workload ({name} x{tp}) | ours | composed peer | peer / ours |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['workload']}, tp={r['tp']} | {r['ours_ms']:.3f} ms | {r['peer_ms']:.3f} ms | {r['ratio']:.2f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=name, tp=tp, rows=rows), f, indent=1)
    destroy_distributed()


@contextlib.contextmanager
def environ(values: dict):
    """Set environment variables for the block (a layer reads TP_GDN_* when it is built)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def patched(module, **values):
    """Set module attributes for the block (a graph captured inside keeps what they chose)."""
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def run_guarded(name, rank, fn):
    """Run one workload; an error (the same on every rank, as every rank runs the same code) is
    reported and the next workload runs."""
    try:
        fn()
    except Exception as e:
        if rank == 0:
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
    torch.cuda.empty_cache()


def profile_kernels(fn, rank, label, top=12):
    """Run fn three times under the torch profiler (every rank, as fn may hold collectives) and
    print, on rank 0, the GPU kernels that took the most time."""
    times = kernel_times(fn, 3)
    if rank == 0:
        events = sorted(times.items(), key=lambda kv: -kv[1][0])
        total = sum(ms for ms, _ in times.values())
        print(f"  profile of ours, {label}: {total:.3f} ms of kernels per call")
        for name, (ms, count) in events[:top]:
            print(f"    {ms:8.3f} ms  {count:3d}x  {name[:90]}")


def print_timeline(fn, rank, label, row, calls=3, work=False):
    """timing.timeline of fn's single calls (every rank runs them): every call's figures go into
    row["timeline_us"], and rank 0 prints those of the call with the median GPU span (one call's
    own figures, which add up: the other streams' busy time is the part beside the main stream's
    work plus the part exposed; the host's lead before the GPU's first work plus the span is
    about what a single call takes). work: rank 0 also prints every rank's median call piece by
    piece (each kernel's start after the call's first GPU work and its duration)."""
    from timing import timeline

    calls_seen = timeline(fn, calls)
    row["timeline_us"] = calls_seen
    mid = sorted(calls_seen, key=lambda c: c["span"])[len(calls_seen) // 2]
    if work:
        every = [mid]
        if dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mid)
        if rank == 0:
            for r, c in enumerate(every):
                pieces = "; ".join(f"{name[:40]} +{start:.1f} ({dur:.1f})" for name, start, dur in c["work"])
                print(f"  rank {r}, lead {c['lead']:.1f} us, span {c['span']:.1f} us: {pieces}", flush=True)
    if rank == 0:
        spans = ", ".join(f"{c['span']:.1f}" for c in calls_seen)
        print(f"  timeline of ours, {label} (the median of {calls} single calls by GPU span, us; spans {spans}): "
              f"from the call's start to its first GPU work {mid['lead']:.1f}; "
              f"GPU span {mid['span']:.1f}; main stream busy {mid['main_busy']:.1f}, idle {mid['main_idle']:.1f}; "
              f"other streams busy {mid['others_busy']:.1f}, of it beside the main stream's work "
              f"{mid['others_beside_main']:.1f}, exposed {mid['others_exposed']:.1f}", flush=True)


def compare_products(layer, fn, y, rank, row, rounds=3):
    """Our call with the layer's products as they are (TP_GDN_GEMM=tuned: cuBLASLt where a pick
    beat torch's call) against the same call with torch's cuBLAS calls, in `rounds` interleaved
    rounds of 5 single calls and 10 back to back; prints each side's medians and what was picked."""
    if layer.gemm != "tuned":
        return
    tuned = TunedGemm.for_device(layer.device)
    kept = layer.in_proj.products, layer.out_proj.products
    plain = tuple(tuple(p for p in ps if p is not tuned) for ps in kept)
    times = {"tuned": ([], []), "torch": ([], [])}
    for r in range(2 * rounds):
        side = ("tuned", "torch")[r % 2]
        layer.in_proj.products, layer.out_proj.products = kept if side == "tuned" else plain
        if r == 1:                       # y is the call's output with the products as picked
            row["gemm_tuned_vs_torch_err"] = rel(y, fn())
        times[side][0].append(timeit(fn, 5))
        times[side][1].append(back_to_back(fn, 10))
    layer.in_proj.products, layer.out_proj.products = kept
    med = {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in times.items()}
    row["gemm_ms"] = med
    # each rank picks on its own timings: rank 0 reports every rank's (lines name their device)
    picks = tuned.report()
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, picks)
        picks = [line for lines in every for line in lines]
    row["gemm_picks"] = picks
    if rank == 0:
        print(f"  ours with the products as picked / with torch's calls (single / back to back, medians of "
              f"{rounds} interleaved rounds): {med['tuned'][0]:.3f} / {med['tuned'][1]:.3f} ms against "
              f"{med['torch'][0]:.3f} / {med['torch'][1]:.3f} (outputs {row['gemm_tuned_vs_torch_err']:.1e} apart); "
              "picks: " + " | ".join(picks), flush=True)


def bench_prefill(layer, n, L, dev, g, tp, rank, report, rows, profile=False, warm_s=0.0, timeline=False):
    H, bf = CFG.hidden_size, torch.bfloat16
    T = n * L
    x = torch.randn(T, H, device=dev, dtype=bf, generator=g)
    batch = Batch([L] * n, list(range(n)), [False] * n)
    cache = StateCache(CFG, [0], n, dtype=bf, device=dev, tp_size=tp)
    peer = ComposedPeer(layer, n)
    cu = torch.tensor(batch.cu_seqlens, device=dev, dtype=torch.long)
    slots = torch.arange(n, device=dev)
    y_ours, y_peer = layer(x, batch, cache), peer.prefill(x, cu, slots)
    err = rel(y_ours, y_peer)
    ours, theirs = (lambda: layer(x, batch, cache)), (lambda: peer.prefill(x, cu, slots))
    # with warm_s, each side runs back to back for that long before each of its timings
    warm(ours, warm_s)
    t_ours = timeit(ours, 5)
    warm(theirs, warm_s)
    t_peer = timeit(theirs, 5)
    # calls issued back to back, as a model's layers are: the host's launch work overlaps the
    # GPU's work of the call before (without warm_s, each timed call above starts on an idle GPU)
    warm(ours, warm_s)
    b2b_ours = back_to_back(ours, 10)
    warm(theirs, warm_s)
    b2b_peer = back_to_back(theirs, 10)
    # the other setting of the gated norm (inside the fused pass, or its own kernel), where the
    # batch takes the fused path with one block spanning dv
    from tp_gdn.kernels import triton_ops
    default = triton_ops.FUSE_NORM
    triton_ops.FUSE_NORM = not default
    other = triton_ops.fused_norm_applies(batch.meta(dev), layer.nv, layer.dv, bf) or default
    # (in one piece: at tp=2 the default tail in row chunks runs the norm as its own kernel)
    t_other = timeit(lambda: layer(x, batch, cache, tail=1), 5) if other else float("nan")
    triton_ops.FUSE_NORM = default
    where = lambda inside: "inside the fused pass" if inside else "as its own kernel"
    report(f"prefill {n}x{L}", t_ours, t_peer, err,
           note=f"(back to back: ours {b2b_ours:.3f} ms, peer {b2b_peer:.3f} ms; gated norm {where(default)}; "
                f"{where(not default)}: " + (f"{t_other:.3f} ms" if other else "not on this path") +
                (f"; each side run {warm_s:g} s back to back before each of its timings)" if warm_s > 0 else ")"))
    rows[-1].update(norm_inside_pass=default, ours_other_norm_ms=t_other, ours_back_to_back_ms=b2b_ours,
                    peer_back_to_back_ms=b2b_peer, all_reduce=layer.out_proj.all_reduce_kind(T), warm_s=warm_s)
    compare_products(layer, ours, y_ours, rank, rows[-1])
    if tp > 1:
        out = torch.empty(T, H, device=dev, dtype=bf)
        t_ar = timeit(lambda: dist.all_reduce(out), 5)
        rows[-1]["allreduce_ms"] = t_ar
        overlap = {}
        for pieces in (1, 2, 4):
            y = layer(x, batch, cache, overlap=pieces)
            overlap[pieces] = (timeit(lambda: layer(x, batch, cache, overlap=pieces), 5), rel(y, y_peer))
        rows[-1]["overlap_ms"] = {p: t for p, (t, _) in overlap.items()}
        # the gated norm, out_proj and all-reduce in row chunks (forward(tail=N); the default is
        # layer.TAIL_CHUNKS), against the same call in one piece
        # (on copy engines where out_proj.chunked_all_reduce_kind says "copy"; then also on NCCL's
        # stream, the copy engines set aside)
        y_one = layer(x, batch, cache, tail=1)
        kind = layer.out_proj.chunked_all_reduce_kind(T)

        def time_tails(counts):
            """{chunks: (single ms, back-to-back ms, error against one piece)}"""
            timed = {}
            for chunks in counts:
                fn = lambda: layer(x, batch, cache, tail=chunks)
                e = rel(fn(), y_one)
                timed[chunks] = (timeit(fn, 5), back_to_back(fn, 10), e)
            return timed

        def tails_text(timed):
            return ", ".join(f"{c} chunk(s) {t:.3f} / {b:.3f} ms (against one piece {e:.1e})"
                             for c, (t, b, e) in timed.items())

        tails, nccl_tails, other_tails, form = time_tails((1, 2, 4, 8)), {}, {}, None
        if kind == "copy":
            copy = layer.out_proj.copy
            # the copy engines' other form (comm.CopyEngineAllReduce: whole or scatter, by group size)
            form = "scatter" if tp >= copy.SCATTER_MIN_WORLD else "whole"
            copy.SCATTER_MIN_WORLD = 2 if form == "whole" else tp + 1
            other_tails = time_tails((4, 8))
            del copy.SCATTER_MIN_WORLD                      # back to the class's setting
            layer.out_proj.copy = None
            nccl_tails = time_tails((2, 4))
            layer.out_proj.copy = copy
        rows[-1]["tail_all_reduce"] = kind
        rows[-1]["tail_copy_form"] = form
        rows[-1]["tail_ms"] = {c: (t, b) for c, (t, b, _) in tails.items()}
        rows[-1]["tail_other_form_ms"] = {c: (t, b) for c, (t, b, _) in other_tails.items()}
        rows[-1]["tail_nccl_ms"] = {c: (t, b) for c, (t, b, _) in nccl_tails.items()}
        if rank == 0:
            print(f"  all-reduce of the [{T}, {H}] bf16 output alone: {t_ar:.3f} ms; ours with the output cut in "
                  "pieces whose all-reduce overlaps the next piece: " +
                  ", ".join(f"{p} piece(s) {t:.3f} ms (err {e:.1e})" for p, (t, e) in overlap.items()), flush=True)
            print(f"  ours with the gated norm, out_proj and all-reduce in row chunks, all-reduce {kind!r} "
                  + (f"in its {form} form " if form else "") + f"(single / back to back): {tails_text(tails)}",
                  flush=True)
            if other_tails:
                other = "scatter" if form == "whole" else "whole"
                print(f"  the same with the copy engines in their {other} form: {tails_text(other_tails)}", flush=True)
            if nccl_tails:
                print(f"  the same with the chunks' all-reduce on NCCL's stream: {tails_text(nccl_tails)}", flush=True)
    if profile:
        profile_kernels(lambda: layer(x, batch, cache), rank, f"prefill {n}x{L}, tp={tp}")
    if timeline:
        print_timeline(lambda: layer(x, batch, cache), rank, f"prefill {n}x{L}, tp={tp}", rows[-1])


# rounds of our decode graph and the peer's, interleaved: one timing of 50 single steps at tp=2 moved
# by 10 us between runs of the same code (0.023 and 0.031 ms; benchmarks/RESULTS.md, forty-fourth
# session), where the medians of interleaved rounds stayed within 1 us
DECODE_ROUNDS = 5


def bench_decode(layer, B, dev, g, tp, rank, report, rows, profile=False, timeline=False):
    H, bf = CFG.hidden_size, torch.bfloat16
    x = torch.randn(B, H, device=dev, dtype=bf, generator=g)
    cache = StateCache(CFG, [0], B, dtype=bf, device=dev, tp_size=tp)
    prompt = Batch([16] * B, list(range(B)), [False] * B)
    layer(torch.randn(16 * B, H, device=dev, dtype=bf, generator=g), prompt, cache)
    peer = ComposedPeer(layer, B)
    peer.conv_cache.copy_(torch.cat([torch.zeros_like(cache.conv[0][:, :1]), cache.conv[0]], 1).transpose(1, 2))
    peer.ssm.copy_(cache.ssm[0])
    slots = list(range(B))
    slots_t = torch.arange(B, device=dev)
    decoder = GraphedDecoder({0: layer}, cache)
    # the step's input written into the graph's own buffer, as the peer's graph reads x in place
    x_graph = decoder.input_buffer(B)
    x_graph.copy_(x)
    y_ours = decoder(x_graph, slots)[0].clone()
    y_peer = peer.decode(x, slots_t)
    err = rel(y_ours, y_peer)
    t_eager = timeit(lambda: layer(x, Batch([1] * B, slots, [True] * B), cache), 50)
    t_peer = timeit(lambda: peer.decode(x, slots_t), 50)
    try:
        peer_graph = graphed(lambda: peer.decode(x, slots_t))
    except Exception as e:  # report, do not hide, a peer that cannot be captured
        peer_graph = None
        if rank == 0:
            print(f"  peer decode could not be captured: {type(e).__name__}: {e}")
    # our graph and the peer's, single steps and steps issued back to back (no wait on each: the
    # GPU's time per step, host launch hidden), in DECODE_ROUNDS interleaved rounds of 50 steps;
    # each figure the median over the rounds
    ours_fn = lambda: decoder(x_graph, slots)  # noqa: E731
    peer_fn = peer_graph or (lambda: peer.decode(x, slots_t))
    rounds = {k: [] for k in ("ours", "ours_b2b", "peer", "peer_b2b")}
    for _ in range(DECODE_ROUNDS):
        rounds["ours"].append(timeit(ours_fn, 50))
        rounds["ours_b2b"].append(back_to_back(ours_fn, 50))
        rounds["peer"].append(timeit(peer_fn, 50))
        rounds["peer_b2b"].append(back_to_back(peer_fn, 50))
    t_ours, b2b_ours, b2b_peer = (statistics.median(rounds[k]) for k in ("ours", "ours_b2b", "peer_b2b"))
    t_peer_graph = statistics.median(rounds["peer"]) if peer_graph else float("nan")
    best_peer = min(t_peer, t_peer_graph) if peer_graph else t_peer
    kind = layer.out_proj.all_reduce_kind(B)
    # the same step other ways, each replayed from its own graph: the decode kernel with the index
    # loads of a mixed call; the decode, norm, projection and push all-reduce kernels launched
    # plainly, without programmatic dependent launch; cuBLAS for the projections of few rows;
    # (one sequence) the gated norm as its own kernel rather than inside the out_proj product;
    # and, where the all-reduce is over symmetric memory, NCCL's, torch's one-shot kernel and our
    # other kernel in its place, and (one sequence) its words pushed by the all-reduce rather than
    # by the out_proj product
    from tp_gdn.kernels import triton_allreduce, triton_decode, triton_gemv, triton_norm

    @contextlib.contextmanager
    def plain_launches():
        with patched(triton_decode, PDL=False), patched(triton_norm, PDL=False), \
                patched(triton_allreduce, PDL=False), patched(triton_gemv, PDL=False):
            yield

    variants = {"decode kernel with mixed-call indexing":
                (layer, lambda: patched(triton_decode, ALL_DECODE_INDEXING=False)),
                "plain launches (no PDL)": (layer, plain_launches),
                "cuBLAS projections": (layer, lambda: patched(triton_gemv, MAX_ROWS=0))}
    if B == 1:
        variants["gated norm apart from the out_proj product"] = \
            (layer, lambda: patched(triton_gemv, NORM_IN_PRODUCT=False))
    if kind == "symm":
        from tp_gdn.parallel.comm import symm_kernel

        if B == 1:
            variants["out_proj product not pushing the all-reduce's words"] = \
                (layer, lambda: patched(triton_gemv, PUSH_WORDS=False))

        others = [("NCCL all-reduce", {"TP_GDN_ALL_REDUCE": "nccl"}),
                  ("torch one-shot all-reduce", {"TP_GDN_SYMM_KERNEL": "oneshot"})]
        # our other symmetric-memory kernel: push where the layer runs flag-in-word (the default's
        # choice at small sizes), else flag-in-word
        other = "ll" if symm_kernel() == "push" else "push"
        others.append((f"{other} all-reduce", {"TP_GDN_SYMM_KERNEL": other}))
        for name, env in others:
            with environ(env):
                variants[name] = (GDNLayer.from_full(CFG, 0, full_weights(), rank, tp, dtype=torch.bfloat16,
                                                     device=dev, backend="triton"), contextlib.nullcontext)
    timed = {}
    for name, (other_layer, setting) in variants.items():
        other_decoder = GraphedDecoder({0: other_layer}, cache)
        with setting():
            x_other = other_decoder.input_buffer(B)      # the graph is captured here
        x_other.copy_(x)
        timed[name] = (timeit(lambda: other_decoder(x_other, slots), 50),
                       back_to_back(lambda: other_decoder(x_other, slots), 50))
    others = "".join(f"; {n}: {t:.4f} ms, {b:.4f} back to back" for n, (t, b) in timed.items())
    report(f"decode {B} seqs", t_ours, best_peer, err,
           note=f"(ours graph, all-reduce {kind}; ours and the peer's graph: medians of {DECODE_ROUNDS} interleaved "
                f"rounds, ours single by round {' '.join(f'{t:.4f}' for t in rounds['ours'])} ms; "
                f"ours eager {t_eager:.3f} ms; peer eager {t_peer:.3f} ms, peer graph "
                f"{t_peer_graph:.3f} ms; back to back: ours {b2b_ours:.4f} ms, peer {b2b_peer:.4f} ms; "
                f"each variant one timing{others})")
    rows[-1].update(ours_back_to_back_ms=b2b_ours, peer_back_to_back_ms=b2b_peer, all_reduce=kind, rounds_ms=rounds,
                    variants={n: dict(single_ms=t, back_to_back_ms=b) for n, (t, b) in timed.items()})
    if "NCCL all-reduce" in timed:
        rows[-1].update(ours_nccl_ms=timed["NCCL all-reduce"][0], ours_nccl_back_to_back_ms=timed["NCCL all-reduce"][1])
    if profile:
        profile_kernels(lambda: decoder(x_graph, slots), rank, f"decode {B} (graph), tp={tp}")
    if timeline:
        print_timeline(lambda: decoder(x_graph, slots), rank, f"decode {B} (graph), tp={tp}", rows[-1],
                       calls=5, work=True)
    if B == 256:
        # issue 6's decode goal: 1.2 x (state read and written + weights) / this GPU's copy rate
        state_bytes = 2 * cache.ssm[0].numel() * 4
        weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
        bw = copy_bandwidth()
        goal_ms = 1.2 * (state_bytes + weight_bytes) / bw * 1e3
        rows[-1].update(state_bytes=state_bytes, weight_bytes=weight_bytes, copy_TBps=bw / 1e12, goal_ms=goal_ms)
        if rank == 0:
            print(f"  goal: 1.2 x ({state_bytes:,} B of state + {weight_bytes:,} B of weights) / copy "
                  f"{bw / 1e12:.2f} TB/s = {goal_ms:.4f} ms; ours {t_ours:.4f} single, {b2b_ours:.4f} back to back",
                  flush=True)


if __name__ == "__main__":
    main()
