"""The "triton" backend: the layer's mixer and gated norm, composed from our Triton kernels.

gdn_mix for a batch: decode sequences take the fused single-token kernel; longer sequences take
conv (+ l2norm) over their chunks, the conv-state update, and the chunked delta rule. Both kinds
write their rows of one output, so a mixed batch needs no gather or scatter.
"""

from __future__ import annotations

import torch

from . import triton_gemv
from .reference import proj_z
from .triton_chunk import choose_path, chunk_delta_rule_varlen
from .triton_conv import MAX_TAPS, conv_prefill, conv_state_update
from .triton_decode import decode_step
from .triton_norm import gated_rmsnorm

__all__ = ["check_config", "gdn_mix", "gdn_mix_norm", "gated_rmsnorm", "few_rows_product", "product_norm",
           "gdn_prefill", "gdn_decode"]

# gdn_mix_norm forms the gated norm inside the fused prefill pass where it can (fused_norm_applies)
# only when this is True. Off: on an H200 at 8x4096 tokens, tp=1, the layer took 6.021 ms with the
# norm inside the (transposed) fused pass against 5.193 ms with the norm kernel (0.207 ms) apart
# (benchmarks/bench_layer.py prints both; benchmarks/results/layer_h200x4_s4_tp1.log).
FUSE_NORM = False


def check_config(cfg) -> None:
    """Refuse, when a layer is built, a model these kernels do not run: the prefill conv takes
    conv kernels of 2 to MAX_TAPS taps."""
    if not 2 <= cfg.conv_kernel <= MAX_TAPS:
        raise ValueError(f"backend 'triton' runs conv kernels of 2 to {MAX_TAPS} taps, but this model's "
                         f"linear_conv_kernel_dim is {cfg.conv_kernel}; use backend 'torch'")


def gdn_mix(proj_TP, nk: int, nv: int, dk: int, dv: int, conv_weight_CK, A_log_H, dt_bias_H,
            conv_pool_SWC, ssm_pool_SHKV, batch, meta, gated_norm: tuple | None = None,
            shift_qk: bool = True, after_gemm: bool = False) -> torch.Tensor:
    """From the fused projection [q | k | v | z | b | a] of the local heads to o [T, nv, dv]
    (or, with gated_norm = (weight, eps) for a prefill-only batch on the fused one-block path,
    to the gated-norm output, formed inside the fused pass). shift_qk=False leaves the decode
    sequences' q|k conv state for the caller's next launch to shift (gated_rmsnorm's qk_shift).
    after_gemm: proj_TP was written by the launch just ahead, which writes nothing else read here
    (the layer's in_proj product): the decode kernel may then start before it ends
    (triton_decode.decode_step)."""
    T = proj_TP.shape[0]
    kd, vd = nk * dk, nv * dv
    o = torch.empty(T, nv, dv, device=proj_TP.device, dtype=proj_TP.dtype)
    o_T = o.view(T, vd)
    decode_step(proj_TP, conv_weight_CK, conv_pool_SWC, A_log_H, dt_bias_H, ssm_pool_SHKV, o_T, meta,
                nk, nv, dk, dv, shift_qk=shift_qk, after_gemm=after_gemm)
    if meta.num_chunks:
        C = 2 * kd + vd
        mixed = torch.empty(T, C, device=proj_TP.device, dtype=proj_TP.dtype)
        conv_prefill(proj_TP, conv_weight_CK, conv_pool_SWC, mixed, meta.chunks, meta.num_chunks,
                     meta.cu_seqlens, meta.slots, meta.has_state, nk, dk)
        conv_state_update(proj_TP, conv_pool_SWC, meta.prefill_seqs, meta.prefill_seqs.numel(),
                          meta.cu_seqlens, meta.slots, meta.has_state)
        off_b = 2 * kd + 2 * vd
        chunk_delta_rule_varlen(
            mixed, mixed, mixed, proj_TP[:, off_b + nv:], proj_TP[:, off_b:], A_log_H, dt_bias_H,
            ssm_pool_SHKV, o_T, meta, q_col0=0, k_col0=kd, v_col0=2 * kd, nk=nk, nv=nv, dk=dk, dv=dv,
            normalize_qk=False, gated_norm=None if gated_norm is None else (proj_TP, 2 * kd + vd, *gated_norm))
    return o


