"""Triton helpers that kernels of several modules inline."""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:
    from triton import knobs
    _INTERPRETED = knobs.runtime.interpret
except ImportError:         # Triton before 3.4 reads the variable itself
    _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# whether kernels are compiled (and may run inline PTX) or interpreted (TRITON_INTERPRET=1), decided
# as triton.jit decides it, when this module is imported
_COMPILED = tl.constexpr(not _INTERPRETED)


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


@triton.jit
def exp_ftz(x, FTZ: tl.constexpr):
    """exp(x) of an fp32 tensor. FTZ (compiled kernels only): one ex2.approx.ftz.f32 (a MUFU.EX2) of
    x log2(e), results below 2^-126 flushed to 0; tl.exp lowers to ex2.approx.f32 without ftz,
    which ptxas wraps in a fix-up for subnormal results (a compare, two multiplies and a select
    around each MUFU). Callers set FTZ for 16-bit inputs only: with fp32 inputs (exact fp32
    products on FMAs) the inline PTX made Triton 3.6 compile the split path's kernels for sm_90a
    in 785 s against 119 s. The interpreter runs no PTX and always takes tl.exp."""
    if FTZ and _COMPILED:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)
