"""The benchmark scripts' own logic that runs without a GPU (their timing needs one)."""

import argparse
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_compare_versions_rows():
    cv = load_benchmark("compare_versions")
    assert cv.parse_row("layer-8x4096") == ("layer", 8, 4096, 1)
    assert cv.parse_row("layer-8x4096-tp4") == ("layer", 8, 4096, 4)
    assert cv.parse_row("core-1x32768-4/8") == ("core", 1, 32768, 4, 8)
    for bad in ("core-8x4096-3/8", "layer-8", "core-8x4096", "prefill-8x4096", "layer-8x4096-tp3",
                "layer-8x4096-tp0", "layer-8x4096-tp"):
        with pytest.raises(ValueError, match="layer-NxL, layer-NxL-tpP"):
            cv.parse_row(bad)
    for d in cv.DEFAULT_ROWS:
        cv.parse_row(d)


def test_position_pieces_give_the_one_calls_outputs_and_states(seed):
    """position_pieces.py's cut (every sequence cut at the same positions, the later pieces
    continuing from the slots), run in order through the torch layer and its row-chunk out_proj
    path, gives the one call's outputs and final states, both with x already in piece order and
    with the gather and put-back; its rows and piece counts refuse what they cannot run."""
    from helpers import random_full_weights, rel_err, tiny_config
    from tp_gdn import Batch, GDNLayer, StateCache

    pp = load_benchmark("position_pieces")
    cfg = tiny_config(layers=1)
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg, seed))
    n, L = 3, 256
    x = torch.randn(n * L, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    cache = StateCache(cfg, [0], n)
    y1 = layer(x, Batch([L] * n, list(range(n)), [False] * n), cache)
    s1 = cache.ssm[0].clone()
    for Q in (2, 4):
        cut, gather, perm = pp.piece_calls(layer, x, cache, n, L, Q)
        assert sorted(perm.tolist()) == list(range(n * L)) and perm.tolist() != list(range(n * L))
        cache.ssm[0].normal_()          # piece 0 starts fresh: what the slots held before must not matter
        assert rel_err(gather("none"), y1) < 1e-5
        assert rel_err(cache.ssm[0], s1) < 1e-5
        cache.ssm[0].normal_()
        assert rel_err(cut("none"), y1.index_select(0, perm)) < 1e-5
        assert rel_err(cache.ssm[0], s1) < 1e-5
    assert pp.parse_row("tp4-8x4096") == (4, 8, 4096)
    for bad in ("tp3-8x4096", "tp4-8x100", "tp0-8x4096", "tp4-0x4096", "tp4-8", "8x4096"):
        with pytest.raises(ValueError, match="rows are tpP-NxL"):
            pp.parse_row(bad)
    for L, Q in ((256, 3), (256, 8), (256, 0)):
        with pytest.raises(ValueError, match="whole number of 64-token chunks"):
            pp.piece_order(2, L, Q)


def test_position_pieces_with_their_all_reduces_give_the_unsharded_layer_at_tp2(tmp_path, seed):
    """The same cut at tp=2 over gloo, each piece's out_proj rows all-reduced as they are formed:
    every rank's output equals the one sharded call's and the unsharded fp32 layer's, in piece
    order (cut) and in x's order (gather), and the ranks' states are the one call's."""
    from helpers import random_full_weights, rel_err, run_ranks, tiny_config
    from tp_gdn import Batch, GDNLayer, StateCache
    from workers import position_pieces_workload

    cfg = tiny_config(layers=1)
    full = random_full_weights(cfg, seed)
    n, L = 3, 256
    results = run_ranks(2, position_pieces_workload, tmp_path, cfg, full, seed, n, L, (2, 4))
    x = torch.randn(n * L, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    ref = GDNLayer.from_full(cfg, 0, full)(x, Batch([L] * n, list(range(n)), [False] * n), StateCache(cfg, [0], n))
    for r, out in enumerate(results):
        y1, s1 = out["one"]
        assert rel_err(y1, ref) < 1e-5
        for Q in (2, 4):
            y_cut, perm, s_cut, y_gather, s_gather = out[Q]
            assert rel_err(y_cut, ref.index_select(0, perm)) < 1e-5, (r, Q)
            assert rel_err(y_gather, ref) < 1e-5, (r, Q)
            assert rel_err(s_cut, s1) < 1e-5 and rel_err(s_gather, s1) < 1e-5, (r, Q)
            assert torch.equal(y_gather, results[0][Q][3]), (r, Q)


def test_compare_versions_loads_a_revision_beside_the_tree(tmp_path, seed):
    """A git revision and the working tree import side by side as two packages, each whole (its
    kernels its own), and compute the same prefill where their code is the same (HEAD in a clean
    checkout; the interpreter runs the kernels here)."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    cv = load_benchmark("compare_versions")
    tag = f"t{seed}"
    old = cv.load_version("HEAD", tag + "a", tmp_path)
    new = cv.load_version(None, tag + "b", tmp_path)
    chunk_old = importlib.import_module(old.__name__ + ".kernels.triton_chunk")
    chunk_new = importlib.import_module(new.__name__ + ".kernels.triton_chunk")
    assert chunk_old is not chunk_new and chunk_old._fused_pass_kernel is not chunk_new._fused_pass_kernel
    assert Path(chunk_old.__file__).resolve().is_relative_to(tmp_path.resolve())
    assert Path(chunk_new.__file__).resolve().is_relative_to(ROOT)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "tp_gdn"], capture_output=True, text=True)
    if dirty.stdout.strip():
        return          # the tree's kernels differ from HEAD's: the numbers may too
    T, nk, nv, d = 70, 1, 2, 16
    g = torch.Generator().manual_seed(seed)
    x = {name: torch.randn(T, n, d, generator=g) for name, n in (("q", nk), ("k", nk), ("v", nv))}
    x.update(a=torch.randn(T, nv, generator=g), b=torch.randn(T, nv, generator=g), A_log=torch.rand(nv, generator=g),
             dt_bias=torch.rand(nv, generator=g), h0=torch.randn(2, nv, d, d, generator=g) * 0.3,
             batch=old.Batch([64, 6], [1, 0], [True, False]))
    calls = cv.core_calls(x, {"old": old, "new": new})     # as compare_versions and host_time run them
    outs = [(fn(), pool) for fn, pool in calls.values()]
    assert outs[0][0].equal(outs[1][0]) and outs[0][1].equal(outs[1][1])
    assert outs[0][0].abs().sum() > 0 and not outs[0][1].equal(x["h0"])


def test_compare_versions_loads_a_directory_that_holds_tp_gdn(tmp_path, seed):
    """A directory holding a tp_gdn package (a copy of the tree where the checkout has no git
    history) imports as a package of its own, from that directory; one without it is read as a
    git revision."""
    cv = load_benchmark("compare_versions")
    src = tmp_path / "copy"
    shutil.copytree(ROOT / "tp_gdn", src / "tp_gdn", ignore=shutil.ignore_patterns("__pycache__"))
    pkg = cv.load_version(str(src), f"d{seed}", tmp_path / "load")
    chunk = importlib.import_module(pkg.__name__ + ".kernels.triton_chunk")
    assert Path(chunk.__file__).resolve().is_relative_to(src.resolve())
    assert chunk is not importlib.import_module("tp_gdn.kernels.triton_chunk")
    with pytest.raises(SystemExit, match="git archive"):
        cv.load_version(str(tmp_path / "load"), f"e{seed}", tmp_path / "load2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
@pytest.mark.parametrize("script", ["compare_versions", "host_time"])
def test_version_comparisons_need_a_gpu(script):
    run = subprocess.run([sys.executable, str(ROOT / f"benchmarks/{script}.py"), "HEAD"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_products_needs_a_gpu_and_refuses_bad_settings():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_products.py"), "--settings", "8/2048/8/1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr
    bp = load_benchmark("bench_products")
    assert bp.parse_setting("4/4096/8/1") == dict(BN=4, BK=4096, TILE=16384, num_warps=8, num_stages=1)
    for bad in ("4/4096/8", "3/4096/8/1", "4/4096/8/0"):
        with pytest.raises(argparse.ArgumentTypeError):
            bp.parse_setting(bad)


def test_host_time_refuses_a_bad_row_before_it_looks_for_a_gpu():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/host_time.py"), "HEAD", "--rows", "layer-8x4096",
                          "layer-8x4096-tp3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "'layer-8x4096-tp3': rows are layer-NxL, layer-NxL-tpP" in run.stderr


def test_host_time_stamps_every_launch_entry(tmp_path):
    """The stamps wrap the `launch` of every kernel module that binds one (a module added later
    without being listed would leave its launches out of the timeline), and the cuBLAS entries."""
    ht = load_benchmark("host_time")
    cv = load_benchmark("compare_versions")
    pkg = cv.load_version(None, "stamps", tmp_path)
    kernels = Path(importlib.import_module(pkg.__name__ + ".kernels").__file__).parent
    common = importlib.import_module(f"{pkg.__name__}.kernels.triton_common")
    modules = {p.stem: importlib.import_module(f"{pkg.__name__}.kernels.{p.stem}") for p in kernels.glob("*.py")}
    binding = sorted(name for name, m in modules.items()
                     if m is not common and getattr(m, "launch", None) is common.launch)
    assert sorted(ht.KERNEL_MODULES) == binding
    points = ht.stamp_points({"v": pkg})
    assert len(points) == len(binding) + 2 and all(callable(getattr(obj, name)) for obj, name in points)


def test_gpu_clock_readings_parse():
    """The benchmarks' note of the GPU clock after each row: nvidia-smi's csv line, its event-reason
    bit mask named, and lines that are not that refused (None), not misread."""
    timing = load_benchmark("timing")
    got = timing.parse_clocks("1695, 1980, 567.12, 0x0000000000000004\n")
    assert got == dict(sm_mhz=1695, max_sm_mhz=1980, power_w=567.12, reasons=["power cap"])
    assert timing.parse_clocks("1980, 1980, 125.63, 0x0000000000000000")["reasons"] == []
    assert timing.parse_clocks("345, 1980, 80.0, 0x0000000000000041")["reasons"] == ["idle", "thermal (hw)"]
    for bad in ("", "[N/A], 1980, 100.0, 0x0", "1980, 1980, 100.0", "1980, 1980, 100.0, 0x0, 7", "No devices were found"):
        assert timing.parse_clocks(bad) is None
    assert "1695/1980 MHz, 567 W (power cap)" in timing.clocks_text(got)
    assert timing.clocks_text(None) == "GPU clock: not read"
    if not torch.cuda.is_available():
        assert timing.gpu_clocks() is None
        row = {}
        assert timing.record_clocks(row) == "GPU clock: not read" and row == {"gpu_clocks_after": None}


def test_warm_call_counts():
    """--warm-seconds: how many calls fill the time (none when off, at least one when on)."""
    timing = load_benchmark("timing")
    assert timing.warm_calls(0, 4.5) == 0 and timing.warm_calls(-1, 4.5) == 0
    assert timing.warm_calls(2.0, 4.5) == 445
    assert timing.warm_calls(2.0, 9.8) == 205
    assert timing.warm_calls(0.001, 50.0) == 1
    assert timing.warm_calls(1.0, 0.0) == 1_000_000        # a zero estimate does not divide by zero
    assert timing.warm(lambda: pytest.fail("warm ran a call with 0 seconds"), 0) == 0


def test_kernel_table_gives_the_three_ratios_of_a_prefill_row(capsys):
    """bench_kernels' table: each prefill row's ratio of single calls, of calls back to back and of
    the kernels alone (fla-core's time over ours in each)."""
    bk = load_benchmark("bench_kernels")
    row = dict(workload="prefill 8x4096, 16/32", ours_ms=1.1, ours_back_to_back_ms=1.0, ours_kernels_ms=0.9,
               fla_ms=2.2, fla_back_to_back_ms=1.5, fla_kernels_ms=1.62, ratio=2.2 / 1.1)
    bk.print_table([row], "a GPU")
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == ("| prefill 8x4096, 16/32 | 1.100 ms; 1.000 back to back; 0.900 kernels | 2.200 ms; 1.500 back "
                    "to back; 1.620 kernels | 2.00; 1.50 back to back; 1.80 kernels |"), line


def test_each_prefill_sweep_times_workloads_that_take_its_path():
    """bench_kernels.py --sweep keeps a path's launch setting by timing check_launch.SWEEP_ROWS
    under it: choose_path must pick that path on each of those workloads, or the setting kept
    would be tuned on calls that never run it (as the split sweep was, on 8x4096 rows that take
    the fused path). Each sweep also names a launch entry that the kernels read."""
    from tp_gdn.kernels import triton_chunk

    check_launch, bench_kernels = load_benchmark("check_launch"), load_benchmark("bench_kernels")
    assert set(check_launch.SWEEP_ROWS) == set(check_launch.BVS) == set(bench_kernels.SWEEP_KERNELS) == \
        set(triton_chunk.PATHS)
    assert set(bench_kernels.SWEEP_KERNELS.values()) <= set(triton_chunk.LAUNCH)
    for path, rows in check_launch.SWEEP_ROWS.items():
        assert rows, path
        for name, n, L, nk, nv in rows:
            assert name == f"prefill {n}x{L}, {nk}/{nv}"
            got, _ = triton_chunk.choose_path(n, nv, 128, torch.bfloat16, num_chunks=n * -(-L // 64))
            assert got == path, (name, got)


def test_timeline_summary_of_a_calls_streams():
    """timing.gpu_work reads the GPU work out of a profiler trace (kernels, copies and memsets with
    their streams; host events left out), and summarize_timeline splits a call's time by stream:
    the main stream (the one busy longest), its idle gaps, and the other streams' work beside
    it or exposed, on a hand-made timeline whose answers are counted by hand."""
    timing = load_benchmark("timing")
    ev = lambda cat, stream, ts, dur, name="k": {"cat": cat, "ts": ts, "dur": dur, "name": name, "args": {"stream": stream}}
    trace = {"traceEvents": [
        ev("kernel", 7, 0, 100, "in_proj"), ev("gpu_memset", 7, 100, 2), ev("kernel", 7, 110, 90),
        ev("kernel", 7, 205, 95), ev("gpu_memcpy", 18, 150, 100, "pull"), ev("kernel", 18, 260, 60, "add"),
        {"cat": "cpu_op", "ts": 0, "dur": 500, "name": "aten::mm", "args": {}},
        {"cat": "kernel", "ts": 5, "dur": 1, "name": "no stream", "args": {}}]}
    work = timing.gpu_work(trace)
    assert [w[3] for w in work] == ["in_proj", "k", "k", "pull", "k", "add"]
    got = timing.summarize_timeline(work)
    assert got == dict(span=320.0, main_stream=7, main_busy=287.0, main_idle=13.0, others_busy=160.0,
                       others_beside_main=135.0, others_exposed=25.0)
    # the main stream is the one busy longest, whichever comes first
    longer = [(3, 0.0, 10.0, "a"), (9, 5.0, 50.0, "b")]
    assert timing.summarize_timeline(longer)["main_stream"] == 9
    with pytest.raises(ValueError, match="no GPU work"):
        timing.summarize_timeline([])


def test_timeline_takes_each_calls_work_between_its_marker_kernels():
    """timing.marked_spans: each call's window runs from the end of the marker kernel queued before
    it to the start of the one queued after it, whatever else (a barrier's kernel on another
    stream) lies between the windows; markers that do not pair up are refused."""
    timing = load_benchmark("timing")
    mark = lambda ts: (7, ts, ts + 0.5, "at::cuda::(anonymous namespace)::spin_kernel(long)")
    work = sorted([mark(0), (7, 1, 50, "in_proj"), (18, 20, 60, "pull"), mark(61), (30, 70, 72, "ncclDevKernel_AllReduce"),
                   mark(80), (7, 85, 90, "k"), mark(95)], key=lambda w: w[1])
    assert timing.marked_spans(work) == [(0.5, 61.0), (80.5, 95.0)]
    first = timing.call_timeline(work, 0.5, 61.0)
    assert first["lead"] == 0.5 and first["span"] == 59.0 and first["main_busy"] == 49.0
    assert first["work"] == [("in_proj", 0.0, 49.0), ("pull", 19.0, 40.0)]
    with pytest.raises(RuntimeError, match="3 marker kernels"):
        timing.marked_spans(work[:-1])
    with pytest.raises(RuntimeError, match="0 marker kernels"):
        timing.marked_spans([(7, 1, 50, "in_proj")])
