"""Triton gated RMSNorm: y = w * o * rsqrt(mean(o^2) + eps) * silu(z), per head over dv.

In a layer call with decode sequences, the same launch also shifts their q|k conv state
(`qk_shift`): the decode kernel leaves that to the next launch, and this is the next launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import cdiv, launch, next_pow2, pdl_launch, wait_for_prior_grid
from .triton_decode import qk_shift_launch, shift_qk_block

# programmatic dependent launch of the norm that also shifts decode sequences' q|k conv state (a
# decode step's launch after the decode kernel): its programs are placed while the kernel ahead
# finishes, and wait for it before they start (wait_for_prior_grid). On an H200 (80B dims, graphed
# step, beside the decode kernel's PDL) it gained 0 to 0.6 us back to back in two runs at 1 and 256
# sequences, bit-equal (benchmarks/results/exp_pdl*_h200_s25.log)
PDL = True


@triton.jit
def _norm_rows(o, z, w, y, T, i_t, h, stride_o, stride_z, stride_y, eps,
               DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    rows = (i_t * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.arange(0, BV)
    m = (rows < T)[:, None] & (cols < DV)[None, :]
    x = tl.load(o + rows[:, None] * stride_o + h * DV + cols[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(z + rows[:, None] * stride_z + h * DV + cols[None, :], mask=m, other=0.0).to(tl.float32)
    wt = tl.load(w + cols, mask=cols < DV, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / DV + eps)
    out = x * r[:, None] * wt[None, :] * g * tl.sigmoid(g)
    tl.store(y + rows[:, None] * stride_y + h * DV + cols[None, :], out.to(y.dtype.element_ty), mask=m)


@triton.jit
def _gated_rmsnorm_kernel(o, z, w, y, T, stride_o, stride_z, stride_y, eps,
                          DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """Grid (token blocks, heads); o/z/y rows hold head h at columns h DV."""
    _norm_rows(o, z, w, y, T, tl.program_id(0), tl.program_id(1), stride_o, stride_z, stride_y, eps, DV, BT, BV)


@triton.jit
def _gated_rmsnorm_shift_kernel(o, z, w, y, T, stride_o, stride_z, stride_y, eps,
                                proj, conv_pool, seqs, cu_seqlens, slots, has_state, stride_proj, stride_ps,
                                stride_pw, n_shift, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                                NQK: tl.constexpr, W: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr,
                                NCB: tl.constexpr, GDC: tl.constexpr = False):
    """_gated_rmsnorm_kernel's grid plus rows of programs that each shift one (decode sequence,
    channel block) of the n_shift = sequences x NCB, in row-major order over the grid's rows of
    heads. A kernel of its own, so that calls without decode sequences (prefill) launch the
    plain kernel, with its shorter argument list (host time per launch). GDC: launched with PDL,
    so it waits for the launch ahead (which reads the q|k conv state it shifts) before anything."""
    wait_for_prior_grid(GDC)
    i_t, h = tl.program_id(0), tl.program_id(1)
    n_t = tl.cdiv(T, BT)
    if i_t >= n_t:
        j = (i_t - n_t) * tl.num_programs(1) + h
        if j < n_shift:
            shift_qk_block(proj, conv_pool, seqs, cu_seqlens, slots, has_state, stride_proj, stride_ps,
                           stride_pw, j // NCB, j % NCB, NQK, W, BW, BC)
    else:
        _norm_rows(o, z, w, y, T, i_t, h, stride_o, stride_z, stride_y, eps, DV, BT, BV)


def gated_rmsnorm(o_THV: torch.Tensor, z_THV: torch.Tensor, weight_V: torch.Tensor, eps: float,
                  out_dtype: torch.dtype | None = None, qk_shift: tuple | None = None) -> torch.Tensor:
    """o, z: [T, H, dv] (z may be a strided view of the projection); returns y [T, H, dv].

    qk_shift = (proj_TP, conv_pool_SWC, meta, nqk): also shift the q|k conv state of meta's
    decode sequences, as triton_decode.decode_step(shift_qk=False) left it.
    """
    T, H, dv = o_THV.shape
    assert o_THV.stride(2) == 1 and z_THV.stride(2) == 1 and o_THV.stride(1) == dv and z_THV.stride(1) == dv
    y = torch.empty(T, H, dv, device=o_THV.device, dtype=out_dtype or z_THV.dtype)
    if T == 0:
        return y
    BV = next_pow2(dv)
    BT = max(1, min(64, 4096 // BV))
    args = (o_THV, z_THV, weight_V, y, T, o_THV.stride(0), z_THV.stride(0), y.stride(0), eps)
    if qk_shift is None or not qk_shift[2].num_decode:
        launch(_gated_rmsnorm_kernel, (cdiv(T, BT), H), *args, DV=dv, BT=BT, BV=BV, num_warps=4)
        return y
    shift = qk_shift_launch(*qk_shift)
    n_shift = qk_shift[2].num_decode * shift["blocks"]
    warps = 4
    if T == qk_shift[2].num_decode:
        # a decode-only call: smaller norm programs. H200, decode 256 at 80B dims, with 1024-channel
        # shift programs: 3.98 us with 8 tokens and 2 warps a program, 4.91 with 32 and 4 (the
        # defaults); 6.85 with 256-channel shift programs as well (exp_norm_shift_h200x2_s9.log)
        BT, warps = 8, 2
    launch(_gated_rmsnorm_shift_kernel, (cdiv(T, BT) + cdiv(n_shift, H), H),
        *args, *shift["args"], n_shift, DV=dv, BT=BT, BV=BV, NCB=shift["blocks"], num_warps=warps,
        **shift["meta"], **pdl_launch(PDL, o_THV.device),
    )
    return y
