"""The plain-torch reference stages against independent oracles (HF transformers' functions,
torch's own conv1d, float64 token-by-token recurrence)."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from tp_gdn.kernels import reference as ref


def random_core_inputs(B, T, Hk, Hv, dk, dv, dtype=torch.float64):
    q = ref.l2norm(torch.randn(B, T, Hk, dk, dtype=torch.float64)) * dk ** -0.5
    k = ref.l2norm(torch.randn(B, T, Hk, dk, dtype=torch.float64))
    v = torch.randn(B, T, Hv, dv, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, Hv, dtype=torch.float64) + 2.0)
    beta = torch.rand(B, T, Hv, dtype=torch.float64)
    h0 = torch.randn(B, Hv, dk, dv, dtype=torch.float64) * 0.5
    return [x.to(dtype) for x in (q, k, v)] + [g, beta, h0]


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("r", [1, 2, 4])
def test_chunked_form_equals_token_recurrence_in_fp64(T, r):
    q, k, v, g, beta, h0 = random_core_inputs(2, T, 2, 2 * r, 16, 8)
    o_c, s_c = ref.chunk_gated_delta_rule(q, k, v, g, beta, h0)
    o_r, s_r = ref.recurrent_gated_delta_rule(q, k, v, g, beta, h0)
    assert rel_err(o_c, o_r) < 1e-12
    assert rel_err(s_c, s_r) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_chunked_form_in_low_precision_stays_close_to_fp64(dtype, tol):
    q, k, v, g, beta, h0 = random_core_inputs(2, 130, 2, 4, 32, 32)
    o64, s64 = ref.recurrent_gated_delta_rule(q, k, v, g, beta, h0)
    o, s = ref.chunk_gated_delta_rule(q.to(dtype), k.to(dtype), v.to(dtype), g.float(), beta.float(), h0.float())
    assert o.dtype == dtype
    assert rel_err(o, o64) < tol
    assert rel_err(s, s64) < tol


def test_delta_rule_matches_hf_transformers_functions():
    m = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    q, k, v, g, beta, h0 = random_core_inputs(2, 100, 2, 4, 16, 16, dtype=torch.float32)
    raw_q, raw_k = torch.randn_like(q), torch.randn_like(k)   # HF normalises and scales inside
    qn, kn = ref.l2norm(raw_q) * 16 ** -0.5, ref.l2norm(raw_k)
    o, s = ref.chunk_gated_delta_rule(qn, kn, v, g.float(), beta.float(), h0.float())
    o_hf, s_hf = m.torch_chunk_gated_delta_rule(raw_q, raw_k, v, g.float(), beta.float(), initial_state=h0.float(),
                                                output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert rel_err(o, o_hf) < 1e-5 and rel_err(s, s_hf) < 1e-5
    o1, s1 = ref.recurrent_gated_delta_rule(qn[:, :1], kn[:, :1], v[:, :1], g[:, :1].float(), beta[:, :1].float(),
                                            h0.float())
    o1_hf, s1_hf = m.torch_recurrent_gated_delta_rule(
        raw_q[:, :1], raw_k[:, :1], v[:, :1], g[:, :1].float(), beta[:, :1].float(), initial_state=h0.float(),
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert rel_err(o1, o1_hf) < 1e-5 and rel_err(s1, s1_hf) < 1e-5


def test_varlen_conv_matches_torch_conv1d_per_sequence():
    C, K, S = 12, 4, 6
    lens, slots, has = [1, 2, 5, 64, 3], [4, 0, 2, 5, 1], [True, True, False, True, False]
    x = torch.randn(sum(lens), C, dtype=torch.float64)
    w = torch.randn(C, K, dtype=torch.float64)
    pool = torch.randn(S, K - 1, C, dtype=torch.float64)
    before = pool.clone()
    y = ref.causal_conv1d(x, w, pool, lens, slots, has)
    start = 0
    for n, s, h in zip(lens, slots, has):
        hist = before[s] if h else torch.zeros(K - 1, C, dtype=torch.float64)
        seq = torch.cat([hist, x[start:start + n]])                      # [K-1+n, C]
        want = F.silu(F.conv1d(seq.T[None], w[:, None, :], groups=C)[0].T)  # valid conv: n outputs
        assert rel_err(y[start:start + n], want) < 1e-12
        assert torch.equal(pool[s], seq[-(K - 1):])
        start += n
    untouched = [s for s in range(S) if s not in slots]
    assert torch.equal(pool[untouched], before[untouched])


def test_gated_rmsnorm_matches_hf_module():
    m = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    norm = m.Qwen3NextRMSNormGated(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    o, z = torch.randn(10, 3, 16), torch.randn(10, 3, 16)
    want = norm(o.reshape(-1, 16), z.reshape(-1, 16)).reshape(10, 3, 16)
    assert rel_err(ref.gated_rmsnorm(o, z, norm.weight.detach(), 1e-6), want) < 1e-6


def test_gating_follows_its_formula():
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    A_log, dt = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    g, beta = ref.gdn_gating(a, b, A_log, dt)
    for t in range(5):
        for h in range(3):
            x = a[t, h].item() + dt[h].item()
            want_g = -math.exp(A_log[h].item()) * math.log1p(math.exp(x))
            assert abs(g[t, h].item() - want_g) < 1e-12
            assert abs(beta[t, h].item() - 1 / (1 + math.exp(-b[t, h].item()))) < 1e-12


def test_varlen_delta_rule_reads_and_writes_only_its_slots():
    Hk, Hv, dk, dv, S = 2, 4, 8, 8, 7
    lens, slots, has = [1, 70, 1, 5, 64], [3, 0, 6, 2, 5], [True, False, False, True, True]
    T = sum(lens)
    q, k, v, g, beta, _ = random_core_inputs(1, T, Hk, Hv, dk, dv)
    q, k, v, g, beta = (x[0] for x in (q, k, v, g, beta))
    pool = torch.randn(S, Hv, dk, dv, dtype=torch.float64)
    before = pool.clone()
    o = ref.gated_delta_rule_varlen(q, k, v, g, beta, pool, lens, slots, has)
    start = 0
    for n, s, h in zip(lens, slots, has):
        sl = slice(start, start + n)
        h0 = before[s][None] if h else None
        o_r, s_r = ref.recurrent_gated_delta_rule(q[None, sl], k[None, sl], v[None, sl], g[None, sl],
                                                  beta[None, sl], h0)
        assert rel_err(o[sl], o_r[0]) < 1e-12
        assert rel_err(pool[s], s_r[0]) < 1e-12
        start += n
    untouched = [s for s in range(S) if s not in slots]
    assert torch.equal(pool[untouched], before[untouched])
