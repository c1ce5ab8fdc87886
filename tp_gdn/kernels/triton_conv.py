"""Triton causal depthwise conv1d + silu over packed prefill chunks, with l2norm and q scale fused.

`conv_prefill` walks down the rows of a piece of a 64-token chunk, a group of channels a program
(at a sequence's start, the K-1 rows before it come from its conv-state slot), and writes
silu(conv) with q and k already l2-normalised (q also scaled by dk^-0.5); `conv_state_update`
then stores each sequence's last K-1 inputs into its slot. Two launches, so no program can read a
slot another program has already overwritten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..batch import CHUNK      # the chunk length that Batch schedules prefill work in
from .triton_common import cdiv, exp_ftz, launch, next_pow2, sequence_of

_CHUNK = tl.constexpr(CHUNK)
# launch settings (benchmarks/bench_kernels.py --sweep conv). "rows": tokens per program, a divisor
# of CHUNK; "qk_heads": q/k heads per program (their l2norm needs whole heads); "v_groups":
# 128-channel groups of v per program; "ahead": input rows in flight while a row is computed (1 to
# 4). H200, conv alone, back to back, 8x4096 tokens at tp=1 (benchmarks/results/
# exp_conv_rows2_h200_s16.log): these settings took 0.339 ms (3.17 TB/s of q|k|v in and out)
# against 0.410 for the kernel before (a [16, 128] tile a program, loaded once per tap) and 0.288
# for a plain copy of the same tiles; 8 rows ahead 0.368 (167 registers), 32 rows a program 0.368,
# 1 warp with 2 heads or groups 0.350, the exact silu 0.360. In the layer, same process
# (compare_conv2_h200_s16.log): 0.347 against 0.427 ms at 8x4096, 0.048 against 0.055 at 1x4096.
# 4 warps over 8 heads or groups: 0.3575 against 0.3492 ms at 8x4096 and 0.0515 against 0.0482 at
# 1x4096 in the layer (compare_conv_w4_h200_s17.log); by kernel time alone, the sweep's other
# settings took 0.346-0.710 ms against 0.347 for these (conv_sweep2_h200_s17.log).
LAUNCH = {"conv": dict(num_warps=2), "rows": 16, "qk_heads": 4, "v_groups": 4, "ahead": 4}
MAX_TAPS = 4    # the walk keeps K - 1 = 3 earlier rows


@triton.jit
def _in_row(p_x, ch, m_c, t0, eos, i: tl.constexpr, stride_proj):
    """Input row t0 + i (i >= 0) as loaded: zeros past the sequence's end."""
    return tl.load(p_x + i * stride_proj + ch, mask=tl.where(t0 + i < eos, m_c, False), other=0.0)


@triton.jit
def _halo_row(p_x, p_s, ch, m_c, t0, bos, keep, i: tl.constexpr, stride_proj, stride_pool_w, K: tl.constexpr):
    """Input row t0 + i (i < 0) in fp32: from proj inside the sequence, before it from the slot's
    K-1 carried inputs when the sequence continues (keep), else zeros (also for rows older than
    the slot holds, which meet a zero weight when K < 4)."""
    a = tl.load(p_x + i * stride_proj + ch, mask=tl.where(t0 + i >= bos, m_c, False), other=0.0)
    from_slot = (t0 + i < bos) & (t0 + i >= bos - (K - 1)) & keep
    b = tl.load(p_s + i * stride_pool_w + ch, mask=tl.where(from_slot, m_c, False), other=0.0)
    return tl.where(t0 + i >= bos, a, b).to(tl.float32)


@triton.jit
def _tap(conv_w, ch, m_c, j: tl.constexpr, K: tl.constexpr):
    """fp32 weight of tap j (0 <= j < K) of each channel; zeros for j < 0 (no such tap)."""
    if j < 0:
        w = tl.zeros(ch.shape, dtype=tl.float32)
    else:
        w = tl.load(conv_w + ch * K + j, mask=m_c, other=0.0).to(tl.float32)
    return w


