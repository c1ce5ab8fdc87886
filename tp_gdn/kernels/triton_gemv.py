"""Triton products of a few rows with a weight matrix, y = x W^T, for decode steps of few tokens
(the layer uses it up to MAX_ROWS rows).

At one to a few rows a projection is a pass over its weight, bound by memory bandwidth. Grid: one
program per BN rows of W, each streaming its [BN, K] block in [BN, BK] pieces and forming the
[M, BN] outputs in fp32 (each row of x against the piece held in registers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_allreduce import WORD_BYTES, epoch_of, push_words
from .triton_common import cdiv, launch, next_pow2, pdl_launch, wait_for_prior_grid
from .triton_decode import qk_shift_launch, shift_qk_read

# the most rows gemv takes (its kernel unrolls a loop over them)
ROWS = 4
# the most rows the layer forms with it; more take cuBLAS. On an H200 (CUDA graphs, each call
# reading HBM) it beat cuBLAS at one row only: in_proj [6176, 2048] 8.58 against 9.80 us at one
# row, 12.16 against 9.96 at two, 18.57 against 10.12 at four; out_proj [2048, 2048] 4.94
# against 6.23, 6.22 against 6.35, 8.65 against 6.16 (benchmarks/results/exp_gemv_rows_h200_s25.log)
MAX_ROWS = 1
# On an H200, one row, each call reading its weight from HBM (CUDA graphs of 40 calls over 8
# weight copies), BN 8, BK 1024, 8 warps, 2 stages was the best or within 0.15 us of the best of
# 66 settings at each of the layer's four decode shapes at tp 1 and 2, in us against cuBLAS:
# in_proj [6176, 2048] 8.51 / 9.64, out_proj [2048, 2048] 4.92 / 6.25, in_proj [12352, 2048]
# 14.42 / 15.99, out_proj [2048, 4096] 7.74 / 9.66 (benchmarks/results/exp_gemv_graph_h200x2_s25.log)
# gemv(norm=...) reads its row of o and z and forms the norm while a program's piece of W, read in
# one go (one stage), is on its way: [BN, BK] pieces of up to TILE elements, BK the row's length
# rounded up to a power of two, up to BK, and BN = TILE / BK, up to BN. On an H200 (bench_products.py:
# each call reading W from HBM, the norm's conv-state shift included), us: [2048, 2048] 4.85 (one
# piece of 2048 at BN 8) against 5.38 for the norm kernel then the plain product (4.14 alone);
# [2048, 4096] 7.31 (one piece of 4096 at BN 4) against 8.14; BN 8 over 4096 in one piece took 10.22,
# pieces of 1024 in 2 stages 4.92 and 8.20 (benchmarks/results/products_h200x2_s45f.log)
LAUNCH = {"gemv": dict(BN=8, BK=1024, num_warps=8, num_stages=2),
          "gemv_norm": dict(BN=8, BK=4096, TILE=16384, num_warps=8, num_stages=1)}
# programmatic dependent launch of gemv(pdl=True)
PDL = True
# few_rows_product's pushing form (gemv(push=...)): the product's programs push their outputs as the
# flag-in-word all-reduce's words (off: the all-reduce pushes them, after the product). H200 x2,
# decode 1 at tp=2: 25.68 / 18.17 us single / back to back against 25.94 / 18.92 off, bit-equal
# (benchmarks/results/decode_ab_h200x2_s44i_b1.log)
PUSH_WORDS = True
# few_rows_product's gated norm (gemv(norm=...)): where the layer's out_proj product forms the gated
# RMSNorm of the mixer's output as it reads it, and shifts the decode sequences' q|k conv state (the
# norm launch's other work), a decode step of one token runs one launch fewer (off: the norm kernel,
# then the product). H200 x2, graphed decode step of one sequence, single / back to back, us, on
# against off: tp=2 22.83 / 17.16 against 23.38 / 17.66 and 24.74 / 18.17 against 26.10 / 18.64; tp=1
# 30.78 / 26.25 against 31.12 / 26.88 and 33.38 / 26.52 against 34.13 / 27.05 (two hosts;
# benchmarks/results/decode_ab_h200x2_s45[fd]_tp*_b1.log)
NORM_IN_PRODUCT = True


@triton.jit
def _gated_norm_piece(xr, z_ptrs, mask, nw, eps, x, BK: tl.constexpr, DV: tl.constexpr):
    """The gated RMSNorm of BK values of a row of o (whole heads of DV values), z read at z_ptrs:
    w o rsqrt(mean(o^2) + eps) silu(z) per head, in fp32 as triton_norm's kernel forms it and
    rounded to x's dtype as that kernel's output is, so the product reads the same values."""
    g = tl.reshape(tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32), [BK // DV, DV])
    o = tl.reshape(xr, [BK // DV, DV])
    wt = tl.load(nw + tl.arange(0, DV)).to(tl.float32)
    r = tl.rsqrt(tl.sum(o * o, axis=1) / DV + eps)
    y = o * r[:, None] * wt[None, :] * g * tl.sigmoid(g)
    return tl.reshape(y.to(x.dtype.element_ty).to(tl.float32), [BK])


@triton.jit
def _gemv_kernel(x, w, y, M, N, K, stride_xm, stride_wn, stride_ym, words_ptrs, epochs, rank, slot_words,
                 z, nw, eps, proj, conv_pool, seqs, cu_seqlens, slots, has_state, stride_proj,
                 stride_ps, stride_pw, n_shift,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GDC: tl.constexpr,
                 PUSH: tl.constexpr = False, WORLD: tl.constexpr = 1, PACK: tl.constexpr = 1,
                 AR_BLOCK: tl.constexpr = 1, NORM: tl.constexpr = False, DV: tl.constexpr = 1,
                 NQK: tl.constexpr = 1, W: tl.constexpr = 1, BW: tl.constexpr = 1, BC: tl.constexpr = 1,
                 NCB: tl.constexpr = 1):
    """NORM: x holds one row of the mixer's o, and its gated norm (z, weight nw) is formed piece by
    piece as it is read (_gated_norm_piece); programs 0..n_shift-1 also each shift one (decode
    sequence, q|k channel block) of the conv state, as the norm kernel's launch would
    (triton_decode.shift_qk_block, with the sequences' and channels' arguments as there): they read
    before the product and write after it, so the reads' latency hides behind the weight's."""
    wait_for_prior_grid(GDC)
    pid = tl.program_id(0)
    if NORM:
        # the launch ahead (the decode kernel, which reads the unshifted state) has ended
        # (wait_for_prior_grid, or stream order)
        rows, p_rows, m_rows = shift_qk_read(proj, conv_pool, seqs, cu_seqlens, slots, has_state, stride_proj,
                                             stride_ps, stride_pw, pid // NCB, pid % NCB, pid < n_shift, NQK, W,
                                             BW, BC)
    rn = (pid * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = rn < N
    rm = tl.arange(0, BM)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        m_k = rk < K
        wt = tl.load(w + rn[:, None] * stride_wn + rk[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        if NORM:
            # one row (BM 1): its o and z are read and normed while the weight is on its way
            xr = tl.load(x + rk, mask=m_k, other=0.0).to(tl.float32)
            xr = _gated_norm_piece(xr, z + rk, m_k, nw, eps, x, BK, DV)
            acc += tl.sum(wt.to(tl.float32) * xr[None, :], axis=1)[None, :]
        else:
            wt = wt.to(tl.float32)
            for m in tl.static_range(BM):
                xr = tl.load(x + m * stride_xm + rk, mask=m_k & (rk * 0 + m < M), other=0.0).to(tl.float32)
                part = tl.sum(wt * xr[None, :], axis=1)
                acc += tl.where((rm == m)[:, None], part[None, :], 0.0)
    tl.store(y + rm[:, None] * stride_ym + rn[None, :], acc.to(y.dtype.element_ty),
             mask=(rm < M)[:, None] & m_n[None, :])
    if PUSH:
        # one row (BM 1): these BN outputs, as they were stored, go to every peer as the words of
        # the flag-in-word all-reduce's program that covers them (AR_BLOCK outputs a program),
        # under its epoch for this call; its launch after this one then only waits and sums
        epoch, parity, tag = epoch_of(epochs, pid * BN // AR_BLOCK)
        words = pid * (BN // PACK) + tl.arange(0, BN // PACK)
        push_words(tl.reshape(acc.to(y.dtype.element_ty), [BN]), tag, parity, words, words * PACK < N, words_ptrs,
                   rank, slot_words, WORLD, BN // PACK, PACK)
    if NORM:
        tl.debug_barrier()      # every lane has read the rows it shifts before any lane writes them
        tl.store(p_rows, rows, mask=m_rows)


def norm_fits(K: int, dv: int) -> bool:
    """Whether gemv forms the gated norm of a row of K values, heads of dv (its `norm`): whole
    heads in each [BK] piece of the row, dv a power of two."""
    BK = min(LAUNCH["gemv_norm"]["BK"], next_pow2(K))
    return dv == next_pow2(dv) and BK % dv == 0 and K % dv == 0


def gemv(x_MK: torch.Tensor, w_NK: torch.Tensor, out: torch.Tensor | None = None, pdl: bool = False,
         push: tuple | None = None, norm: tuple | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] W [N, K]^T for M <= ROWS, accumulated in fp32, written to `out`
    (a new tensor by default; any [M, N] view whose rows are packed).

    pdl: launch under programmatic dependent launch where the GPU has it (the programs are placed
    while the launch ahead ends, and wait for it before they read anything).
    push: (words_ptrs, epochs, rank, slot_words, block) of a flag-in-word all-reduce of `out`
    (comm.SymmetricAllReduce.word_push; one row, 16- or 32-bit): each program also pushes its
    outputs to the peers as that all-reduce's words, and the caller then runs its reduce alone
    (triton_allreduce.ll_all_reduce, phases "reduce").
    norm: (z [1, K], weight [dv], eps, qk_shift): x is a row of the mixer's o (heads of dv values),
    and the product is of its gated RMSNorm instead, w o rsqrt(mean(o^2) + eps) silu(z) per head,
    formed as triton_norm.gated_rmsnorm forms it (rounded to x's dtype); where it fits
    (norm_fits). qk_shift: None, or gated_rmsnorm's (proj_TP, conv_pool_SWC, meta, nqk), whose
    decode sequences' q|k conv state this launch then shifts as that one's would.
    """
    M, K = x_MK.shape
    N = w_NK.shape[0]
    if not 1 <= M <= ROWS:
        raise ValueError(f"gemv takes 1 to {ROWS} rows, got {M}")
    if w_NK.shape[1] != K or w_NK.stride(1) != 1 or x_MK.stride(1) != 1:
        raise ValueError(f"gemv takes x [M, K] and W [N, K] with packed rows, got {tuple(x_MK.shape)} and "
                         f"{tuple(w_NK.shape)}")
    if out is None:
        out = torch.empty(M, N, device=x_MK.device, dtype=x_MK.dtype)
    if tuple(out.shape) != (M, N) or out.stride(1) != 1:
        raise ValueError(f"out must be [{M}, {N}] with packed rows, got {tuple(out.shape)}")
    cfg = LAUNCH["gemv" if norm is None else "gemv_norm"]
    BN, BK = cfg["BN"], min(cfg["BK"], next_pow2(K))
    if norm is not None:
        BN = max(1, min(BN, cfg["TILE"] // BK))
    tables, pushing = (x_MK, x_MK, 0, 0), {}
    if push is not None:
        words_ptrs, epochs, rank, slot_words, block = push
        pack = WORD_BYTES // out.element_size()
        if M != 1 or pack not in (1, 2) or block % BN or not out.is_contiguous():
            raise ValueError(f"gemv pushes the words of one packed row of 16- or 32-bit outputs in whole "
                             f"all-reduce programs, got {M} rows of {out.dtype}, programs of {block}")
        tables = (words_ptrs, epochs, rank, slot_words)
        pushing = dict(PUSH=True, WORLD=words_ptrs.numel(), PACK=pack, AR_BLOCK=block)
    programs = cdiv(N, BN)
    # the norm's and the shift's arguments (tensors, then integers), unused where not formed
    normed, shifted, norming = (x_MK, x_MK, 0.0), (x_MK,) * 6 + (0, 0, 0, 0), {}
    if norm is not None:
        z_MK, weight_D, eps, qk_shift = norm
        dv = weight_D.numel()
        if M != 1 or tuple(z_MK.shape) != (M, K) or z_MK.stride(1) != 1 or not norm_fits(K, dv):
            raise ValueError(f"gemv forms the gated norm of one row of whole heads with z [1, K] packed "
                             f"(heads of a power-of-two dv, whole heads in each piece of {BK}), got x "
                             f"{tuple(x_MK.shape)}, z {tuple(z_MK.shape)}, dv {dv}")
        normed = (z_MK, weight_D, eps)
        norming = dict(NORM=True, DV=dv)
        if qk_shift is not None and qk_shift[2].num_decode:
            shift = qk_shift_launch(*qk_shift)
            n_shift = qk_shift[2].num_decode * shift["blocks"]
            if n_shift > programs:
                raise ValueError(f"gemv shifts the q|k conv state in at most its {programs} programs' "
                                 f"blocks, this call has {n_shift}")
            shifted = (*shift["args"], n_shift)
            norming.update(shift["meta"], NCB=shift["blocks"])
    launch(_gemv_kernel, (programs,), x_MK, w_NK, out, M, N, K, x_MK.stride(0), w_NK.stride(0), out.stride(0),
           *tables, *normed, *shifted, BM=next_pow2(M), BN=BN, BK=BK, num_warps=cfg["num_warps"],
           num_stages=cfg["num_stages"], **pushing, **norming, **pdl_launch(pdl and PDL, x_MK.device))
    return out
