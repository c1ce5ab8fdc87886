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
LAUNCH = {"gemv": dict(BN=8, BK=1024, num_warps=8, num_stages=2)}
# programmatic dependent launch of gemv(pdl=True)
PDL = True
# few_rows_product's pushing form (gemv(push=...)): the product's programs push their outputs as the
# flag-in-word all-reduce's words (off: the all-reduce pushes them, after the product). H200 x2,
# decode 1 at tp=2: 25.68 / 18.17 us single / back to back against 25.94 / 18.92 off, bit-equal
# (benchmarks/results/decode_ab_h200x2_s44i_b1.log)
PUSH_WORDS = True


@triton.jit
def _gemv_kernel(x, w, y, M, N, K, stride_xm, stride_wn, stride_ym, words_ptrs, epochs, rank, slot_words,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GDC: tl.constexpr,
                 PUSH: tl.constexpr = False, WORLD: tl.constexpr = 1, PACK: tl.constexpr = 1,
                 AR_BLOCK: tl.constexpr = 1):
    wait_for_prior_grid(GDC)
    pid = tl.program_id(0)
    rn = (pid * BN + tl.arange(0, BN)).to(tl.int64)
    m_n = rn < N
    rm = tl.arange(0, BM)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        m_k = rk < K
        wt = tl.load(w + rn[:, None] * stride_wn + rk[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
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


def gemv(x_MK: torch.Tensor, w_NK: torch.Tensor, out: torch.Tensor | None = None, pdl: bool = False,
         push: tuple | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] W [N, K]^T for M <= ROWS, accumulated in fp32, written to `out`
    (a new tensor by default; any [M, N] view whose rows are packed).

    pdl: launch under programmatic dependent launch where the GPU has it (the programs are placed
    while the launch ahead ends, and wait for it before they read anything).
    push: (words_ptrs, epochs, rank, slot_words, block) of a flag-in-word all-reduce of `out`
    (comm.SymmetricAllReduce.word_push; one row, 16- or 32-bit): each program also pushes its
    outputs to the peers as that all-reduce's words, and the caller then runs its reduce alone
    (triton_allreduce.ll_all_reduce, phases "reduce").
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
    cfg = LAUNCH["gemv"]
    BN, BK = cfg["BN"], min(cfg["BK"], next_pow2(K))
    tables, pushing = (x_MK, x_MK, 0, 0), {}
    if push is not None:
        words_ptrs, epochs, rank, slot_words, block = push
        pack = WORD_BYTES // out.element_size()
        if M != 1 or pack not in (1, 2) or block % BN or not out.is_contiguous():
            raise ValueError(f"gemv pushes the words of one packed row of 16- or 32-bit outputs in whole "
                             f"all-reduce programs, got {M} rows of {out.dtype}, programs of {block}")
        tables = (words_ptrs, epochs, rank, slot_words)
        pushing = dict(PUSH=True, WORLD=words_ptrs.numel(), PACK=pack, AR_BLOCK=block)
    launch(_gemv_kernel, (cdiv(N, BN),), x_MK, w_NK, out, M, N, K, x_MK.stride(0), w_NK.stride(0), out.stride(0),
           *tables, BM=next_pow2(M), BN=BN, BK=BK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
           **pushing, **pdl_launch(pdl and PDL, x_MK.device))
    return out