@triton.jit
def _conv_rows(proj, conv_w, conv_pool, out, t0, bos, eos, slot, keep, c0, c_end, q_scale,
               stride_proj, stride_pool_s, stride_pool_w, stride_out,
               K: tl.constexpr, NH: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
               NORM: tl.constexpr, FAST: tl.constexpr, AHEAD: tl.constexpr):
    """silu(conv) of rows [t0, t0 + BT) ∩ [.., eos) and the channels c0 + h DH + d (h < NH,
    d < DH, below c_end), as an [NH, BD] tile a row; each group h l2-normalised per row and
    multiplied by q_scale[h] when NORM. Each input row is loaded and converted once and kept for
    the next K-1 rows' taps. The rows AHEAD of the current one are loaded before its store: the
    compiler cannot tell proj from out, so it keeps every load after the stores above it, and a
    row loaded just before its use would leave one load in flight per warp. FAST (16-bit data):
    silu as x / (1 + e^-x) with one MUFU.EX2 and an approximate division."""
    tl.static_assert((K >= 2) & (K <= 4), "the conv walk holds 3 earlier rows")
    tl.static_assert((AHEAD >= 1) & (AHEAD <= 4) & (AHEAD <= BT))
    o_h = tl.arange(0, NH)
    o_d = tl.arange(0, BD)
    ch = c0 + o_h[:, None] * DH + o_d[None, :]
    m_c = (o_d[None, :] < DH) & (ch < c_end)
    w0 = _tap(conv_w, ch, m_c, K - 4, K)        # the weights of rows t - 3 .. t, zero before tap 0
    w1 = _tap(conv_w, ch, m_c, K - 3, K)
    w2 = _tap(conv_w, ch, m_c, K - 2, K)
    w3 = _tap(conv_w, ch, m_c, K - 1, K)
    p_x = proj + t0 * stride_proj
    p_s = conv_pool + slot * stride_pool_s + (t0 - bos + (K - 1)) * stride_pool_w   # row of token t0
    x3 = _halo_row(p_x, p_s, ch, m_c, t0, bos, keep, -3, stride_proj, stride_pool_w, K)
    x2 = _halo_row(p_x, p_s, ch, m_c, t0, bos, keep, -2, stride_proj, stride_pool_w, K)
    x1 = _halo_row(p_x, p_s, ch, m_c, t0, bos, keep, -1, stride_proj, stride_pool_w, K)
    n0 = _in_row(p_x, ch, m_c, t0, eos, 0, stride_proj)
    n1 = n0
    n2 = n0
    n3 = n0
    if AHEAD > 1:
        n1 = _in_row(p_x, ch, m_c, t0, eos, 1, stride_proj)
    if AHEAD > 2:
        n2 = _in_row(p_x, ch, m_c, t0, eos, 2, stride_proj)
    if AHEAD > 3:
        n3 = _in_row(p_x, ch, m_c, t0, eos, 3, stride_proj)
    for i in tl.static_range(BT):
        x0 = n0.to(tl.float32)
        n0, n1, n2 = n1, n2, n3
        if i + AHEAD < BT:
            nxt = _in_row(p_x, ch, m_c, t0, eos, i + AHEAD, stride_proj)
            if AHEAD == 1:
                n0 = nxt
            elif AHEAD == 2:
                n1 = nxt
            elif AHEAD == 3:
                n2 = nxt
            else:
                n3 = nxt
        acc = x3 * w0
        acc += x2 * w1
        acc += x1 * w2
        acc += x0 * w3
        if FAST:
            y = tl.fdiv(acc, 1.0 + exp_ftz(-acc, True), ieee_rounding=False)
        else:
            y = acc * tl.sigmoid(acc)
        if NORM:
            y = y * (tl.rsqrt(tl.sum(y * y, axis=1) + 1e-6) * q_scale)[:, None]
        tl.store(out + (t0 + i) * stride_out + ch, y.to(out.dtype.element_ty),
                 mask=tl.where(t0 + i < eos, m_c, False))
        x3, x2, x1 = x2, x1, x0


