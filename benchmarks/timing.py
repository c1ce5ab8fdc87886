"""Timing helpers shared by the benchmarks: CUDA-event medians over a fixed iteration count
(the same on every rank, so collectives never deadlock) and CUDA-graph capture."""

from __future__ import annotations

import math
import statistics
import subprocess

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


def warm_calls(seconds: float, ms_per_call: float) -> int:
    """How many calls of ms_per_call fill about `seconds` (0 for seconds <= 0, else at least 1)."""
    if seconds <= 0:
        return 0
    return max(1, math.ceil(seconds * 1e3 / max(ms_per_call, 1e-3)))


def warm(fn, seconds: float) -> int:
    """Run fn back to back for about `seconds` before a timing, so that the timing sees the GPU at
    the clock that sustained load holds it to (under the 8x4096 layer an H200 capped its power and
    ran 14-17% below its top clock; benchmarks/RESULTS.md, twenty-third session). The call count
    comes from one timed call on rank 0 and is broadcast, so every rank runs the same number.
    Returns the count (0 for seconds <= 0)."""
    if seconds <= 0:
        return 0
    n = warm_calls(seconds, timeit(fn, iters=1, warmup=0))
    if dist.is_initialized():
        t = torch.tensor([n], device=torch.cuda.current_device(), dtype=torch.int64)
        dist.broadcast(t, 0)
        n = int(t.item())
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return n


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


# what a call's GPU timeline holds (the chrome trace's categories of GPU work)
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def gpu_work(trace: dict) -> list[tuple[int, float, float, str]]:
    """[(stream, start us, end us, name)] of the GPU work in a torch profiler chrome trace (the
    dict that export_chrome_trace writes), in start order."""
    work = [(int(e["args"]["stream"]), float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"])
            for e in trace.get("traceEvents", []) if e.get("cat") in GPU_WORK and "stream" in e.get("args", {})]
    return sorted(work, key=lambda w: w[1])


def _union(intervals) -> list[tuple[float, float]]:
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(x, y) -> list[tuple[float, float]]:
    """The intersection of two sorted, disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def summarize_timeline(work: list[tuple[int, float, float, str]]) -> dict:
    """What one call's GPU work (gpu_work's list) says about its streams, in microseconds: span
    (first start to last end), the main stream (the one busy longest) and its busy and idle time
    between its first start and last end, the other streams' busy time (their union), how much of
    that ran beside the main stream's work, and how much did not (exposed: the main stream had
    nothing running then, as at a call's end while its last transfer or sum finishes)."""
    if not work:
        raise ValueError("no GPU work in the timeline")
    by_stream: dict[int, list] = {}
    for stream, a, b, _ in work:
        by_stream.setdefault(stream, []).append((a, b))
    busy = {s: _union(iv) for s, iv in by_stream.items()}
    main = max(busy, key=lambda s: _length(busy[s]))
    main_busy = _length(busy[main])
    others = _union([iv for s, ivs in busy.items() if s != main for iv in ivs])
    beside = _length(_intersect(others, busy[main]))
    return dict(span=max(b for _, _, b, _ in work) - min(a for _, a, _, _ in work), main_stream=main,
                main_busy=main_busy, main_idle=busy[main][-1][1] - busy[main][0][0] - main_busy,
                others_busy=_length(others), others_beside_main=beside, others_exposed=_length(others) - beside)


MARK_NAME = "spin_kernel"      # the kernel of torch.cuda._sleep, which marks where a timed call starts and ends
MARK_CYCLES = 1000            # about half a microsecond at the H200's clock


def marked_spans(work: list[tuple[int, float, float, str]]) -> list[tuple[float, float]]:
    """[(start us, end us)] between each pair of marker kernels (MARK_NAME) in gpu_work's list: the
    end of the marker queued before a call to the start of the one queued after it. Raises where
    the markers do not pair up."""
    marks = [(a, b) for _, a, b, name in work if MARK_NAME in name]
    if not marks or len(marks) % 2:
        raise RuntimeError(f"the profiler's trace holds {len(marks)} marker kernels; each timed call needs two")
    return [(marks[i][1], marks[i + 1][0]) for i in range(0, len(marks), 2)]


