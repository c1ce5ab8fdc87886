"""Timing helpers shared by the benchmarks: CUDA-event medians over a fixed iteration count
(the same on every rank, so collectives never deadlock) and CUDA-graph capture."""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist


def timeit(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `iters` calls after `warmup` calls; ranks meet before and after."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    if dist.is_initialized():
        dist.barrier()
    return statistics.median(times)


def back_to_back(fn, iters: int = 50, warmup: int = 3) -> float:
    """Milliseconds per call of `iters` calls issued back to back between two events (the host
    runs ahead, as in a serving loop that does not wait on each step); ranks meet around it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    if dist.is_initialized():
        dist.barrier()
    return a.elapsed_time(b) / iters


def kernel_times(fn, calls: int = 3) -> dict[str, tuple[float, int]]:
    """{GPU kernel name: (ms per call, launches per call)} over `calls` calls of fn under the torch
    profiler, after one call outside it (every rank runs it, as fn may hold collectives)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: (e.device_time_total / calls / 1e3, e.count // calls)
            for e in prof.key_averages() if e.device_time_total > 0}


def copy_bandwidth() -> float:
    """Bytes per second (read + written) of a 2 GiB device-to-device copy on the current GPU."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = timeit(lambda: y.copy_(x), iters=10)
    return 2 * x.numel() / (ms * 1e-3)


def graphed(fn):
    """Capture fn in a CUDA graph (after a warm-up on a side stream); return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()
