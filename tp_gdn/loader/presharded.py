"""Pre-sharded checkpoints: one safetensors file per rank plus a manifest.

`write_presharded` cuts an HF checkpoint with the same rules the loader uses (each rank's file
holds exactly the pieces that rank would read) and records tp, layout, the source config and,
per file, the sha256 of each 64 MiB block (manifest version 2), so that a load can check its file
on several cores at once; version 1 manifests (one sha256 per file) still load. Loading such a
directory reads only the rank's own file, checks its checksums alongside, and checks that the
run's tp matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from ..config import GDNConfig
from .files import CheckpointError, SafetensorsCheckpoint, check_new_output
from .rules import tensor_rules

MANIFEST = "tp_gdn_manifest.json"
FORMAT = "tp_gdn.presharded"


def rank_file(rank: int, tp: int) -> str:
    return f"rank-{rank:05d}-of-{tp:05d}.safetensors"


HASH_BLOCK = 64 << 20
HASH_THREADS = min(8, os.cpu_count() or 1)


def sha256_file(path: Path, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _sha256_range(fd: int, start: int, length: int, piece: int = 4 << 20) -> str:
    h = hashlib.sha256()
    pos, end = start, start + length
    while pos < end:
        data = os.pread(fd, min(piece, end - pos), pos)
        if not data:
            break
        h.update(data)
        pos += len(data)
    return h.hexdigest()


def sha256_blocks(path: Path, block: int, threads: int | None = None) -> list[str]:
    """sha256 of each `block`-byte block of the file (the last one shorter), hashed by `threads`
    threads at once (default HASH_THREADS; pread and hashlib let go of the GIL)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        starts = range(0, max(size, 1), block)
        with ThreadPoolExecutor(max(1, threads or HASH_THREADS), thread_name_prefix="tp_gdn-sha256") as pool:
            return list(pool.map(lambda a: _sha256_range(fd, a, min(block, size - a)), starts))
    finally:
        os.close(fd)


def write_presharded(src_dir: str | Path, out_dir: str | Path, tp: int, progress: bool | None = None) -> Path:
    """Write `out_dir` (new, or an empty directory) with one file per rank of `tp`, a copy of
    config.json and a manifest."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    cfg = GDNConfig.from_pretrained(src_dir)
    cfg.check_tp(tp)
    if (src_dir / MANIFEST).is_file():
        raise CheckpointError(f"{src_dir} is already pre-sharded; shard the original HF checkpoint instead")
    if out_dir.resolve() == src_dir.resolve():
        raise CheckpointError("the output directory must differ from the source")
    check_new_output(out_dir)
    files = SafetensorsCheckpoint(src_dir)
    rules = tensor_rules(cfg)
    names = [cfg.tensor_prefix(i) + n for i in cfg.linear_layer_ids for n in rules]
    files.check({cfg.tensor_prefix(i) + n: shape for i in cfg.linear_layer_ids for n, (shape, _) in rules.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    with files.reader() as reader, tqdm(total=tp * len(names), desc=f"sharding for tp={tp}", unit="tensor",
                                        disable=progress is False, leave=False) as bar:
        for rank in range(tp):
            pieces = {}
            for i in cfg.linear_layer_ids:
                for n, (_, rule) in rules.items():
                    pieces[cfg.tensor_prefix(i) + n] = reader.read(cfg.tensor_prefix(i) + n, rule, rank, tp).contiguous()
                    bar.update()
            path = out_dir / rank_file(rank, tp)
            save_file(pieces, str(path), metadata={"format": "pt", "tp": str(tp), "rank": str(rank)})
            entries.append({"rank": rank, "file": path.name, "bytes": path.stat().st_size,
                            "sha256_block_bytes": HASH_BLOCK,
                            "sha256_blocks": sha256_blocks(path, HASH_BLOCK)})
    shutil.copyfile(src_dir / "config.json", out_dir / "config.json")
    manifest = {
        "format": FORMAT,
        "version": 2,
        "tp": tp,
        "model_type": cfg.model_type,
        "layout": cfg.layout,
        "layer_ids": cfg.linear_layer_ids,
        "source": str(src_dir.resolve()),
        "config_sha256": sha256_file(src_dir / "config.json"),
        "files": entries,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def read_manifest(ckpt_dir: Path) -> dict:
    path = ckpt_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tp_gdn pre-sharded manifest (format {manifest.get('format')!r})")
    if manifest.get("version") not in (1, 2):
        raise CheckpointError(f"{path}: manifest version {manifest.get('version')!r}; this tp_gdn reads versions "
                              "1 and 2 (shard the checkpoint again with this version)")
    return manifest


def presharded_tp(ckpt_dir: str | Path) -> int | None:
    """The tp a checkpoint directory is pre-sharded for, or None for an HF checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    return read_manifest(ckpt_dir)["tp"] if (ckpt_dir / MANIFEST).is_file() else None


