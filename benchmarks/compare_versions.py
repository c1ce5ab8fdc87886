"""Two versions of tp_gdn's kernels in one process, on one GPU: per-kernel time, and whether their
outputs and final states are bit-equal.

    python benchmarks/compare_versions.py OLD [NEW] [--rows ROW ...] [--rounds N] [--calls]

OLD and NEW are git revisions of this repository (NEW: the working tree when left out), or
directories that hold a tp_gdn package (for a copy of the tree without git history: unpack
`git archive REV tp_gdn` there). Each is read into a temporary directory as a package of its own
(`tp_gdn_v0`, `tp_gdn_v1`), so both import side by side; the package's relative imports keep it
whole. The same kernel has taken several percent more or less on one lent machine than on the
next, so a change of a few percent shows only with both versions in one process, on the same
inputs, in interleaved rounds (as the fifteenth session's comparisons in benchmarks/RESULTS.md
were made).

Rows (default: the two layer rows and five core rows listed under --rows):
  layer-NxL            the tp=1 layer at Qwen3-Next-80B dims (bench_layer.py's weights), bf16
  layer-NxL-tpP        one tp=P rank's share of it (nk/P, nv/P heads), as a tp=1 layer of that
                       many heads: the rank's kernels at the rank's shapes, without the all-reduce
  core-NxL-NK/NV       gdn_prefill on bench_kernels.py's inputs (l2norm inside), bf16
e.g. layer-8x4096, layer-8x4096-tp4, core-1x32768-4/8. For each row: the relative difference of
output and final state (NEW against OLD), then the median over N interleaved rounds (default 5)
of each kernel's time under the torch profiler (5 calls a round), and of their sum. With --calls,
also the median over the rounds of whole calls (the host's work included): a round's median of
20 single calls with a sync after each (bench_kernels.py's "ours" column), and 20 back to back.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))      # bench_layer, bench_kernels, timing
DEFAULT_ROWS = ["layer-8x4096", "layer-1x4096", "core-8x4096-16/32", "core-8x4096-8/16", "core-8x4096-4/8",
                "core-1x32768-4/8", "core-1x4096-16/32"]


def parse_row(text: str) -> tuple:
    """('layer', n, L, P) or ('core', n, L, nk, nv) from a row name; ValueError names what it takes."""
    from bench_layer import CFG

    m = re.fullmatch(r"layer-(\d+)x(\d+)(?:-tp(\d+))?", text)
    if m and (m[3] is None or (int(m[3]) >= 1 and CFG.num_k_heads % int(m[3]) == 0)):
        return ("layer", int(m[1]), int(m[2]), int(m[3] or 1))
    m = re.fullmatch(r"core-(\d+)x(\d+)-(\d+)/(\d+)", text)
    if m and int(m[4]) % int(m[3]) == 0:
        return ("core", int(m[1]), int(m[2]), int(m[3]), int(m[4]))
    raise ValueError(f"{text!r}: rows are layer-NxL, layer-NxL-tpP (P dividing {CFG.num_k_heads}) or "
                     "core-NxL-NK/NV (NV a multiple of NK), e.g. layer-8x4096, layer-8x4096-tp4 or "
                     "core-1x32768-4/8")


def load_version(rev: str | None, tag: str, into: Path):
    """Import tp_gdn as of git revision `rev` (None: the working tree; a directory: the tp_gdn
    package inside it, e.g. a `git archive` unpacked where the checkout has no history) as
    package `tp_gdn_<tag>`."""
    name = f"tp_gdn_{tag}"
    dest = into / tag
    dest.mkdir(parents=True)
    if rev is None or Path(rev, "tp_gdn", "__init__.py").is_file():
        src = ROOT / "tp_gdn" if rev is None else Path(rev, "tp_gdn").resolve()
        (dest / name).symlink_to(src, target_is_directory=True)
    else:
        run = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tp_gdn"], capture_output=True)
        if run.returncode != 0:
            raise SystemExit(f"git archive {rev} failed: {run.stderr.decode().strip()}")
        with tarfile.open(fileobj=io.BytesIO(run.stdout)) as tar:
            tar.extractall(dest, filter="data")
        (dest / "tp_gdn").rename(dest / name)
    sys.path.insert(0, str(dest))
    return importlib.import_module(name)


def compare(label: str, fns: dict, outs: dict, rounds: int, calls: bool = False) -> None:
    from timing import back_to_back, kernel_times, rel, timeit

    (o0, s0), (o1, s1) = outs["old"], outs["new"]
    same = "bit-equal" if o0.equal(o1) and s0.equal(s1) else "not bit-equal"
    print(f"{label}: output new vs old {rel(o1, o0):.1e}, state {rel(s1, s0):.1e} ({same})", flush=True)
    times = {k: [] for k in fns}
    whole = {k: [] for k in fns}      # whole calls, the host's work included
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append({name: ms for name, (ms, _) in kernel_times(fn, 5).items()})
            if calls:
                whole[k].append({"single call": timeit(fn, iters=20), "back to back": back_to_back(fn, iters=20)})
    names = sorted(set().union(*(d.keys() for k in fns for d in times[k])))
    rows = [(name, times, lambda d, n=name: d.get(n, 0.0)) for name in names]
    rows.append(("all kernels", times, lambda d: sum(d.values())))
    rows += [(name, whole, lambda d, n=name: d[n]) for name in (["single call", "back to back"] if calls else [])]
    for name, table, get in rows:
        old, new = (statistics.median(get(d) for d in table[k]) for k in ("old", "new"))
        change = f"{100 * (new / old - 1):+.1f}%" if old > 0 else ""
        print(f"  {name[:40]:40s} old {old:8.4f} ms  new {new:8.4f} ms  {change}", flush=True)


def run_row(row: tuple, versions: dict, rounds: int, calls: bool = False) -> None:
    from bench_kernels import prefill_inputs
    from bench_layer import CFG

    fns, outs = {}, {}
    if row[0] == "layer":
        _, n, L, P = row
        for k, (fn, ssm) in layer_calls(row, versions).items():
            fns[k] = fn
            outs[k] = (fn().clone(), ssm.clone())
        label = f"layer tp=1 {n}x{L}" if P == 1 else \
            f"layer, one tp={P} rank ({CFG.num_k_heads // P}/{CFG.num_v_heads // P} heads), {n}x{L}"
        compare(label, fns, outs, rounds, calls)
        return
    _, n, L, nk, nv = row
    for k, (fn, pool) in core_calls(prefill_inputs(n, L, nk, nv), versions).items():
        fns[k] = fn
        outs[k] = (fn().clone(), pool.clone())   # the state after one call from h0
    compare(f"core {n}x{L} {nk}/{nv}", fns, outs, rounds, calls)


def layer_calls(row: tuple, versions: dict) -> dict:
    """{version: (a call of its layer on a layer row's input (fresh sequences, bf16, one GPU), the
    layer's state pool that the call writes)}; each version has its own layer, batch and cache,
    built from the same weights."""
    import dataclasses

    import torch
    from bench_layer import CFG, full_weights

    _, n, L, P = row
    cfg = dataclasses.replace(CFG, num_k_heads=CFG.num_k_heads // P, num_v_heads=CFG.num_v_heads // P)
    dev = torch.device("cuda")
    w = full_weights(cfg=cfg)
    x = torch.randn(n * L, cfg.hidden_size, device=dev, dtype=torch.bfloat16,
                    generator=torch.Generator(device=dev).manual_seed(1))
    calls = {}
    for k, pkg in versions.items():
        layer = pkg.GDNLayer.from_full(cfg, 0, w, 0, 1, dtype=torch.bfloat16, device=dev, backend="triton")
        batch = pkg.Batch([L] * n, list(range(n)), [False] * n)
        cache = pkg.StateCache(cfg, [0], n, dtype=torch.bfloat16, device=dev, tp_size=1)
        calls[k] = (lambda layer=layer, batch=batch, cache=cache: layer(x, batch, cache), cache.ssm[0])
    return calls


def core_calls(x: dict, versions: dict) -> dict:
    """{version: (a call of its gdn_prefill on bench_kernels.py's inputs x, the state pool that the
    call reads and writes: a copy of x's initial states)}; each version has its own Batch and pool."""
    calls = {}
    for k, pkg in versions.items():
        batch = pkg.Batch(x["batch"].seq_lens, x["batch"].slots, x["batch"].has_state)
        pool = x["h0"].clone()
        ops = importlib.import_module(pkg.__name__ + ".kernels.triton_ops")
        calls[k] = (lambda ops=ops, batch=batch, pool=pool: ops.gdn_prefill(
            x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], pool, batch), pool)
    return calls


@contextlib.contextmanager
def two_versions(old: str, new: str | None, what: str):
    """{"old": package, "new": package} of the two revisions (new None: the working tree), imported
    side by side from a temporary directory, after a line naming the GPU; `what` the script's
    purpose, for the message when there is no GPU."""
    import torch
    if not torch.cuda.is_available():
        raise SystemExit(f"{what}: it needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"old": load_version(old, "v0", Path(tmp)), "new": load_version(new, "v1", Path(tmp))}
        print(f"device {torch.cuda.get_device_name()}; old {old}, new {new or 'the working tree'}", flush=True)
        yield versions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="git revision (or directory holding tp_gdn/) of the version compared against")
    ap.add_argument("new", nargs="?", default=None,
                    help="git revision or directory holding tp_gdn/ (default: the working tree)")
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help=f"workloads (default: {' '.join(DEFAULT_ROWS)})")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row (default 5)")
    ap.add_argument("--calls", action="store_true",
                    help="also time whole calls: single calls with a sync after each, and back to back, so "
                         "that changes on the host's side show")
    args = ap.parse_args(argv)
    try:
        rows = [parse_row(r) for r in args.rows]
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    import torch
    with two_versions(args.old, args.new, "compare_versions.py times GPU kernels") as versions:
        failed = 0
        for name, row in zip(args.rows, rows):
            try:
                run_row(row, versions, args.rounds, args.calls)
            except Exception as e:      # said, and the next row runs (e.g. one version refuses a shape)
                failed += 1
                print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
