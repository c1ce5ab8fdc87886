"""Triton single-token decode: conv update, silu, l2norm, gating and one recurrent step, fused.

Grid (decode sequences, value heads, dv blocks). Each program convolves its key head's q and k
channels (from the slot's conv state and the new input), normalises them, convolves its own v
channels and updates their conv state, computes g and beta, and updates its [dk, BV] block of
the slot's recurrent state in place. q/k channels are read by every value head and dv block of
their key head, so their conv state is shifted by a later launch once all have read it: its own
(`_shift_qk_state_kernel`), or extra programs of the gated norm's launch, which follows the
decode kernel in a layer call (triton_norm.gated_rmsnorm's `qk_shift`). No host synchronisation;
every launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import cdiv, launch, next_pow2, pdl_launch, wait_for_prior_grid

# Launch settings (benchmarks/bench_kernels.py --sweep measures the alternatives).
LAUNCH = {"decode": dict(num_warps=4, num_stages=1)}
# programmatic dependent launch of the decode kernel where its caller says the launch ahead of it
# is the projection's product (decode_step's after_gemm): the kernel may then start while it
# finishes, loading the state blocks before it waits for the projection (wait_for_prior_grid). On
# an H200, the layer's graphed decode step at 80B dims, 256 sequences: 325.2 against 328.0 us
# single, 319.6 against 322.4 back to back (5 interleaved rounds each, in two runs alike); one
# sequence: no change; outputs and states bit-equal (benchmarks/results/exp_pdl*_h200_s25.log)
PDL = True
# a call whose sequences are all single tokens indexes sequence i as token row i, without the
# index loads a mixed call needs (benchmarks/bench_layer.py measures both settings)
ALL_DECODE_INDEXING = True


@triton.jit
def _conv_token(proj, conv_pool, conv_w, t, slot, keep, ch, m, stride_ps, stride_pw, K: tl.constexpr):
    """silu(conv) of one token over channels `ch`, taps 0..K-2 from the conv state."""
    acc = tl.load(proj + t + ch, mask=m, other=0.0).to(tl.float32) * tl.load(conv_w + ch * K + K - 1, mask=m, other=0.0).to(tl.float32)
    for j in tl.static_range(K - 1):
        x = tl.load(conv_pool + slot * stride_ps + j * stride_pw + ch, mask=tl.where(keep, m, False), other=0.0).to(tl.float32)
        acc += x * tl.load(conv_w + ch * K + j, mask=m, other=0.0).to(tl.float32)
    return acc * tl.sigmoid(acc)


@triton.jit
def _decode_kernel(
    proj, conv_w, conv_pool, A_log, dt_bias, state_pool, out, seqs, cu_seqlens, slots, has_state,
    stride_proj, stride_ps, stride_pw, stride_ss, stride_sh, stride_out, b_col0, a_col0, scale,
    R, NK, DK: tl.constexpr, DV: tl.constexpr, K: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr, USE_CONV: tl.constexpr, ALL_DECODE: tl.constexpr,
    GDC: tl.constexpr = False,
):
    i_s, h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if ALL_DECODE:
        # every sequence of the call is one token: sequence i_s is token row i_s, and the state
        # load waits on one index load (the slot), not three in a chain
        i_n = i_s.to(tl.int64)
        row = i_n
    else:
        i_n = tl.load(seqs + i_s).to(tl.int64)
        row = tl.load(cu_seqlens + i_n).to(tl.int64)
    t = row * stride_proj
    slot = tl.load(slots + i_n).to(tl.int64)
    keep = tl.load(has_state + i_n) != 0
    hk = h // R
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    ch_v = 2 * NK * DK + h * DV + o_v
    # the state block is the bulk of the bytes: its load goes out first, so that its latency
    # overlaps the conv, norm and gating work below. evict_last keeps its lines in L2 until the
    # store below rewrites them: on an H200 the decode-256 step took 332.0 against 336.7 us
    # (evict_first 349.6, .cg/.cs 342.3), bit-equal (benchmarks/results/exp_decode_hints_h200x2_s8.log)
    p_s = state_pool + slot * stride_ss + h * stride_sh + o_k[:, None] * DV + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    S = tl.load(p_s, mask=tl.where(keep, m_s, False), other=0.0, eviction_policy="evict_last")
    if USE_CONV:
        # v: this program alone owns these channels; it reads their conv state now and writes
        # the shifted state after the barrier below (replicated lanes must all read first)
        o_w = tl.arange(0, BW)
        m_w = (o_w < K - 1)[:, None] & m_v[None, :]
        p_conv = conv_pool + slot * stride_ps + o_w[:, None] * stride_pw + ch_v[None, :]
        hist = tl.load(p_conv, mask=tl.where(keep, m_w, False), other=0.0)
        taps = tl.load(conv_w + ch_v[None, :] * K + o_w[:, None], mask=m_w, other=0.0).to(tl.float32)
        m_next = (o_w + 1 < K - 1)[:, None] & m_v[None, :]
        shifted = tl.load(p_conv + stride_pw, mask=tl.where(keep, m_next, False), other=0.0)
    A = tl.load(A_log + h).to(tl.float32)
    dtb = tl.load(dt_bias + h).to(tl.float32)
    # GDC (the launch may start while the projection's product still runs): only the state, the
    # v channels' conv history, the slot indices and the weights are read above, none of which
    # that product writes; the projection is read below
    wait_for_prior_grid(GDC)
    if USE_CONV:
        q = _conv_token(proj, conv_pool, conv_w, t, slot, keep, hk * DK + o_k, m_k, stride_ps, stride_pw, K)
        k = _conv_token(proj, conv_pool, conv_w, t, slot, keep, (NK + hk) * DK + o_k, m_k, stride_ps, stride_pw, K)
        x_new = tl.load(proj + t + ch_v, mask=m_v, other=0.0)
        acc = tl.sum(hist.to(tl.float32) * taps, 0)
        acc += x_new.to(tl.float32) * tl.load(conv_w + ch_v * K + K - 1, mask=m_v, other=0.0).to(tl.float32)
        new_hist = tl.where((o_w == K - 2)[:, None], x_new[None, :].to(shifted.dtype), shifted)
        v = acc * tl.sigmoid(acc)
    else:
        q = tl.load(proj + t + hk * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
        k = tl.load(proj + t + (NK + hk) * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
        v = tl.load(proj + t + ch_v, mask=m_v, other=0.0).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale
    k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)

    a = tl.load(proj + t + a_col0 + h).to(tl.float32) + dtb
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))
    decay = tl.exp(-tl.exp(A) * softplus)
    beta = tl.sigmoid(tl.load(proj + t + b_col0 + h).to(tl.float32))

    # both reductions over dk read the old state, so they run side by side:
    # u = beta (v - decay S^T k), o = S_new^T q = decay S^T q + (k . q) u
    S = S.to(tl.float32)
    u = beta * (v - decay * tl.sum(S * k[:, None], 0))
    o = decay * tl.sum(S * q[:, None], 0) + tl.sum(k * q, 0) * u
    S = S * decay + k[:, None] * u[None, :]
    # every lane has read the old state (and conv history) before any lane overwrites it
    tl.debug_barrier()
    if USE_CONV:
        tl.store(p_conv, new_hist.to(conv_pool.dtype.element_ty), mask=m_w)
    tl.store(p_s, S.to(state_pool.dtype.element_ty), mask=m_s)
    tl.store(out + row * stride_out + h * DV + o_v, o.to(out.dtype.element_ty), mask=m_v)


@triton.jit
def shift_qk_read(proj, conv_pool, seqs, cu_seqlens, slots, has_state, stride_proj, stride_ps, stride_pw, i_s, i_c,
                  active, NQK: tl.constexpr, W: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """The reads of shift_qk_block (nothing where `active` is false): (the W new rows of the
    block, where they go, which of them to write). Its caller writes them once every lane of the
    program has read (tl.debug_barrier), so it may do other work in between."""
    i_n = tl.load(seqs + i_s, mask=active, other=0).to(tl.int64)
    t = tl.load(cu_seqlens + i_n, mask=active, other=0).to(tl.int64)
    slot = tl.load(slots + i_n, mask=active, other=0).to(tl.int64)
    keep = tl.load(has_state + i_n, mask=active, other=0) != 0
    ch = i_c * BC + tl.arange(0, BC)
    m_c = ch < tl.where(active, NQK, 0)
    o_w = tl.arange(0, BW)
    m_old = (o_w < W - 1)[:, None] & m_c[None, :]
    old = tl.load(conv_pool + slot * stride_ps + (o_w + 1)[:, None] * stride_pw + ch[None, :], mask=tl.where(keep, m_old, False), other=0.0)
    new = tl.load(proj + t * stride_proj + ch, mask=m_c, other=0.0)
    rows = tl.where((o_w == W - 1)[:, None], new[None, :].to(old.dtype), old)
    return rows, conv_pool + slot * stride_ps + o_w[:, None] * stride_pw + ch[None, :], (o_w < W)[:, None] & m_c[None, :]


@triton.jit
def shift_qk_block(proj, conv_pool, seqs, cu_seqlens, slots, has_state, stride_proj, stride_ps, stride_pw, i_s, i_c,
                   NQK: tl.constexpr, W: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """conv state of q|k channels [i_c BC, (i_c + 1) BC) of decode sequence seqs[i_s] <- (old rows
    1..W-1, new input): one token appended."""
    rows, p_rows, m_rows = shift_qk_read(proj, conv_pool, seqs, cu_seqlens, slots, has_state, stride_proj,
                                         stride_ps, stride_pw, i_s, i_c, True, NQK, W, BW, BC)
    tl.debug_barrier()  # all lanes read before any lane writes the same rows
    tl.store(p_rows, rows, mask=m_rows)


@triton.jit
def _shift_qk_state_kernel(proj, conv_pool, seqs, cu_seqlens, slots, has_state, stride_proj, stride_ps, stride_pw,
                           NQK: tl.constexpr, W: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """Grid (decode sequences, q|k channel blocks): shift_qk_block for each."""
    shift_qk_block(proj, conv_pool, seqs, cu_seqlens, slots, has_state, stride_proj, stride_ps, stride_pw,
                   tl.program_id(0), tl.program_id(1), NQK, W, BW, BC)


def qk_shift_launch(proj_TP, conv_pool_SWC, meta, nqk: int) -> dict:
    """Arguments of shift_qk_block for the decode sequences of `meta`: `args` (tensors and
    strides, in its order), `meta` (its constexprs) and `blocks` (channel blocks per sequence)."""
    W = conv_pool_SWC.shape[1]
    # 1024 channels a program: on an H200, decode 256 at 80B dims, the norm launch with the shift
    # took 3.98-4.31 us against 5.03-5.56 with 256, at 4 or 8 tokens and 2 or 4 warps per norm
    # program (benchmarks/results/exp_norm_shift_h200x2_s9.log)
    BC = min(1024, next_pow2(nqk))
    args = (proj_TP, conv_pool_SWC, meta.decode_seqs, meta.cu_seqlens, meta.slots, meta.has_state,
            proj_TP.stride(0), conv_pool_SWC.stride(0), conv_pool_SWC.stride(1))
    return dict(args=args, meta=dict(NQK=nqk, W=W, BW=next_pow2(W), BC=BC),
                blocks=cdiv(nqk, BC))


def decode_step(proj_TP, conv_weight_CK, conv_pool_SWC, A_log, dt_bias, state_pool, out, meta,
                nk: int, nv: int, dk: int, dv: int, BV: int | None = None, use_conv: bool = True,
                b_col0: int | None = None, shift_qk: bool = True, after_gemm: bool = False) -> None:
    """One recurrent step for each single-token sequence of `meta` (fused conv update, l2norm,
    gating), writing o [value head h at columns h dv of `out`] and updating both pools in place.

    proj_TP: [T, P] fused projection [q | k | v | z | b | a] of the local heads; `b_col0` moves
    the b|a columns (default 2kd + 2vd, right after z);
    conv_weight_CK: [2kd+vd, K]; conv_pool_SWC: [S, K-1, 2kd+vd]; state_pool: [S, nv, dk, dv] fp32.
    use_conv=False reads q|k|v as already convolved (the pure recurrence, for comparisons with
    other recurrent kernels) and leaves the conv pool alone. shift_qk=False leaves the q|k
    channels' conv state unshifted: the caller's next launch must shift it (qk_shift_launch).
    after_gemm: the launch just ahead of this one in the stream is the one that wrote proj_TP and
    writes nothing else this step reads (the layer's in_proj product: a cuBLAS GEMM, or
    triton_gemv's kernel at one token); with PDL, on a GPU that has it,
    the kernel is then launched to start before that launch ends.
    """
    if meta.num_decode == 0:
        return
    C, K = conv_weight_CK.shape
    assert state_pool.is_contiguous() and conv_pool_SWC.stride(2) == 1 and proj_TP.stride(1) == 1
    BK = next_pow2(dk)
    BVf = next_pow2(dv)
    if BV is None:
        BV = min(BVf, 64 if meta.num_decode * nv >= 1024 else 32)
    kd, vd = nk * dk, nv * dv
    if b_col0 is None:
        b_col0 = 2 * kd + 2 * vd
    launch(_decode_kernel, (meta.num_decode, nv, cdiv(dv, BV)),
        proj_TP, conv_weight_CK, conv_pool_SWC, A_log, dt_bias, state_pool, out,
        meta.decode_seqs, meta.cu_seqlens, meta.slots, meta.has_state,
        proj_TP.stride(0), conv_pool_SWC.stride(0), conv_pool_SWC.stride(1),
        state_pool.stride(0), state_pool.stride(1), out.stride(0),
        b_col0, b_col0 + nv, dk ** -0.5,
        R=nv // nk, NK=nk, DK=dk, DV=dv, K=K, BK=BK, BV=BV, BW=next_pow2(K - 1), USE_CONV=use_conv,
        ALL_DECODE=ALL_DECODE_INDEXING and meta.num_decode == meta.slots.numel(),
        **LAUNCH["decode"], **pdl_launch(after_gemm and PDL, proj_TP.device),
    )
    if not (use_conv and shift_qk):
        return
    shift = qk_shift_launch(proj_TP, conv_pool_SWC, meta, 2 * kd)
    launch(_shift_qk_state_kernel, (meta.num_decode, shift["blocks"]), *shift["args"], **shift["meta"])