@triton.jit
def _conv_prefill_kernel(
    proj, conv_w, conv_pool, out, chunks, cu_seqlens, slots, has_state,
    stride_proj, stride_pool_s, stride_pool_w, stride_out, scale,
    NK: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, K: tl.constexpr, BD: tl.constexpr,
    NHQ: tl.constexpr, NHV: tl.constexpr, BT: tl.constexpr, FAST: tl.constexpr, AHEAD: tl.constexpr,
):
    """Grid (chunk pieces, channel blocks); a piece is BT rows of one chunk. Blocks below
    ceil(2 NK / NHQ) take NHQ heads of q|k each (q heads scaled); the rest take NHV 128-channel
    groups of v each. The rows before a piece are read whole, so a piece that starts past its
    sequence's end must not run: those rows may lie past the end of proj."""
    i_p, i_d = tl.program_id(0), tl.program_id(1)
    i_c = i_p // (_CHUNK // BT)
    i_n = tl.load(chunks + i_c * 2)
    t0 = tl.load(chunks + i_c * 2 + 1).to(tl.int64) + (i_p % (_CHUNK // BT)) * BT
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    keep = tl.load(has_state + i_n) != 0
    slot = tl.load(slots + i_n).to(tl.int64)
    n_qk: tl.constexpr = (2 * NK + NHQ - 1) // NHQ
    if t0 < eos:        # a piece past its sequence's end (a short last chunk) writes nothing and reads nothing
        if i_d < n_qk:
            q_scale = tl.where(i_d * NHQ + tl.arange(0, NHQ) < NK, scale, 1.0)
            _conv_rows(proj, conv_w, conv_pool, out, t0, bos, eos, slot, keep, i_d * (NHQ * DK), 2 * NK * DK,
                       q_scale, stride_proj, stride_pool_s, stride_pool_w, stride_out, K, NHQ, DK, BD, BT, True, FAST,
                       AHEAD)
        else:
            c0 = 2 * NK * DK + (i_d - n_qk) * (NHV * 128)
            _conv_rows(proj, conv_w, conv_pool, out, t0, bos, eos, slot, keep, c0, C, 1.0,
                       stride_proj, stride_pool_s, stride_pool_w, stride_out, K, NHV, 128, 128, BT, False, FAST, AHEAD)


@triton.jit
def _conv_state_update_kernel(
    proj, conv_pool, seqs, cu_seqlens, slots, has_state,
    stride_proj, stride_pool_s, stride_pool_w,
    C: tl.constexpr, W: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr,
):
    """Grid (sequences, channel blocks): slot <- the sequence's last W inputs (oldest first),
    taking older carried inputs from the slot itself when the sequence is shorter than W."""
    i_s, i_c = tl.program_id(0), tl.program_id(1)
    bos, eos, slot, keep = sequence_of(seqs, cu_seqlens, slots, has_state, i_s)
    o_w = tl.arange(0, BW)
    ch = i_c * BC + tl.arange(0, BC)
    m_c = ch < C
    src = eos - W + o_w
    m_w = o_w < W
    from_x = m_w & (src >= bos)
    x = tl.load(proj + src[:, None] * stride_proj + ch[None, :], mask=from_x[:, None] & m_c[None, :], other=0.0)
    old_pos = src - bos + W
    from_s = tl.where(keep, m_w & (src < bos), False)
    s = tl.load(conv_pool + slot * stride_pool_s + old_pos[:, None] * stride_pool_w + ch[None, :],
                mask=from_s[:, None] & m_c[None, :], other=0.0)
    new = tl.where(from_x[:, None], x, s)
    tl.debug_barrier()  # all lanes read the old rows before any lane overwrites them
    tl.store(conv_pool + slot * stride_pool_s + o_w[:, None] * stride_pool_w + ch[None, :],
             new.to(conv_pool.dtype.element_ty), mask=m_w[:, None] & m_c[None, :])


def conv_prefill(proj_TP: torch.Tensor, conv_weight_CK: torch.Tensor, conv_pool_SWC: torch.Tensor,
                 out_TC: torch.Tensor, chunks_N2: torch.Tensor, num_chunks: int, cu_seqlens: torch.Tensor,
                 slots: torch.Tensor, has_state: torch.Tensor, nk: int, dk: int) -> None:
    """out[t, :C] = silu(conv(proj[:, :C])) for the tokens of `chunks`, q/k l2-normalised, q scaled.

    proj_TP: [T, P] (q|k|v in the first C = 2 nk dk + vd columns); conv_weight_CK: [C, K];
    conv_pool_SWC: [S, K-1, C]; out_TC: [T, C]; chunks_N2: [num_chunks, 2] (sequence, first token).
    K from 2 to 4 (the walk keeps 3 earlier rows); other lengths raise ValueError. 16-bit data
    takes an approximate silu (MUFU exp and division, each a few ulp of fp32 off), fp32 the exact one.
    """
    C, K = conv_weight_CK.shape
    if num_chunks == 0:
        return
    if not 2 <= K <= MAX_TAPS:
        raise ValueError(f"conv_prefill takes conv kernels of 2 to {MAX_TAPS} taps (Qwen3-Next and Qwen3.5 have 4), "
                         f"got {K}")
    BT = LAUNCH["rows"]
    if CHUNK % BT:
        raise ValueError(f"LAUNCH['rows'] must divide the chunk length {CHUNK}, got {BT}")
    for key in ("qk_heads", "v_groups"):
        if LAUNCH[key] < 1 or LAUNCH[key] & (LAUNCH[key] - 1):
            raise ValueError(f"LAUNCH[{key!r}] must be a power of two, got {LAUNCH[key]}")
    if not 1 <= LAUNCH["ahead"] <= 4:
        raise ValueError(f"LAUNCH['ahead'] must be 1 to 4 rows, got {LAUNCH['ahead']}")
    BD = next_pow2(dk)
    NHQ = min(LAUNCH["qk_heads"], next_pow2(2 * nk))
    NHV = LAUNCH["v_groups"]
    n_blocks = cdiv(2 * nk, NHQ) + cdiv(C - 2 * nk * dk, 128 * NHV)
    launch(_conv_prefill_kernel, (num_chunks * (CHUNK // BT), n_blocks),
        proj_TP, conv_weight_CK, conv_pool_SWC, out_TC, chunks_N2, cu_seqlens, slots, has_state,
        proj_TP.stride(0), conv_pool_SWC.stride(0), conv_pool_SWC.stride(1), out_TC.stride(0), dk ** -0.5,
        NK=nk, DK=dk, C=C, K=K, BD=BD, NHQ=NHQ, NHV=NHV, BT=BT, FAST=proj_TP.element_size() == 2,
        AHEAD=min(LAUNCH["ahead"], BT), **LAUNCH["conv"],
    )


def conv_state_update(proj_TP: torch.Tensor, conv_pool_SWC: torch.Tensor, seqs: torch.Tensor, num_seqs: int,
                      cu_seqlens: torch.Tensor, slots: torch.Tensor, has_state: torch.Tensor) -> None:
    """conv_pool[slot of s] <- last K-1 q|k|v inputs of each sequence s in `seqs` (run after
    `conv_prefill`, which reads the old contents)."""
    _, W, C = conv_pool_SWC.shape
    if num_seqs == 0:
        return
    BC = min(256, next_pow2(C))
    launch(_conv_state_update_kernel, (num_seqs, cdiv(C, BC)),
        proj_TP, conv_pool_SWC, seqs, cu_seqlens, slots, has_state,
        proj_TP.stride(0), conv_pool_SWC.stride(0), conv_pool_SWC.stride(1),
        C=C, W=W, BW=next_pow2(W), BC=BC,
    )
