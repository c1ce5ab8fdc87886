"""Host time of a call in two versions of tp_gdn, in one process on one GPU: when each of its
kernel launches is called, and what a single call takes.

    python benchmarks/host_time.py OLD [NEW] [--rows ROW ...] [--calls N]

OLD and NEW as in compare_versions.py (git revisions or directories holding tp_gdn/; NEW: the
working tree when left out); rows as its rows: core-NxL-NK/NV (gdn_prefill; default the four of
bench_kernels.py's prefill table) or layer-NxL[-tpP] (a layer call, or one tp=P rank's share of
one, without the all-reduce).

A single call with a sync after it (bench_kernels.py's "ours" column) takes its kernels' time
plus the host's work up to the first launch, and plus any later launch that the host issues
after the GPU has run out of work. That host work is tens of microseconds on the lent machines,
and it varies from call to call by about as much, so a change to it shows only in many calls of
both versions taken in turn. Per version this prints:

- the median, over N calls, of the microseconds from the call's start to each of its launches
  (our Triton kernels' and, in layer rows, the cuBLAS products': F.linear and torch.matmul) and to
  its return, with the GPU kept busy by a sleep kernel queued before the call (so that the
  launches queue and the host's time is its own);
- the median over N single calls (event to event, a sync after each) in milliseconds.

Calls of the two versions alternate, so drifts of the host's speed fall on both alike.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare_versions import core_calls, layer_calls, parse_row, two_versions  # noqa: E402

DEFAULT_ROWS = ["core-8x4096-16/32", "core-8x4096-8/16", "core-8x4096-4/8", "core-1x32768-4/8"]
SLEEP_CYCLES = 4_000_000      # about 2 ms at 2 GHz: longer than the host's work for one call


# the kernel modules whose `launch` the stamps wrap (each imported triton_common.launch by name)
KERNEL_MODULES = ("triton_chunk", "triton_conv", "triton_norm", "triton_decode", "triton_gemv", "triton_allreduce")


def stamp_points(versions: dict) -> list:
    """[(module or object, attribute name)] of every launch the stamps wrap: each version's
    kernel modules' `launch`, and the cuBLAS products' entry points (shared by both versions)."""
    import torch
    import torch.nn.functional as F

    points = [(importlib.import_module(f"{pkg.__name__}.kernels.{m}"), "launch")
              for pkg in versions.values() for m in KERNEL_MODULES]
    return points + [(F, "linear"), (torch, "matmul")]


def stamped_calls(fns: dict, points: list, n: int) -> dict:
    """{version: [per call: microseconds from the call's start to each launch, then to its return]};
    points: what stamp_points gives."""
    import torch

    stamps, out = [], {k: [] for k in fns}
    real = [getattr(obj, name) for obj, name in points]

    def wrap(fn):
        def stamped(*args, **kw):
            stamps.append(time.perf_counter())
            return fn(*args, **kw)
        return stamped

    try:
        for (obj, name), fn in zip(points, real):
            setattr(obj, name, wrap(fn))
        for _ in range(n):
            for k, fn in fns.items():
                torch.cuda.synchronize()
                torch.cuda._sleep(SLEEP_CYCLES)
                stamps.clear()
                t = time.perf_counter()
                fn()
                end = time.perf_counter()
                out[k].append([(s - t) * 1e6 for s in stamps] + [(end - t) * 1e6])
        torch.cuda.synchronize()
    finally:
        for (obj, name), fn in zip(points, real):
            setattr(obj, name, fn)
    return out


def single_calls(fns: dict, n: int) -> dict:
    """{version: [ms of each single call, event to event, a sync after it]}."""
    import torch

    out = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out[k].append(a.elapsed_time(b))
    return out


def run_row(name: str, row: tuple, versions: dict, n: int) -> None:
    import torch
    from bench_kernels import prefill_inputs

    if row[0] == "layer":
        calls = layer_calls(row, versions)
    else:
        _, nb, L, nk, nv = row
        calls = core_calls(prefill_inputs(nb, L, nk, nv), versions)
    fns = {k: fn for k, (fn, _) in calls.items()}
    outs = {}
    for k, fn in fns.items():
        outs[k] = fn().clone()
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    same = "bit-equal" if outs["old"].equal(outs["new"]) else "NOT bit-equal"
    stamps, singles = stamped_calls(fns, stamp_points(versions), n), single_calls(fns, n)
    print(f"{name}: outputs {same}; {n} calls of each version, in turn", flush=True)
    for k in fns:
        counts = {len(c) for c in stamps[k]}
        if len(counts) > 1:     # a call that launched more or fewer kernels than another: medians by position mislead
            print(f"  {k}: calls made {sorted(c - 1 for c in counts)} launches; the medians below are over calls "
                  f"of the most common count", flush=True)
        common = max(counts, key=lambda c: sum(len(x) == c for x in stamps[k]))
        med = [statistics.median(c) for c in zip(*(x for x in stamps[k] if len(x) == common))]
        print(f"  {k}: host us to each launch {', '.join(f'{s:.1f}' for s in med[:-1])}; to return {med[-1]:.1f}; "
              f"single call {statistics.median(singles[k]):.4f} ms", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="git revision (or directory holding tp_gdn/) of the version compared against")
    ap.add_argument("new", nargs="?", default=None,
                    help="git revision or directory holding tp_gdn/ (default: the working tree)")
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                    help=f"core or layer rows (default: {' '.join(DEFAULT_ROWS)})")
    ap.add_argument("--calls", type=int, default=200, help="calls of each version per measure (default 200)")
    args = ap.parse_args(argv)
    try:
        rows = [parse_row(r) for r in args.rows]
    except ValueError as e:
        ap.error(str(e))
    if args.calls < 1:
        ap.error("--calls must be at least 1")
    import torch
    with two_versions(args.old, args.new, "host_time.py times launches of GPU kernels") as versions:
        for name, row in zip(args.rows, rows):
            run_row(name, row, versions, args.calls)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
