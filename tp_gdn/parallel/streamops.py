"""CUDA stream memory operations: a stream waits until a 32-bit word in device memory holds a
value, or writes one, without a kernel (so without an SM, beside kernels that fill every SM);
and a plain asynchronous copy between two device addresses (a copy engine's), queued with less
host work than a tensor's copy_.
The word may also be in pinned host memory, which the GPU reaches by the same address (the
watchdog's counts, parallel/watchdog.py).
The driver API's cuStreamWaitValue32 and cuStreamWriteValue32 (the _v2 entry points of CUDA 12
drivers) and cuMemcpyAsync, called through ctypes; torch exposes no wait. A write is preceded by
a memory fence (the driver's default), so a peer that sees the word also sees what the stream
wrote before it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

_WAIT_EQ = 0x1        # CU_STREAM_WAIT_VALUE_EQ
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: fenced
_NAMES = ("cuStreamWaitValue32_v2", "cuStreamWriteValue32_v2", "cuMemcpyAsync")
_lib: ctypes.CDLL | None = None
_why: str | None = None
_loaded = False


def _load() -> None:
    global _lib, _why, _loaded
    if _loaded:
        return
    _loaded = True
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        _why = f"the CUDA driver library ({name}) does not load: {e}"
        return
    for fn in _NAMES:
        if not hasattr(lib, fn):
            _why = f"the CUDA driver has no {fn} (a CUDA 12 driver has it)"
            return
        f = getattr(lib, fn)
        if fn == "cuMemcpyAsync":    # (dst, src, bytes, stream)
            f.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        else:                        # (stream, address, value, flags)
            f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        f.restype = ctypes.c_int
    _lib = lib


def why_unavailable() -> str | None:
    """Why stream memory operations cannot be used here (None: they can)."""
    _load()
    return _why


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {result}")


def _driver() -> ctypes.CDLL:
    _load()
    if _lib is None:
        raise RuntimeError(f"stream memory operations are unavailable: {_why}")
    return _lib


def wait_equal(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """Work queued on `stream` after this starts once the uint32 at device `address` equals
    `value` (mod 2^32)."""
    _check(_driver().cuStreamWaitValue32_v2(stream.cuda_stream, address, value & 0xFFFFFFFF, _WAIT_EQ),
           "cuStreamWaitValue32")


def write(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """Write `value` (mod 2^32) to the uint32 at `address` (device or pinned host memory) once the
    work queued on `stream` before it is done, after a memory fence."""
    _check(_driver().cuStreamWriteValue32_v2(stream.cuda_stream, address, value & 0xFFFFFFFF, _WRITE_DEFAULT),
           "cuStreamWriteValue32")


def copy(stream: torch.cuda.Stream, dst: int, src: int, nbytes: int) -> None:
    """Copy `nbytes` from device address `src` to `dst` (either may be a peer's memory mapped
    here) once the work queued on `stream` before it is done."""
    if nbytes:
        _check(_driver().cuMemcpyAsync(dst, src, nbytes, stream.cuda_stream), "cuMemcpyAsync")
