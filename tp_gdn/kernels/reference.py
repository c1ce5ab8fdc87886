"""Plain-torch reference of every GDN stage: the CPU backend and the oracle for the Triton kernels.

Works on any device in float64, float32 and bfloat16 inputs; arithmetic runs in float64 when an
input is float64 and in float32 otherwise. Packed variable-length sequences are described by host
lists (`seq_lens`, `slots`, `has_state`); states live in slot pools that are updated in place.

Shapes: T packed tokens, N sequences, S slots, C conv channels, W = K - 1 conv state width,
Hk/Hv key/value heads, dk/dv head dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def check_config(cfg) -> None:
    """The torch backend runs every valid GDNConfig (the triton backend's check_config refuses some)."""


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# -- causal depthwise conv1d + silu over packed sequences -----------------------------------------
def causal_conv1d(
    x_TC: torch.Tensor,
    weight_CK: torch.Tensor,
    conv_state_SWC: torch.Tensor,
    seq_lens: Sequence[int],
    slots: Sequence[int],
    has_state: Sequence[bool],
) -> torch.Tensor:
    """silu(depthwise causal conv) of each packed sequence, continuing from its slot's conv state.

    y[t, c] = silu(sum_j weight[c, j] * x[t - (K-1) + j, c]), where inputs before a sequence's
    first token come from `conv_state[slot]` (the sequence's previous K-1 inputs, oldest first)
    or are zero when `has_state` is False. Afterwards `conv_state[slot]` holds the last K-1
    inputs of each sequence. Returns y in x's dtype.
    """
    T, C = x_TC.shape
    K = weight_CK.shape[1]
    W = K - 1
    N = len(seq_lens)
    dev = x_TC.device
    cd = compute_dtype(x_TC, weight_CK)
    lens = torch.tensor(list(seq_lens), device=dev)
    slot_idx = torch.tensor(list(slots), device=dev, dtype=torch.long)
    keep = torch.tensor(list(has_state), device=dev, dtype=torch.bool)

    # ext_EC: per sequence, its W history rows then its tokens: E = T + N*W rows.
    seq_of_tok = torch.repeat_interleave(torch.arange(N, device=dev), lens)
    tok_pos = torch.arange(T, device=dev) + (seq_of_tok + 1) * W
    starts = torch.cumsum(lens, 0) - lens
    hist_pos = (starts + torch.arange(N, device=dev) * W)[:, None] + torch.arange(W, device=dev)[None, :]
    hist_NWC = torch.where(keep[:, None, None], conv_state_SWC[slot_idx].to(cd), 0.0)
    ext_EC = torch.empty(T + N * W, C, dtype=cd, device=dev)
    ext_EC[tok_pos] = x_TC.to(cd)
    ext_EC[hist_pos.reshape(-1)] = hist_NWC.reshape(N * W, C)

    win_TK = tok_pos[:, None] - W + torch.arange(K, device=dev)[None, :]
    y_TC = torch.einsum("tkc,ck->tc", ext_EC[win_TK], weight_CK.to(cd))

    last_pos = tok_pos[starts + lens - 1]
    new_NWC = ext_EC[last_pos[:, None] - W + 1 + torch.arange(W, device=dev)[None, :]]
    conv_state_SWC[slot_idx] = new_NWC.to(conv_state_SWC.dtype)
    return F.silu(y_TC).to(x_TC.dtype)


# -- pointwise stages ----------------------------------------------------------------------------
def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim, in the compute dtype."""
    x = x.to(compute_dtype(x))
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gdn_gating(a_TH, b_TH, A_log_H, dt_bias_H) -> tuple[torch.Tensor, torch.Tensor]:
    """g = -exp(A_log) * softplus(a + dt_bias) (log-space decay, <= 0) and beta = sigmoid(b)."""
    cd = compute_dtype(a_TH, A_log_H)
    g = -torch.exp(A_log_H.to(cd)) * F.softplus(a_TH.to(cd) + dt_bias_H.to(cd))
    beta = torch.sigmoid(b_TH.to(cd))
    return g, beta


def gated_rmsnorm(o_TNV: torch.Tensor, z_TNV: torch.Tensor, weight_V: torch.Tensor, eps: float,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """weight * o * rsqrt(mean(o^2) + eps) * silu(z), normalising over the head dim V."""
    cd = compute_dtype(o_TNV, z_TNV)
    o = o_TNV.to(cd)
    y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * weight_V.to(cd) * F.silu(z_TNV.to(cd))
    return y.to(out_dtype or z_TNV.dtype)


# -- the gated delta rule --------------------------------------------------------------------------
def _expand_heads(q, k, num_v_heads):
    r = num_v_heads // k.shape[2]
    if r > 1:
        q = q.repeat_interleave(r, dim=2)
        k = k.repeat_interleave(r, dim=2)
    return q, k


def recurrent_gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state_BHKV=None):
    """Token-by-token gated delta rule (q, k already normalised and q scaled).

    Per value head: S <- exp(g) S; u = beta (v - S^T k); S <- S + k u^T; o = S^T q.
    Value head j reads key head j // (Hv / Hk). Returns (o [B, T, Hv, dv] in v's dtype,
    final state [B, Hv, dk, dv] in the compute dtype).
    """
    cd = compute_dtype(q_BTHK, k_BTHK, v_BTHV)
    B, T, Hv, dv = v_BTHV.shape
    q, k = _expand_heads(q_BTHK, k_BTHK, Hv)
    q, k, v = (x.to(cd) for x in (q, k, v_BTHV))
    g, beta = g_BTH.to(cd), beta_BTH.to(cd)
    dk = k.shape[-1]
    S = (torch.zeros(B, Hv, dk, dv, dtype=cd, device=v.device) if initial_state_BHKV is None
         else initial_state_BHKV.to(cd).clone())
    o = torch.empty(B, T, Hv, dv, dtype=cd, device=v.device)
    for t in range(T):
        S = S * torch.exp(g[:, t])[..., None, None]
        kt = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + kt[..., :, None] * u[..., None, :]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o.to(v_BTHV.dtype), S


def chunk_gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state_BHKV=None,
                           chunk_size: int = 64):
    """The same function as `recurrent_gated_delta_rule`, computed chunk by chunk.

    Within a chunk (positions i, j; G = cumulative g from the chunk start; S0 the state at the
    chunk start; Gamma_ij = exp(G_i - G_j)):
      (I + A) U = beta V - beta exp(G) K S0,  A_ij = beta_i Gamma_ij k_i.k_j  (j < i)
      O = exp(G) Q S0 + (Q K^T o Gamma, j <= i) U
      S_end = exp(G_last) S0 + (K o exp(G_last - G))^T U
    so only a loop over chunks remains. Padded positions carry g = beta = 0 and leave S alone.
    """
    cd = compute_dtype(q_BTHK, k_BTHK, v_BTHV)
    B, T, Hv, dv = v_BTHV.shape
    q, k = _expand_heads(q_BTHK, k_BTHK, Hv)
    dk = k.shape[-1]
    C = chunk_size
    pad = (-T) % C
    NC = (T + pad) // C

    def chunks(x):  # [B, T, H, d] -> [B, H, NC, C, d]
        x = F.pad(x.to(cd), (0, 0, 0, 0, 0, pad))
        return x.reshape(B, NC, C, Hv, -1).permute(0, 3, 1, 2, 4)

    q, k, v = chunks(q), chunks(k), chunks(v_BTHV)
    g = chunks(g_BTH[..., None])[..., 0]
    beta = chunks(beta_BTH[..., None])[..., 0]

    G = g.cumsum(-1)                                               # [B, H, NC, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
    gamma = diff.exp()                                             # [B, H, NC, C, C], 0 above diagonal
    strict = ~torch.eye(C, dtype=torch.bool, device=v.device)
    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2)) * gamma * strict
    eye = torch.eye(C, dtype=cd, device=v.device)
    L = eye + A
    U0 = torch.linalg.solve_triangular(L, v * beta[..., None], upper=False, unitriangular=True)
    Wk = torch.linalg.solve_triangular(L, kb * G.exp()[..., None], upper=False, unitriangular=True)
    P = (q @ k.transpose(-1, -2)) * gamma
    q_dec = q * G.exp()[..., None]
    G_last = G[..., -1:]
    k_dec = k * (G_last - G).exp()[..., None]

    S = (torch.zeros(B, Hv, dk, dv, dtype=cd, device=v.device) if initial_state_BHKV is None
         else initial_state_BHKV.to(cd).clone())
    o = torch.empty(B, Hv, NC, C, dv, dtype=cd, device=v.device)
    for n in range(NC):
        U = U0[:, :, n] - Wk[:, :, n] @ S
        o[:, :, n] = q_dec[:, :, n] @ S + P[:, :, n] @ U
        S = S * G_last[:, :, n, :, None].exp() + k_dec[:, :, n].transpose(-1, -2) @ U
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NC * C, Hv, dv)[:, :T]
    return o.to(v_BTHV.dtype), S


def gated_delta_rule_varlen(
    q_THK, k_THK, v_THV, g_TH, beta_TH, state_pool_SHKV,
    seq_lens: Sequence[int], slots: Sequence[int], has_state: Sequence[bool],
    chunk_size: int = 64,
) -> torch.Tensor:
    """Gated delta rule over packed sequences with states read from and written to a slot pool.

    Single-token sequences take one recurrent step together; longer ones run the chunked form,
    zero-padded to a common length (padding has g = beta = 0, so it leaves the state alone).
    Returns o [T, Hv, dv] in v's dtype; `state_pool[slot]` holds each sequence's final state.
    """
    T, Hv, dv = v_THV.shape
    dev = v_THV.device
    lens = list(seq_lens)
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    slot_t = torch.tensor(list(slots), dtype=torch.long, device=dev)
    keep = torch.tensor(list(has_state), dtype=torch.bool, device=dev)
    h0 = torch.where(keep[:, None, None, None], state_pool_SHKV[slot_t], 0.0)
    o = torch.empty_like(v_THV)
    finals = torch.empty_like(h0)

    one = [i for i, n in enumerate(lens) if n == 1]
    many = [i for i, n in enumerate(lens) if n > 1]
    if one:
        idx = torch.tensor([starts[i] for i in one], device=dev)
        sel = torch.tensor(one, device=dev)
        o1, s1 = recurrent_gated_delta_rule(
            q_THK[idx, None], k_THK[idx, None], v_THV[idx, None], g_TH[idx, None], beta_TH[idx, None], h0[sel])
        o[idx] = o1[:, 0]
        finals[sel] = s1.to(finals.dtype)
    if many:
        Tm = max(lens[i] for i in many)
        # tok_MT: for each long sequence, its token indices, padded with index T (a zero row)
        tok = torch.full((len(many), Tm), T, dtype=torch.long, device=dev)
        for row, i in enumerate(many):
            tok[row, : lens[i]] = torch.arange(starts[i], starts[i] + lens[i], device=dev)

        def padded(x):
            z = torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=dev)
            return torch.cat([x, z])[tok]

        sel = torch.tensor(many, device=dev)
        om, sm = chunk_gated_delta_rule(padded(q_THK), padded(k_THK), padded(v_THV), padded(g_TH),
                                        padded(beta_TH), h0[sel], chunk_size)
        valid = tok < T
        o[tok[valid]] = om[valid]
        finals[sel] = sm.to(finals.dtype)
    state_pool_SHKV[slot_t] = finals
    return o


# -- the layer's mixer: projections in, core output out -------------------------------------------
def gdn_mix(proj_TP, nk: int, nv: int, dk: int, dv: int, conv_weight_CK, A_log_H, dt_bias_H,
            conv_pool_SWC, ssm_pool_SHKV, batch, meta=None, after_gemm: bool = False) -> torch.Tensor:
    """From the fused projection [q | k | v | z | b | a] (local heads) to the core output o.

    conv + silu over q|k|v with carried conv state, l2norm of q and k, q scaled by dk^-0.5,
    gating, and the gated delta rule with carried recurrent state. Returns o [T, nv, dv].
    after_gemm: as gdn_mix_norm's.
    """
    T = proj_TP.shape[0]
    kd, vd = nk * dk, nv * dv
    qkv = proj_TP[:, : 2 * kd + vd]
    b = proj_TP[:, 2 * kd + 2 * vd: 2 * kd + 2 * vd + nv]
    a = proj_TP[:, 2 * kd + 2 * vd + nv:]
    mixed = causal_conv1d(qkv, conv_weight_CK, conv_pool_SWC, batch.seq_lens, batch.slots, batch.has_state)
    q = l2norm(mixed[:, :kd].reshape(T, nk, dk)) * dk ** -0.5
    k = l2norm(mixed[:, kd: 2 * kd].reshape(T, nk, dk))
    v = mixed[:, 2 * kd:].reshape(T, nv, dv)
    g, beta = gdn_gating(a, b, A_log_H, dt_bias_H)
    return gated_delta_rule_varlen(q, k, v, g, beta, ssm_pool_SHKV, batch.seq_lens, batch.slots,
                                   batch.has_state)


def proj_z(proj_TP, nk: int, nv: int, dk: int, dv: int) -> torch.Tensor:
    """The gate input z [T, nv, dv] of the fused projection [q | k | v | z | b | a] (a view)."""
    kd, vd = nk * dk, nv * dv
    return proj_TP[:, 2 * kd + vd: 2 * kd + 2 * vd].reshape(proj_TP.shape[0], nv, dv)


def gdn_mix_norm(proj_TP, nk: int, nv: int, dk: int, dv: int, conv_weight_CK, A_log_H, dt_bias_H,
                 conv_pool_SWC, ssm_pool_SHKV, batch, meta, norm_weight_V, eps: float,
                 out_dtype: torch.dtype | None = None, after_gemm: bool = False) -> torch.Tensor:
    """gdn_mix, then the gated RMSNorm with z from the projection: y [T, nv, dv]. after_gemm (the
    triton backend's launch hint) changes nothing here: torch runs its ops in stream order."""
    o = gdn_mix(proj_TP, nk, nv, dk, dv, conv_weight_CK, A_log_H, dt_bias_H, conv_pool_SWC, ssm_pool_SHKV,
                batch, meta)
    return gated_rmsnorm(o, proj_z(proj_TP, nk, nv, dk, dv), norm_weight_V, eps, out_dtype=out_dtype)