def check_presharded_tp(ckpt_dir: str | Path, tp: int, have: int | None = None) -> None:
    """Refuse to run a pre-sharded checkpoint at another tp than it was sharded for (`have`, read
    from its manifest unless given)."""
    if have is None:
        have = presharded_tp(ckpt_dir)
    if have is not None and have != tp:
        raise CheckpointError(
            f"{ckpt_dir} is pre-sharded for tp={have}, but this run has tp={tp}; "
            f"shard the HF checkpoint again with `tp-gdn shard SRC --tp {tp} --out DIR`")


def presharded_files(ckpt_dir: Path, cfg: GDNConfig, rank: int, tp: int, verify: bool = True
                     ) -> tuple[SafetensorsCheckpoint, Callable[[], None]]:
    """The rank's own file of a pre-sharded directory, after checking tp and layout, and a
    `finish()` that checks the file's checksums against the manifest (raising CheckpointError if
    one differs). With `verify`, hashing starts now in background threads (one per block at a
    time, up to HASH_THREADS; a version 1 manifest's whole-file hash in one), so it overlaps the
    load that reads the same bytes; call `finish()` before handing anything out."""
    manifest = read_manifest(ckpt_dir)
    check_presharded_tp(ckpt_dir, tp, manifest["tp"])
    if manifest["layout"] != cfg.layout or manifest["model_type"] != cfg.model_type:
        raise CheckpointError(f"{ckpt_dir / MANIFEST}: says {manifest['model_type']}/{manifest['layout']}, "
                              f"config.json says {cfg.model_type}/{cfg.layout}")
    entry = next((e for e in manifest["files"] if e["rank"] == rank), None)
    if entry is None:
        raise CheckpointError(f"{ckpt_dir / MANIFEST}: lists no file for rank {rank}")
    path = ckpt_dir / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: rank {rank}'s file is missing")
    if not verify:
        return SafetensorsCheckpoint(ckpt_dir, only=[entry["file"]]), lambda: None
    pool = ThreadPoolExecutor(1, thread_name_prefix="tp_gdn-sha256")
    if "sha256_blocks" in entry:
        block = entry["sha256_block_bytes"]
        digest = pool.submit(sha256_blocks, path, block)
        want = entry["sha256_blocks"]
    else:
        digest = pool.submit(sha256_file, path)
        want = entry["sha256"]
    pool.shutdown(wait=False)

    def finish() -> None:
        got = digest.result()
        if got != want:
            where = ""
            if isinstance(want, list):
                bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                where = f" (from byte {bad * block} on)"
            raise CheckpointError(f"{path}: sha256 does not match the manifest{where}; the file is corrupt or "
                                  "was changed")

    try:
        return SafetensorsCheckpoint(ckpt_dir, only=[entry["file"]]), finish
    except CheckpointError:
        finish()  # a changed file: say so rather than how it fails to parse
        raise
