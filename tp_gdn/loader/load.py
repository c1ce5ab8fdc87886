"""load_layers: this rank's shard of every GDN layer of a checkpoint, read rank-locally."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import GDNConfig
from ..kernels import resolve_backend
from ..layer import GDNLayer, check_dtype
from ..parallel import Replicate, get_rank, get_world_size
from .files import CheckpointError, LoadStats, SafetensorsCheckpoint
from .presharded import MANIFEST, presharded_files
from .rules import local_shapes, pack_into, tensor_rules


def load_layers(
    ckpt_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    layer_ids: list[int] | None = None,
    backend: str = "auto",
    *,
    tp_rank: int | None = None,
    tp_size: int | None = None,
    group=None,
    stats: LoadStats | None = None,
    progress: bool | None = None,
    verify: bool = True,
) -> dict[int, GDNLayer]:
    """{layer index: GDNLayer} holding this rank's shard of each linear-attention layer.

    `ckpt_dir` is an HF checkpoint (config.json + safetensors, one file or sharded with an index)
    or a directory written by `tp-gdn shard`. Rank and tp size come from the process group
    unless given. Each rank reads only its own rows of each tensor (plus the small replicated
    ones) and casts them to `dtype` on `device`. Every tensor is checked against config.json
    before any data is read; on any error nothing is returned. `stats`, if given, receives the
    bytes read and files opened. `progress`: a bar on rank 0 when stderr is a terminal (None),
    always (True) or never (False). `verify`: check a pre-sharded file's sha256 checksums (hashed
    on background threads while the layers load; a mismatch raises and nothing is returned).
    """
    t0 = time.perf_counter()
    ckpt_dir = Path(ckpt_dir)
    cfg = GDNConfig.from_pretrained(ckpt_dir)
    rank = get_rank(group) if tp_rank is None else tp_rank
    world = get_world_size(group) if tp_size is None else tp_size
    cfg.check_tp(world)
    if not 0 <= rank < world:
        raise ValueError(f"tp_rank {rank} is not in [0, {world})")
    if layer_ids is None:
        layer_ids = cfg.linear_layer_ids
    cfg.check_layer_ids(dict.fromkeys(layer_ids), ckpt_dir)   # a repeated index loads once, as before

    check_dtype(dtype, resolve_backend(backend, device))    # before any tensor is read
    rules = tensor_rules(cfg)
    if (ckpt_dir / MANIFEST).is_file():
        # each tensor in the rank's file is already its local piece
        files, finish = presharded_files(ckpt_dir, cfg, rank, world, verify=verify)
        names = {i: {n: (cfg.tensor_prefix(i) + n, Replicate()) for n in rules} for i in layer_ids}
        shapes = local_shapes(cfg, world)
    else:
        files = SafetensorsCheckpoint(ckpt_dir)
        finish = lambda: None  # noqa: E731
        names = {i: {n: (cfg.tensor_prefix(i) + n, rule) for n, (_, rule) in rules.items()} for i in layer_ids}
        shapes = {n: shape for n, (shape, _) in rules.items()}
    expected = {cfg.tensor_prefix(i) + n: shapes[n] for i in layer_ids for n in rules}
    show = progress if progress is not None else (rank == 0 and sys.stderr.isatty())
    layers = {}
    try:
        files.check(expected)
        with files.reader(stats) as reader, tqdm(total=len(layer_ids), desc="loading GDN layers", unit="layer",
                                                 disable=not show, leave=False) as bar:
            for i in layer_ids:
                pieces = {n: reader.read(full, rule, rank, world) for n, (full, rule) in names[i].items()}
                layer = GDNLayer(cfg, i, rank, world, group=group, dtype=dtype, device=device, backend=backend)
                with torch.no_grad():
                    pack_into(cfg, world, pieces, dict(layer.named_parameters()))
                layers[i] = layer
                bar.update()
    except CheckpointError:
        finish()  # a pre-sharded file that changed: say that rather than how it fails to read
        raise
    finish()      # the pre-sharded file's checksum, hashed while the layers loaded
    if stats is not None:
        stats.seconds = time.perf_counter() - t0
    return layers


__all__ = ["load_layers", "LoadStats", "CheckpointError"]
