"""Reading tensors, or only some of their rows or columns, out of safetensors files.

Knows nothing of GDN: it maps tensor names to files (through `model.safetensors.index.json`, or
the headers of the files themselves), checks shapes and dtypes from the headers before reading
any data, opens each file once, and counts the bytes it reads. Pickle-based weight files are
refused, never opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..parallel import Replicate, Rule, Split

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def check_new_output(out_dir: Path) -> None:
    """Refuse to write a checkpoint into a directory that already holds something. Its files would
    be mixed with the new ones: a pre-sharded manifest left there is read before the HF files (so
    the old rank files would load under the new config.json), and one written beside an HF
    checkpoint turns that checkpoint into a pre-sharded one."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir} exists and is not an empty directory; write the checkpoint to a new or "
                              "empty directory (or remove this one first)")


@dataclass
class LoadStats:
    """What a load read: filled in by the loader when passed to `load_layers(stats=...)`."""

    bytes_read: int = 0
    tensors_read: int = 0
    files_opened: list[str] = field(default_factory=list)
    seconds: float = 0.0     # wall time of the whole load_layers call


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


class SafetensorsCheckpoint:
    """The safetensors files of one checkpoint directory."""

    def __init__(self, ckpt_dir: str | Path, only: list[str] | None = None):
        """`only`: read just these files of the directory (a pre-sharded rank's own)."""
        self.dir = Path(ckpt_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such checkpoint directory")
        files = sorted(self.dir.glob("*.safetensors"))
        index = self.dir / INDEX
        if only is not None:
            self.weight_map = {}
            for fname in only:
                path = self.dir / fname
                if not path.is_file():
                    raise CheckpointError(f"{path}: file is missing")
                with _open(path) as f:
                    self.weight_map.update({name: path for name in f.keys()})
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for name, fname in weight_map.items():
                if not (self.dir / fname).is_file():
                    raise CheckpointError(f"{index}: names file {fname} (for tensor {name}), which does not exist")
            self.weight_map = {name: self.dir / fname for name, fname in weight_map.items()}
        elif files:
            self.weight_map = {}
            for path in files:
                with _open(path) as f:
                    self.weight_map.update({name: path for name in f.keys()})
        else:
            pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{self.dir}: weights are in {', '.join(pickles)}, a pickle-based format that tp_gdn "
                    "never unpickles; convert the checkpoint to safetensors")
            raise CheckpointError(f"{self.dir}: no safetensors weights (no {INDEX}, no *.safetensors)")
        self._infos: dict[str, TensorInfo] = {}

    def infos(self, names: list[str]) -> dict[str, TensorInfo]:
        """Shape and dtype of each named tensor, from the file headers (no tensor data read)."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"{self.dir}: tensor {missing[0]} is missing from the checkpoint"
                                  + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self._infos:
                by_file.setdefault(self.weight_map[n], []).append(n)
        for path, group in by_file.items():
            with _open(path) as f:
                present = set(f.keys())
                for n in group:
                    if n not in present:
                        raise CheckpointError(f"{path}: tensor {n} is not in this file, though the index puts it there")
                    sl = f.get_slice(n)
                    self._infos[n] = TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
        return {n: self._infos[n] for n in names}

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise on the first tensor that is missing, misshapen or not floating point."""
        for name, info in self.infos(list(expected)).items():
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; GDN weights must be "
                                      f"one of {', '.join(FLOAT_DTYPES)}")
            if info.shape != tuple(expected[name]):
                raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, but config.json "
                                      f"implies {list(expected[name])}")

    def reader(self, stats: LoadStats | None = None) -> "Reader":
        """A reader that opens each file at most once, until it is closed (use it in `with`)."""
        return Reader(self, stats)


class Reader:
    def __init__(self, ckpt: SafetensorsCheckpoint, stats: LoadStats | None):
        self.ckpt, self.stats = ckpt, stats
        self._handles: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self._handles.values():
            f.__exit__(None, None, None)
        self._handles.clear()

    def _file(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open(path).__enter__()
            if self.stats is not None:
                self.stats.files_opened.append(path.name)
        return self._handles[path]

    def read(self, name: str, rule: Rule, rank: int, world: int) -> torch.Tensor:
        """Rank `rank`'s piece of tensor `name` (all of it under `Replicate`): only the rows
        (or columns) the rule names are read."""
        info = self.ckpt.infos([name])[name]
        try:
            piece = _read_piece(self._file(info.file).get_slice(name), rule, rank, world)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{info.file}: tensor {name} could not be read ({e})") from None
        if self.stats is not None:
            self.stats.bytes_read += piece.numel() * FLOAT_DTYPES[info.dtype]
            self.stats.tensors_read += 1
        return piece


def _read_piece(sl, rule: Rule, rank: int, world: int) -> torch.Tensor:
    if isinstance(rule, Replicate):
        return sl[:]
    assert isinstance(rule, Split)
    parts = []
    for a, b in rule.ranges(rank, world):
        index = (slice(None),) * rule.dim + (slice(a, b),)
        parts.append(sl[index])
    return torch.cat(parts, dim=rule.dim) if len(parts) > 1 else parts[0]
