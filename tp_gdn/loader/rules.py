"""The one table of how each GDN checkpoint tensor is shaped and split across ranks, and how a
rank's pieces are packed into the layer's parameters.

Used by the HF loader (which reads only the rows a rule names), the pre-sharded writer, and the
tests. Names are relative to `{prefix}{layer}.linear_attn.`.
"""

from __future__ import annotations

import torch

from ..config import GDNConfig
from ..parallel import Replicate, Rule, Split


def tensor_rules(cfg: GDNConfig) -> dict[str, tuple[tuple[int, ...], Rule]]:
    """{tensor name: (full shape, split rule)} for the checkpoint layout of `cfg`."""
    H, K = cfg.hidden_size, cfg.conv_kernel
    nk, nv, dk, dv, r = cfg.num_k_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.ratio
    kd, vd = cfg.key_dim, cfg.value_dim
    if cfg.layout == "grouped":
        # rows grouped per key head g: [q_g, k_g, v_g (r dv), z_g (r dv)] and [b_g (r), a_g (r)];
        # a contiguous block of rows is a block of whole groups.
        proj = {
            "in_proj_qkvz.weight": ((nk * (2 * dk + 2 * r * dv), H), Split(0, (nk * (2 * dk + 2 * r * dv),))),
            "in_proj_ba.weight": ((2 * nv, H), Split(0, (2 * nv,))),
        }
    else:
        proj = {
            "in_proj_qkv.weight": ((2 * kd + vd, H), Split(0, (kd, kd, vd))),
            "in_proj_z.weight": ((vd, H), Split(0, (vd,))),
            "in_proj_b.weight": ((nv, H), Split(0, (nv,))),
            "in_proj_a.weight": ((nv, H), Split(0, (nv,))),
        }
    return {
        **proj,
        "conv1d.weight": ((cfg.conv_dim, 1, K), Split(0, (kd, kd, vd))),
        "A_log": ((nv,), Split(0, (nv,))),
        "dt_bias": ((nv,), Split(0, (nv,))),
        "norm.weight": ((dv,), Replicate()),
        "out_proj.weight": ((H, vd), Split(1, (vd,))),
    }


def local_shapes(cfg: GDNConfig, tp: int) -> dict[str, tuple[int, ...]]:
    return {name: rule.local_shape(shape, tp) for name, (shape, rule) in tensor_rules(cfg).items()}


def placements(cfg: GDNConfig, tp: int) -> dict[str, list[tuple[int, int, str, int]]]:
    """Where each row of a rank's checkpoint pieces goes in the layer's local parameters.

    {tensor name: [(first row in the piece, rows, parameter name, first row there)]}, rows along
    dim 0 (a 1-D tensor has one element per row, conv1d.weight [C, 1, K] one channel per row).
    The in_proj rows become [q | k | v | z | b | a] of the local heads; out_proj's piece (a
    column block) is the whole local parameter.
    """
    nk, nv = cfg.num_k_heads // tp, cfg.num_v_heads // tp
    dk, dv, r = cfg.head_k_dim, cfg.head_v_dim, cfg.ratio
    kd, vd = nk * dk, nv * dv
    row = dict(q=0, k=kd, v=2 * kd, z=2 * kd + vd, b=2 * kd + 2 * vd, a=2 * kd + 2 * vd + nv)
    P = "in_proj.weight"
    if cfg.layout == "grouped":
        # rows of key head g: [q_g (dk), k_g (dk), v_g (r dv), z_g (r dv)] and [b_g (r), a_g (r)]
        G = 2 * dk + 2 * r * dv
        parts = (("q", 0, dk), ("k", dk, dk), ("v", 2 * dk, r * dv), ("z", 2 * dk + r * dv, r * dv))
        proj = {
            "in_proj_qkvz.weight": [(g * G + lo, n, P, row[x] + g * n) for g in range(nk) for x, lo, n in parts],
            "in_proj_ba.weight": [(g * 2 * r + lo, r, P, row[x] + g * r) for g in range(nk) for x, lo in
                                  (("b", 0), ("a", r))],
        }
    else:
        proj = {
            "in_proj_qkv.weight": [(0, kd, P, row["q"]), (kd, kd, P, row["k"]), (2 * kd, vd, P, row["v"])],
            "in_proj_z.weight": [(0, vd, P, row["z"])],
            "in_proj_b.weight": [(0, nv, P, row["b"])],
            "in_proj_a.weight": [(0, nv, P, row["a"])],
        }
    return {
        **proj,
        "conv1d.weight": [(0, kd, "conv_weight", 0), (kd, kd, "conv_weight", kd), (2 * kd, vd, "conv_weight", 2 * kd)],
        "A_log": [(0, nv, "A_log", 0)],
        "dt_bias": [(0, nv, "dt_bias", 0)],
        "norm.weight": [(0, dv, "norm_weight", 0)],
        "out_proj.weight": [(0, cfg.hidden_size, "out_proj.weight", 0)],
    }


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """A tensor as [rows, elements per row] (see `placements`)."""
    return t.reshape(t.shape[0], -1)


def pack_into(cfg: GDNConfig, tp: int, t: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Copy a rank's checkpoint pieces (as `tensor_rules` cuts them) into the layer's local
    parameters (names as in `GDNLayer`), following `placements`, casting to each parameter's
    dtype and device."""
    for name, places in placements(cfg, tp).items():
        src = rows_of(t[name])
        for s, n, pname, d in places:
            rows_of(params[pname])[d: d + n].copy_(src[s: s + n])


def pack(cfg: GDNConfig, tp: int, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack_into` a fresh layer's parameters (fp32 for A_log, dt_bias and the norm weight, the
    pieces' dtype for the rest): with tp=1 and full tensors, the unsharded layer's parameters."""
    from ..layer import GDNLayer

    layer = GDNLayer(cfg, cfg.linear_layer_ids[0], 0, tp, dtype=t["out_proj.weight"].dtype, backend="torch")
    params = {n: p.data for n, p in layer.named_parameters()}
    pack_into(cfg, tp, t, params)
    return params
