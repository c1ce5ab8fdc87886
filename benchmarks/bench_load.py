"""Load time and bytes read per rank, next to a raw sequential read of as many bytes.

    python benchmarks/bench_load.py [--checkpoint DIR] [--tp 1 2 4] [--device cpu] [--presharded] [--no-hf]
        [--json OUT]

Without --checkpoint it generates a GDN-only checkpoint with the Qwen3-Next-80B-A3B GDN dims
(36 GDN layers, bf16 matrices, about 2.3 GiB) in a temporary directory. Each rank of each tp is
loaded in turn in this process (`load_layers(tp_rank=r, tp_size=tp)`), once with the files
dropped from the page cache (posix_fadvise DONTNEED: reads come from the disk) and once warm.
The raw read reads the same number of bytes sequentially from the checkpoint's files into fresh
memory in 64 MiB blocks, under the same cache state. Goal: each rank reads <= 1/tp of the bytes plus
the replicated tensors, in <= 1.5x the raw read time. `--presharded` adds rows for a `tp-gdn shard`
copy of the checkpoint (each rank reads its own file; by default load_layers checks the sha256 of
each 64 MiB block of it in background threads while it loads; the verify=False rows skip that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tp_gdn import GDNConfig, LoadStats, load_layers
from tp_gdn.loader.presharded import write_presharded
from tp_gdn.loader.synthetic import write_checkpoint


def files_of(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def drop_cache(ckpt: Path) -> None:
    for f in files_of(ckpt):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(ckpt: Path) -> None:
    raw_read(ckpt, sum(f.stat().st_size for f in files_of(ckpt)))


def raw_read(ckpt: Path, nbytes: int, block: int = 64 << 20) -> float:
    """Seconds to read `nbytes` sequentially from the checkpoint's files into fresh memory (what
    any loader must do with the bytes it reads), in large blocks."""
    left = nbytes
    t0 = time.perf_counter()
    buf = torch.empty(nbytes, dtype=torch.uint8).numpy()
    pos = 0
    for f in files_of(ckpt):
        with open(f, "rb", buffering=0) as fh:
            while left > 0:
                n = fh.readinto(memoryview(buf)[pos: pos + min(block, left)])
                if not n:
                    break
                left -= n
                pos += n
        if left <= 0:
            break
    return time.perf_counter() - t0


def measure(ckpt: Path, kind: str, tp: int, rank: int, dtype, device, total: int, **load_kw) -> dict:
    """Cold and warm load of one rank next to raw reads of as many bytes under the same cache state."""
    row = dict(kind=kind, tp=tp, rank=rank)
    for cache_state in ("cold", "warm"):
        if cache_state == "cold":
            drop_cache(ckpt)
        else:
            warm_cache(ckpt)
        stats = LoadStats()
        layers = load_layers(ckpt, dtype=dtype, device=device, tp_rank=rank, tp_size=tp, stats=stats,
                             progress=False, **load_kw)
        del layers
        if cache_state == "cold":
            drop_cache(ckpt)
        raw = raw_read(ckpt, stats.bytes_read)
        row.update({f"{cache_state}_load_s": stats.seconds, f"{cache_state}_raw_s": raw,
                    "bytes_read": stats.bytes_read, "files_opened": len(stats.files_opened)})
    print(f"{kind} tp={tp} rank={rank}: read {row['bytes_read'] / 2**20:,.0f} MiB ({row['bytes_read'] / total:.3f} "
          f"of the HF file bytes); cold {row['cold_load_s']:.2f} s vs raw {row['cold_raw_s']:.2f} s; "
          f"warm {row['warm_load_s']:.2f} s vs raw {row['warm_raw_s']:.2f} s", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint to load (default: generate the 80B-dims one)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--presharded", action="store_true",
                    help="also write a pre-sharded copy for each tp > 1 (tp-gdn shard) and load each rank from it")
    ap.add_argument("--no-hf", action="store_true", help="skip the rows that load the HF checkpoint itself")
    args = ap.parse_args()
    tmp_shards = tempfile.TemporaryDirectory(prefix="tp_gdn_bench_shards_")

    tmp = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="tp_gdn_bench_load_")
        t0 = time.perf_counter()
        ckpt = write_checkpoint(Path(tmp.name) / "qwen3-next-80b-gdn", "qwen3-next-80b", gdn_layers=36,
                                dtype="bfloat16")
        print(f"generated {ckpt} in {time.perf_counter() - t0:.1f} s")
    cfg = GDNConfig.from_pretrained(ckpt)
    total = sum(f.stat().st_size for f in files_of(ckpt))
    print(f"checkpoint: {len(cfg.linear_layer_ids)} GDN layers, {len(files_of(ckpt))} files, {total / 2**30:.2f} GiB")
    dtype = getattr(torch, cfg.torch_dtype) if cfg.torch_dtype else torch.bfloat16

    if torch.device(args.device).type == "cuda":
        torch.zeros(1, device=args.device)        # CUDA's start-up, outside the first timed load
    rows = []
    for tp in args.tp if not args.no_hf else []:
        for rank in range(tp):
            rows.append(measure(ckpt, "HF", tp, rank, dtype, args.device, total))
    if args.presharded:
        for tp in [t for t in args.tp if t > 1]:
            out = Path(tmp_shards.name) / f"tp{tp}"
            t0 = time.perf_counter()
            write_presharded(ckpt, out, tp, progress=False)
            print(f"pre-sharded for tp={tp} in {time.perf_counter() - t0:.1f} s", flush=True)
            for rank in range(tp):
                rows.append(measure(out, "pre-sharded", tp, rank, dtype, args.device, total))
                rows.append(measure(out, "pre-sharded, verify=False", tp, rank, dtype, args.device, total,
                                    verify=False))
            shutil.rmtree(out)

    print("\n| checkpoint | tp | rank | bytes read | share of HF file bytes | cold load / raw read | warm load / raw read |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['tp']} | {r['rank']} | {r['bytes_read'] / 2**20:,.0f} MiB | "
              f"{r['bytes_read'] / total:.3f} | "
              f"{r['cold_load_s']:.2f} s / {r['cold_raw_s']:.2f} s = {r['cold_load_s'] / r['cold_raw_s']:.2f}x | "
              f"{r['warm_load_s']:.2f} s / {r['warm_raw_s']:.2f} s = {r['warm_load_s'] / r['warm_raw_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(total_bytes=total, rows=rows), indent=1))
    if tmp is not None:
        tmp.cleanup()
    tmp_shards.cleanup()


if __name__ == "__main__":
    main()
