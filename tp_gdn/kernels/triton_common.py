"""Triton helpers that kernels of several modules inline."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sequence_of(seqs, cu_seqlens, slots, has_state, i_s):
    """Sequence n = seqs[i_s] of a launch: its tokens [bos, eos) of the packed batch, its state
    slot, and whether it continues from that slot (keep; else it starts from zero state)."""
    i_n = tl.load(seqs + i_s).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    slot = tl.load(slots + i_n).to(tl.int64)
    keep = tl.load(has_state + i_n) != 0
    return bos, eos, slot, keep
