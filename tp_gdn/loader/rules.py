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


def pack_into(cfg: GDNConfig, tp: int, t: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Copy a rank's checkpoint pieces (as `tensor_rules` cuts them) into the layer's local
    parameters (names as in `GDNLayer`), each element once, casting to each parameter's dtype
    and device: the in_proj rows become [q | k | v | z | b | a] of the local heads."""
    nk, nv = cfg.num_k_heads // tp, cfg.num_v_heads // tp
    dk, dv, r, H = cfg.head_k_dim, cfg.head_v_dim, cfg.ratio, cfg.hidden_size
    kd, vd = nk * dk, nv * dv
    dst = params["in_proj.weight"]
    q, k, v, z, b, a = torch.split(dst, [kd, kd, vd, vd, nv, nv], dim=0)
    if cfg.layout == "grouped":
        # rows of key head g: [q_g (dk), k_g (dk), v_g (r dv), z_g (r dv)] and [b_g (r), a_g (r)]
        qkvz_GRH = t["in_proj_qkvz.weight"].view(nk, 2 * dk + 2 * r * dv, H)
        ba_GRH = t["in_proj_ba.weight"].view(nk, 2 * r, H)
        for part, (lo, n) in zip((q, k, v, z), ((0, dk), (dk, dk), (2 * dk, r * dv), (2 * dk + r * dv, r * dv))):
            part.view(nk, n, H).copy_(qkvz_GRH[:, lo: lo + n])
        b.view(nk, r, H).copy_(ba_GRH[:, :r])
        a.view(nk, r, H).copy_(ba_GRH[:, r:])
    else:
        qkv = t["in_proj_qkv.weight"]
        q.copy_(qkv[:kd])
        k.copy_(qkv[kd: 2 * kd])
        v.copy_(qkv[2 * kd:])
        z.copy_(t["in_proj_z.weight"])
        b.copy_(t["in_proj_b.weight"])
        a.copy_(t["in_proj_a.weight"])
    params["conv_weight"].copy_(t["conv1d.weight"][:, 0, :])
    for name, src in (("A_log", "A_log"), ("dt_bias", "dt_bias"), ("norm_weight", "norm.weight"),
                      ("out_proj.weight", "out_proj.weight")):
        params[name].copy_(t[src])


def pack(cfg: GDNConfig, tp: int, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`pack_into` a fresh layer's parameters (fp32 for A_log, dt_bias and the norm weight, the
    pieces' dtype for the rest): with tp=1 and full tensors, the unsharded layer's parameters."""
    from ..layer import GDNLayer

    layer = GDNLayer(cfg, cfg.linear_layer_ids[0], 0, tp, dtype=t["out_proj.weight"].dtype, backend="torch")
    params = {n: p.data for n, p in layer.named_parameters()}
    pack_into(cfg, tp, t, params)
    return params