def fused_norm_applies(meta, nv: int, dv: int, dtype: torch.dtype) -> bool:
    """Whether gdn_mix can form the gated norm inside the fused pass: only prefill sequences (the
    decode kernel writes plain o) on the fused path with one block spanning dv (as gdn_mix's
    call, with q and k normalised before the pass, chooses it)."""
    if not FUSE_NORM or meta.num_decode or not meta.num_chunks:
        return False
    path, BV = choose_path(meta.prefill_seqs.numel(), nv, dv, dtype, meta.num_chunks, qk_normed=True)
    return path == "fused" and BV >= dv


def gdn_mix_norm(proj_TP, nk: int, nv: int, dk: int, dv: int, conv_weight_CK, A_log_H, dt_bias_H,
                 conv_pool_SWC, ssm_pool_SHKV, batch, meta, norm_weight_V, eps: float,
                 out_dtype: torch.dtype | None = None, after_gemm: bool = False) -> torch.Tensor:
    """gdn_mix and the gated RMSNorm with z from the projection: y [T, nv, dv]. The norm runs
    inside the fused prefill pass where `fused_norm_applies`, else as its own kernel, whose
    launch also shifts the decode sequences' q|k conv state (one launch fewer per step).
    after_gemm: as gdn_mix's."""
    args = (proj_TP, nk, nv, dk, dv, conv_weight_CK, A_log_H, dt_bias_H, conv_pool_SWC, ssm_pool_SHKV, batch, meta)
    if (out_dtype is None or out_dtype == proj_TP.dtype) and fused_norm_applies(meta, nv, dv, proj_TP.dtype):
        return gdn_mix(*args, gated_norm=(norm_weight_V, eps), after_gemm=after_gemm)
    o = gdn_mix(*args, shift_qk=False, after_gemm=after_gemm)
    return gated_rmsnorm(o, proj_z(proj_TP, nk, nv, dk, dv), norm_weight_V, eps, out_dtype=out_dtype,
                         qk_shift=(proj_TP, conv_pool_SWC, meta, 2 * nk * dk))


def few_rows_product(pdl: bool):
    """The layer's projections of few rows (calls of up to triton_gemv.MAX_ROWS tokens):
    product(x [M, K], W [N, K], out=None, norm=None) -> x W^T through triton_gemv.gemv, or None
    where x has more rows (or unpacked rows) and the caller's cuBLAS product applies. pdl: as
    gemv's. norm: gemv's (product_norm's, with a row of the mixer's o in x), where
    product.takes_norm(rows, K, dv) says it is formed; refused (ValueError) where x is taken but
    the norm is not.
    product.pushing(x, W, out, push, norm=None) forms it the same way and also pushes out's words
    for a flag-in-word all-reduce (gemv's push), or returns None where it cannot (where product
    would not take x, x has more than one row, or triton_gemv.PUSH_WORDS is off): then nothing
    has run."""
    def takes(x_MK):
        return x_MK.shape[0] <= triton_gemv.MAX_ROWS and x_MK.stride(1) == 1

    def takes_norm(rows: int, K: int, dv: int) -> bool:
        return triton_gemv.NORM_IN_PRODUCT and rows == 1 and triton_gemv.MAX_ROWS >= 1 and triton_gemv.norm_fits(K, dv)

    def refuse_norm(x_MK, norm):
        if norm is not None and not takes_norm(*x_MK.shape, norm[1].numel()):
            raise ValueError(f"the few-row product does not form the gated norm of x {tuple(x_MK.shape)} "
                             f"(triton_gemv.NORM_IN_PRODUCT {triton_gemv.NORM_IN_PRODUCT}, MAX_ROWS "
                             f"{triton_gemv.MAX_ROWS}); ask takes_norm first")

    def product(x_MK, w_NK, out=None, norm=None):
        if not takes(x_MK):
            return None
        refuse_norm(x_MK, norm)
        return triton_gemv.gemv(x_MK, w_NK, out, pdl=pdl, norm=norm)

    def pushing(x_MK, w_NK, out, push, norm=None):
        if x_MK.shape[0] != 1 or not takes(x_MK) or not triton_gemv.PUSH_WORDS:
            return None
        refuse_norm(x_MK, norm)
        return triton_gemv.gemv(x_MK, w_NK, out, pdl=pdl, push=push, norm=norm)

    product.pushing, product.takes_norm = pushing, takes_norm
    return product


