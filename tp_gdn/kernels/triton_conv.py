"""Triton causal depthwise conv1d + silu over packed prefill chunks, with l2norm and q scale fused.

`conv_prefill` reads q|k|v projection columns of each 64-token chunk, a few rows a program
(and, at a sequence's start, the K-1 carried inputs from its conv-state slot), writes silu(conv)
with q and k already l2-normalised (q also scaled by dk^-0.5), and `conv_state_update` then
stores each sequence's last K-1 inputs into its slot. Two launches, so no program can read a slot
another program has already overwritten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..batch import CHUNK      # the chunk length that Batch schedules prefill work in
from .triton_common import cdiv, launch, next_pow2, sequence_of

_CHUNK = tl.constexpr(CHUNK)
# launch settings (benchmarks/bench_kernels.py --sweep conv). "v_block": channels per program of
# the v part (q and k blocks are one head wide, for their l2norm); "rows": tokens per program, a
# divisor of CHUNK. H200, conv alone, back to back (benchmarks/results/exp_conv2_h200x2_s10.log):
# 16 rows and 2 warps took 0.415 ms at 8x4096 tokens, tp=1 (2.59 TB/s of q|k|v in and out),
# 0.058 at 1x4096, 0.109 at 8x4096 on a tp=4 rank; 32 rows and 4 warps within 1% of that; the
# setting before, 64 rows and 8 warps, 0.501 / 0.069 / 0.134. The same 32 values a thread with
# more warps a program were slower (32 rows, 8 warps: 0.650 ms). 128-channel v blocks beat 64 and
# 256 (exp_conv_h200_s10.log). Outputs bit-equal across settings.
LAUNCH = {"conv": dict(num_warps=2), "v_block": 128, "rows": 16}


@triton.jit
def _conv_block(proj, conv_w, conv_pool, out, t0, bos, eos, slot, from_state, c0, c_end, q_scale,
                stride_proj, stride_pool_s, stride_pool_w, stride_out,
                K: tl.constexpr, BW: tl.constexpr, BT: tl.constexpr, NORM: tl.constexpr):
    """silu(conv) of rows [t0, t0 + BT) ∩ [.., eos) and channels [c0, c_end) (at most BW of them);
    l2-normalised per row and multiplied by q_scale when NORM. Rows before t0 come from proj,
    or, when `from_state` (t0 is the sequence's first token and its slot holds state), from the
    slot's K-1 carried inputs. Offsets inside the tile are int32 from scalar int64 bases."""
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BW)
    m_d = c0 + o_d < c_end
    n_t = eos - t0                                  # rows of this tile inside the sequence
    m_t = o_t < n_t
    p_x = proj + t0 * stride_proj + c0
    acc = tl.zeros([BT, BW], dtype=tl.float32)
    for j in tl.static_range(K):
        r = o_t - (K - 1) + j                       # tap j reads row t0 + r
        m = m_t & (r >= bos - t0)                   # rows before the sequence: state or zeros
        x = tl.load(p_x + r[:, None] * stride_proj + o_d[None, :], mask=m[:, None] & m_d[None, :], other=0.0)
        w = tl.load(conv_w + (c0 + o_d) * K + j, mask=m_d, other=0.0).to(tl.float32)
        acc += x.to(tl.float32) * w[None, :]
    if from_state:
        p_s = conv_pool + slot * stride_pool_s + c0
        for j in tl.static_range(K - 1):
            m = m_t & (o_t + j < K - 1)             # rows whose tap j falls before the sequence
            s = tl.load(p_s + (o_t + j)[:, None] * stride_pool_w + o_d[None, :], mask=m[:, None] & m_d[None, :],
                        other=0.0)
            w = tl.load(conv_w + (c0 + o_d) * K + j, mask=m_d, other=0.0).to(tl.float32)
            acc += s.to(tl.float32) * w[None, :]
    y = acc * tl.sigmoid(acc)
    if NORM:
        y = y * (tl.rsqrt(tl.sum(y * y, axis=1) + 1e-6) * q_scale)[:, None]
    p_o = out + t0 * stride_out + c0
    tl.store(p_o + o_t[:, None] * stride_out + o_d[None, :], y.to(out.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])


@triton.jit
def _conv_prefill_kernel(
    proj, conv_w, conv_pool, out, chunks, cu_seqlens, slots, has_state,
    stride_proj, stride_pool_s, stride_pool_w, stride_out, scale,
    NK: tl.constexpr, DK: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BT: tl.constexpr,
):
    """Grid (chunk pieces, channel blocks); a piece is BT rows of one chunk. Block j < NK is q
    head j, NK <= j < 2NK is k head j - NK, the rest cover the v channels BDV at a time. A piece
    that does not start its sequence has no business with the conv state, so only first pieces
    of stateful sequences read it."""
    i_p, i_d = tl.program_id(0), tl.program_id(1)
    i_c = i_p // (_CHUNK // BT)
    i_n = tl.load(chunks + i_c * 2)
    t0 = tl.load(chunks + i_c * 2 + 1).to(tl.int64) + (i_p % (_CHUNK // BT)) * BT
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    from_state = (t0 == bos) & (tl.load(has_state + i_n) != 0)
    slot = tl.load(slots + i_n).to(tl.int64)
    if i_d < 2 * NK:
        q_scale = tl.where(i_d < NK, scale, 1.0)
        _conv_block(proj, conv_w, conv_pool, out, t0, bos, eos, slot, from_state, i_d * DK, i_d * DK + DK, q_scale,
                    stride_proj, stride_pool_s, stride_pool_w, stride_out, K, BD, BT, True)
    else:
        c0 = 2 * NK * DK + (i_d - 2 * NK) * BDV
        _conv_block(proj, conv_w, conv_pool, out, t0, bos, eos, slot, from_state, c0, C, 1.0,
                    stride_proj, stride_pool_s, stride_pool_w, stride_out, K, BDV, BT, False)


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
    """
    C, K = conv_weight_CK.shape
    if num_chunks == 0:
        return
    BDV, BT = LAUNCH["v_block"], LAUNCH["rows"]
    if CHUNK % BT:
        raise ValueError(f"LAUNCH['rows'] must divide the chunk length {CHUNK}, got {BT}")
    n_blocks = 2 * nk + cdiv(C - 2 * nk * dk, BDV)
    launch(_conv_prefill_kernel, (num_chunks * (CHUNK // BT), n_blocks),
        proj_TP, conv_weight_CK, conv_pool_SWC, out_TC, chunks_N2, cu_seqlens, slots, has_state,
        proj_TP.stride(0), conv_pool_SWC.stride(0), conv_pool_SWC.stride(1), out_TC.stride(0), dk ** -0.5,
        NK=nk, DK=dk, C=C, K=K, BD=next_pow2(dk), BDV=BDV, BT=BT,
        **LAUNCH["conv"],
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
