"""Bounds checks for kernels that run in Triton's interpreter (the CPU tests).

A compiled kernel that reads past a buffer may read memory that happens to be mapped and go
unnoticed, or fault only when another allocation lies elsewhere (the sixteenth session's conv
read the rows before a piece that started past its sequence's end: on the GPU that faulted only
after other tests had run; benchmarks/RESULTS.md). The interpreter does not check addresses at
all. `install()` makes it: every load and store that a mask lets through must fall inside the
storage of one of the launch's tensor arguments, or the launch fails with the kernel's name, the
address and the nearest argument. Storage rather than the tensor's own elements, since kernels
take views of larger buffers (a column block of the projection) and may read the rest of them.
Buffers a kernel reaches through a table of addresses are allowed with `also_allow`. Atomics
(the all-reduce's flags) go through other interpreter calls and are not checked.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

_LAUNCHES: list[tuple[str, list[tuple[int, int]]]] = []   # (kernel name, [(first byte, end byte)]) per launch
_ALSO: list[tuple[int, int]] = []                          # buffers reached through pointer tables (also_allow)
INSTALLED: list[str] = []                                  # what install() did, or why it could not


@contextlib.contextmanager
def also_allow(tensors):
    """Within the block, kernels may also touch these tensors' storage: buffers that a kernel
    reaches through addresses held in a table (the push all-reduce's peer buffers) rather than
    as arguments."""
    extra: list = []
    _storage_ranges(list(tensors), extra)
    _ALSO.extend(extra)
    try:
        yield
    finally:
        del _ALSO[len(_ALSO) - len(extra):]


def _storage_ranges(obj, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        out.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _storage_ranges(o, out)


def _check(ptrs, mask, what: str) -> None:
    if not _LAUNCHES:
        return
    name, ranges = _LAUNCHES[-1]
    addr = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
    addr = addr.ravel()
    if addr.size == 0:
        return
    size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    ok = np.zeros(addr.shape, dtype=bool)
    for lo, hi in ranges + _ALSO:
        ok |= (addr >= lo) & (addr + size <= hi)
    if not ok.all():
        bad = int(addr[~ok][0])
        near = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])), default=None)
        where = "no tensor arguments" if near is None else (
            f"nearest argument storage [{near[0]:#x}, {near[1]:#x}), "
            + (f"{bad - near[1]} bytes past its end" if bad >= near[1] else f"{near[0] - bad} bytes before it"))
        raise AssertionError(f"{name}: {int((~ok).sum())} {what}s of {size} bytes outside every tensor argument, "
                             f"first at {bad:#x} ({where})")


def install() -> bool:
    """Patch the interpreter (once); False, with the reason in INSTALLED, where its internals differ."""
    if INSTALLED:
        return INSTALLED[0] == "installed"
    try:
        from triton.runtime import interpreter as interp
        executor, builder = interp.GridExecutor, interp.InterpreterBuilder
        call, load, store = executor.__call__, builder.create_masked_load, builder.create_masked_store
    except (ImportError, AttributeError) as e:
        INSTALLED.append(f"not installed: this Triton's interpreter differs ({type(e).__name__}: {e})")
        return False

    def checked_call(self, *args, **kwargs):
        ranges: list = []
        _storage_ranges(args, ranges)
        _storage_ranges(tuple(kwargs.values()), ranges)
        _LAUNCHES.append((getattr(self.fn, "__name__", "kernel"), ranges))
        try:
            return call(self, *args, **kwargs)
        finally:
            _LAUNCHES.pop()

    def checked_load(self, ptrs, mask, other, *rest, **kw):
        _check(ptrs, mask, "read")
        return load(self, ptrs, mask, other, *rest, **kw)

    def checked_store(self, ptrs, value, mask, *rest, **kw):
        _check(ptrs, mask, "write")
        return store(self, ptrs, value, mask, *rest, **kw)

    executor.__call__, builder.create_masked_load, builder.create_masked_store = \
        checked_call, checked_load, checked_store
    INSTALLED.append("installed")
    return True
