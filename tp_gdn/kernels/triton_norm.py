"""Triton gated RMSNorm: y = w * o * rsqrt(mean(o^2) + eps) * silu(z), per head over dv."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_rmsnorm_kernel(o, z, w, y, T, stride_o, stride_z, stride_y, eps,
                          DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """Grid (token blocks, heads); o/z/y rows hold head h at columns h DV."""
    i_t, h = tl.program_id(0), tl.program_id(1)
    rows = (i_t * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.arange(0, BV)
    m = (rows < T)[:, None] & (cols < DV)[None, :]
    x = tl.load(o + rows[:, None] * stride_o + h * DV + cols[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(z + rows[:, None] * stride_z + h * DV + cols[None, :], mask=m, other=0.0).to(tl.float32)
    wt = tl.load(w + cols, mask=cols < DV, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / DV + eps)
    out = x * r[:, None] * wt[None, :] * g * tl.sigmoid(g)
    tl.store(y + rows[:, None] * stride_y + h * DV + cols[None, :], out.to(y.dtype.element_ty), mask=m)


def gated_rmsnorm(o_THV: torch.Tensor, z_THV: torch.Tensor, weight_V: torch.Tensor, eps: float,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """o, z: [T, H, dv] (z may be a strided view of the projection); returns y [T, H, dv]."""
    T, H, dv = o_THV.shape
    assert o_THV.stride(2) == 1 and z_THV.stride(2) == 1 and o_THV.stride(1) == dv and z_THV.stride(1) == dv
    y = torch.empty(T, H, dv, device=o_THV.device, dtype=out_dtype or z_THV.dtype)
    if T == 0:
        return y
    BV = triton.next_power_of_2(dv)
    BT = max(1, min(64, 4096 // BV))
    _gated_rmsnorm_kernel[(triton.cdiv(T, BT), H)](
        o_THV, z_THV, weight_V, y, T, o_THV.stride(0), z_THV.stride(0), y.stride(0), eps,
        DV=dv, BT=BT, BV=BV, num_warps=4,
    )
    return y