def product_norm(proj_TP, nk: int, nv: int, dk: int, dv: int, conv_pool_SWC, meta, norm_weight_V,
                 eps: float) -> tuple:
    """few_rows_product's `norm` for the o [1, nv dv] that gdn_mix(shift_qk=False) forms from
    proj_TP: z from the projection, the norm's weight and eps, and the shift of the decode
    sequences' q|k conv state that gdn_mix left (gdn_mix_norm's norm launch does it otherwise)."""
    return (proj_z(proj_TP, nk, nv, dk, dv).flatten(1), norm_weight_V, eps,
            (proj_TP, conv_pool_SWC, meta, 2 * nk * dk))


def gdn_prefill(q_THK, k_THK, v_THV, a_TH, b_TH, A_log_H, dt_bias_H, state_pool_SHKV, batch,
                BV: int | None = None, path: str | None = None, seg_chunks: int | None = None,
                overlap: bool | None = None) -> torch.Tensor:
    """The core of a prefill, on its own: chunked gated delta rule with l2norm and gating inside.

    q, k: [T, Hk, dk] raw (l2-normalised here, q scaled by dk^-0.5); v: [T, Hv, dv];
    a, b: [T, Hv] raw gate inputs (g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b));
    state_pool: [S, Hv, dk, dv] fp32, read where batch.has_state and overwritten with final
    states. Every sequence of `batch` must be longer than one token. Returns o [T, Hv, dv].
    path, BV: the kernel path and dv block (triton_chunk.choose_path picks them by default);
    seg_chunks: the scan path's segment length in chunks (default: triton_chunk.SCAN, else
    scan_seg_chunks); refused on the other paths. overlap: the split path's steps 2 and 3 in one
    launch (triton_chunk.chunk_delta_rule_varlen's; None: where it fits).
    """
    T, nk, dk = q_THK.shape
    nv, dv = v_THV.shape[1:]
    meta = batch.meta(q_THK.device)
    if meta.num_decode:
        raise ValueError("gdn_prefill takes sequences longer than one token; use gdn_decode for single tokens")
    # This call's host time before the first launch is what a single call adds to its kernels'
    # time (RESULTS, twentieth session), so it passes q, k, v as they are where their rows are
    # packed (the kernels read the row stride only) and leaves o's allocation for after the solve
    o = chunk_delta_rule_varlen(_rows(q_THK, T), _rows(k_THK, T), _rows(v_THV, T), a_TH, b_TH, A_log_H, dt_bias_H,
                                state_pool_SHKV, None, meta, 0, 0, 0, nk, nv, dk, dv,
                                normalize_qk=True, BV=BV, path=path, seg_chunks=seg_chunks, overlap=overlap)
    return o.view(T, nv, dv)


def _rows(x_TAB, T: int) -> torch.Tensor:
    """x [T, A, B] as the kernels take it, T rows of A B values at x's row stride: x itself where
    each row's values are packed, else a packed copy (reshape)."""
    _, a, b = x_TAB.stride()
    return x_TAB if b == 1 and a == x_TAB.shape[2] else x_TAB.reshape(T, -1)


def gdn_decode(qkvba_NP, nk: int, nv: int, dk: int, dv: int, A_log_H, dt_bias_H, state_pool_SHKV, batch,
               BV: int | None = None) -> torch.Tensor:
    """The core of a decode step, on its own: one recurrent step per sequence, l2norm and gating inside.

    qkvba_NP: [N, 2 Hk dk + Hv dv + 2 Hv] rows [q | k | v | b | a] of N single-token sequences
    (already convolved); state_pool: [S, Hv, dk, dv] fp32, updated in place. Returns o [N, Hv, dv].
    """
    N = qkvba_NP.shape[0]
    if any(n != 1 for n in batch.seq_lens):
        raise ValueError("gdn_decode takes single-token sequences")
    o = torch.empty(N, nv, dv, device=qkvba_NP.device, dtype=qkvba_NP.dtype)
    no_conv = torch.empty(2 * nk * dk + nv * dv, 2, device=qkvba_NP.device, dtype=qkvba_NP.dtype)
    decode_step(qkvba_NP, no_conv, no_conv[None], A_log_H, dt_bias_H, state_pool_SHKV, o.view(N, -1),
                batch.meta(qkvba_NP.device), nk, nv, dk, dv, BV=BV, use_conv=False, b_col0=2 * nk * dk + nv * dv)
    return o
