"""The one-token decode step's out_proj product on its own, on one GPU: the plain few-row product,
the gated norm kernel then that product (the layer's path with triton_gemv.NORM_IN_PRODUCT off),
and the product forming the norm as it reads o (gemv(norm=...), the layer's default), under its
launch settings and others.

    python benchmarks/bench_products.py [--heads NK/NV ...] [--settings BN/BK/WARPS/STAGES ...]
                                        [--rounds R]

Each row is one rank's out_proj at those local heads (dk = dv = 128, hidden size 2048, bf16): W is
[2048, NV dv]. The norm's launches also shift one decode sequence's q|k conv state, as in the
layer. Each variant is captured in a CUDA graph of 40 calls over 8 copies of W (so each call reads
its W from HBM, not L2), and the graphs are replayed in R interleaved rounds; the figure is the
median over rounds of the time a call, in us. --settings are gemv(norm=...)'s launch settings to
try beside the default (triton_gemv.LAUNCH["gemv_norm"]; its TILE rule does not apply to them).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tp_gdn import Batch  # noqa: E402
from tp_gdn.kernels import triton_gemv, triton_norm, triton_ops  # noqa: E402
from tp_gdn.kernels.reference import proj_z  # noqa: E402

DK = DV = 128
HIDDEN = 2048
COPIES, CALLS = 8, 40


def parse_heads(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) % int(m.group(1)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NK/NV with NV a multiple of NK, e.g. 8/16")
    return int(m.group(1)), int(m.group(2))


def parse_setting(text: str) -> dict:
    m = re.fullmatch(r"(\d+)/(\d+)/(\d+)/(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BN/BK/WARPS/STAGES, e.g. 8/2048/8/1")
    bn, bk, warps, stages = (int(g) for g in m.groups())
    if any(v & (v - 1) or v < 1 for v in (bn, bk, warps)) or stages < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: BN, BK and WARPS are powers of two, STAGES at least 1")
    return dict(BN=bn, BK=bk, TILE=bn * bk, num_warps=warps, num_stages=stages)


def variants(nk: int, nv: int, settings: list[dict], dev) -> dict:
    """name -> fn(W) that runs the variant's launches on one copy of W."""
    bf = torch.bfloat16
    kd, vd = nk * DK, nv * DV
    g = torch.Generator(device=dev).manual_seed(0)
    proj = torch.randn(1, 2 * kd + 2 * vd + 2 * nv, device=dev, dtype=bf, generator=g)
    o = torch.randn(1, vd, device=dev, dtype=bf, generator=g)
    conv = torch.randn(4, 3, 2 * kd + vd, device=dev, dtype=bf, generator=g)
    meta = Batch([1], [2], [True]).meta(dev)
    weight = torch.rand(DV, device=dev, generator=g) + 0.5
    out = torch.empty(1, HIDDEN, device=dev, dtype=bf)
    norm = triton_ops.product_norm(proj, nk, nv, DK, DV, conv, meta, weight, 1e-6)
    z = proj_z(proj, nk, nv, DK, DV)

    def apart(w):
        y = triton_norm.gated_rmsnorm(o.view(1, nv, DV), z, weight, 1e-6, qk_shift=(proj, conv, meta, 2 * kd))
        triton_gemv.gemv(y.view(1, vd), w, out, pdl=True)

    def inside(cfg):
        def run(w):
            if cfg is None:
                return triton_gemv.gemv(o, w, out, pdl=True, norm=norm)
            default = triton_gemv.LAUNCH["gemv_norm"]
            triton_gemv.LAUNCH["gemv_norm"] = cfg
            try:
                return triton_gemv.gemv(o, w, out, pdl=True, norm=norm)
            finally:
                triton_gemv.LAUNCH["gemv_norm"] = default
        return run

    out_rows = {"plain product (o already normed)": lambda w: triton_gemv.gemv(o, w, out, pdl=True),
                "norm kernel, then the product": apart,
                "norm in the product (default)": inside(None)}
    for cfg in settings:
        out_rows[f"norm in the product, {cfg['BN']}/{cfg['BK']}/{cfg['num_warps']}/{cfg['num_stages']}"] = inside(cfg)
    return out_rows


def time_row(nk: int, nv: int, settings: list[dict], rounds: int, dev) -> dict[str, list[float]]:
    ws = [torch.randn(HIDDEN, nv * DV, device=dev, dtype=torch.bfloat16) / (nv * DV) ** 0.5 for _ in range(COPIES)]
    graphs = {}
    for name, fn in variants(nk, nv, settings, dev).items():
        for w in ws:        # compiled and warm before the capture
            fn(w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(CALLS):
                fn(ws[i % COPIES])
        graphs[name] = graph
    times = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            graph.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / (5 * CALLS))
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=parse_heads, nargs="+", default=[(8, 16), (16, 32)],
                    help="local key/value heads of one rank (default: 8/16 16/32, i.e. tp 2 and 1 of 80B)")
    ap.add_argument("--settings", type=parse_setting, nargs="*", default=[],
                    help="gemv(norm=...) launch settings to time beside the default, as BN/BK/WARPS/STAGES")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds takes 1 or more")
    if not torch.cuda.is_available():
        raise SystemExit("bench_products.py needs a CUDA GPU")
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    results = {}
    for nk, nv in args.heads:
        times = time_row(nk, nv, args.settings, args.rounds, dev)
        print(f"out_proj [{HIDDEN}, {nv * DV}] at {nk}/{nv} local heads, {card}, us a call (median of "
              f"{args.rounds} interleaved rounds of 5 graphs of {CALLS} calls over {COPIES} copies of W):", flush=True)
        for name, t in times.items():
            print(f"  {name:<44} {statistics.median(t):7.2f}   rounds {' '.join(f'{x:.2f}' for x in t)}", flush=True)
        results[f"{nk}/{nv}"] = {name: statistics.median(t) for name, t in times.items()}
    return results


if __name__ == "__main__":
    main()
