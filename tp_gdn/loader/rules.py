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


def pack(cfg: GDNConfig, tp: int, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A rank's checkpoint pieces (as `tensor_rules` cuts them) -> the layer's local parameters.

    With tp=1 and full tensors this gives the unsharded layer's parameters.
    """
    nk, nv = cfg.num_k_heads // tp, cfg.num_v_heads // tp
    dk, dv, r, H = cfg.head_k_dim, cfg.head_v_dim, cfg.ratio, cfg.hidden_size
    if cfg.layout == "grouped":
        qkvz_GRH = t["in_proj_qkvz.weight"].reshape(nk, 2 * dk + 2 * r * dv, H)
        q, k, v, z = torch.split(qkvz_GRH, [dk, dk, r * dv, r * dv], dim=1)
        ba_GRH = t["in_proj_ba.weight"].reshape(nk, 2 * r, H)
        b, a = torch.split(ba_GRH, [r, r], dim=1)
        parts = [x.reshape(-1, H) for x in (q, k, v, z, b, a)]
    else:
        q, k, v = torch.split(t["in_proj_qkv.weight"], [nk * dk, nk * dk, nv * dv], dim=0)
        parts = [q, k, v, t["in_proj_z.weight"], t["in_proj_b.weight"], t["in_proj_a.weight"]]
    return {
        "in_proj.weight": torch.cat(parts, dim=0),
        "conv_weight": t["conv1d.weight"][:, 0, :],
        "A_log": t["A_log"],
        "dt_bias": t["dt_bias"],
        "norm_weight": t["norm.weight"],
        "out_proj.weight": t["out_proj.weight"],
    }