def timeline(fn, calls: int = 3) -> list[dict]:
    """call_timeline of `calls` single calls of fn in one profiler session, each after a sync
    and, under torch.distributed, a barrier (every rank runs the same calls; fn may hold
    collectives). The profiler records GPU activity only: with CPU activity as well, its host work
    per operation held the GPU back (a tp=2 call's GPU span grew from about 2.6 to 2.7-3.2 ms,
    the extra time idle). So a call's work is found between two tiny marker kernels queued on the
    current stream just before and just after it (fn must leave every stream it uses joined to
    the current one, as the layer does). One call more runs first and is dropped: the first call
    under a profiler runs slow."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls + 1):
            torch.cuda.synchronize()
            if dist.is_initialized():
                dist.barrier()
                torch.cuda.synchronize()
            torch.cuda._sleep(MARK_CYCLES)
            fn()
            torch.cuda._sleep(MARK_CYCLES)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/trace.json"
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    work = gpu_work(trace)
    spans = marked_spans(work)
    if len(spans) != calls + 1:
        raise RuntimeError(f"the profiler's trace marks {len(spans)} calls, not {calls + 1}")
    return [call_timeline(work, a, b) for a, b in spans[1:]]


def call_timeline(work: list[tuple[int, float, float, str]], a: float, b: float) -> dict:
    """summarize_timeline of the work that starts in [a, b) (a call's window between its markers),
    lead: the microseconds from the end of the marker before the call to the call's first GPU
    work, and work: [(name, start, duration)] of each piece, its start counted from the call's
    first GPU work. The marker is queued just before the call on an idle GPU, so lead is the host's
    time from there to the call's first launch reaching the GPU: what a single call adds ahead
    of its GPU span."""
    inside = [w for w in work if a <= w[1] < b]
    out = summarize_timeline(inside)
    first = min(w[1] for w in inside)
    out["lead"] = first - a
    # each piece of work as (name, start after the call's first GPU work, duration), in start order
    out["work"] = [(name, start - first, end - start) for _, start, end, name in inside]
    return out


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


# nvidia-smi's clock event reasons (NVML's nvmlClocksEventReason* bits): why the SM clock is below
# its maximum at the moment it is read
CLOCK_REASONS = {0x1: "idle", 0x2: "application clocks", 0x4: "power cap", 0x8: "hw slowdown",
                 0x10: "sync boost", 0x20: "thermal (sw)", 0x40: "thermal (hw)", 0x80: "power brake",
                 0x100: "display clock"}
_CLOCK_QUERY = "clocks.sm,clocks.max.sm,power.draw,clocks_event_reasons.active"
_CLOCK_QUERY_OLD = "clocks.sm,clocks.max.sm,power.draw,clocks_throttle_reasons.active"   # the name before the rename, for older drivers


def parse_clocks(line: str) -> dict | None:
    """One line of `nvidia-smi --query-gpu=<_CLOCK_QUERY> --format=csv,noheader,nounits` as
    {sm_mhz, max_sm_mhz, power_w, reasons: [names]}, or None where it does not read as that."""
    parts = [p.strip() for p in line.strip().split(",")]
    if len(parts) != 4:
        return None
    try:
        sm, top, watts, mask = int(parts[0]), int(parts[1]), float(parts[2]), int(parts[3], 16)
    except ValueError:
        return None
    return dict(sm_mhz=sm, max_sm_mhz=top, power_w=watts,
                reasons=[name for bit, name in CLOCK_REASONS.items() if mask & bit])


def gpu_clocks(device=None) -> dict | None:
    """The current GPU's SM clock, its maximum, the power draw and why the clock is lower, read
    now (parse_clocks); None where there is no GPU or nvidia-smi cannot say. The benchmarks print
    it after each row: under sustained load an H200 ran the 8x4096 layer at 14-17% lower SM
    clocks (power cap), so a row's time depends on how long the GPU had been busy
    (benchmarks/RESULTS.md, twenty-third session)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    try:
        bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:
        return None
    for query in (_CLOCK_QUERY, _CLOCK_QUERY_OLD):
        try:
            out = subprocess.run(["nvidia-smi", "-i", bus, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0:
            return parse_clocks(out.stdout)
    return None


def record_clocks(row: dict, device=None) -> str:
    """Read gpu_clocks into row["gpu_clocks_after"] and return its note (clocks_text)."""
    row["gpu_clocks_after"] = gpu_clocks(device)
    return clocks_text(row["gpu_clocks_after"])


def clocks_text(clocks: dict | None) -> str:
    """gpu_clocks' reading as a short note for a benchmark row."""
    if clocks is None:
        return "GPU clock: not read"
    why = f" ({', '.join(clocks['reasons'])})" if clocks["reasons"] else ""
    return f"GPU clock after it: SM {clocks['sm_mhz']}/{clocks['max_sm_mhz']} MHz, {clocks['power_w']:.0f} W{why}"
