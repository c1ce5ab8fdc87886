"""Triton kernels against the torch reference (float64 where it matters) and fla-core.

On a CPU machine they run in Triton's interpreter on tiny float32 shapes; on a GPU the same tests
run compiled, and the tests marked `gpu` add real shapes, bfloat16 and fla-core 0.6.0.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import interp_bounds
from helpers import load_benchmark, random_full_weights, rel_err, tiny_config
from tp_gdn import Batch, GDNLayer, StateCache
from tp_gdn.kernels import reference as ref
from tp_gdn.kernels.triton_common import _COMPILED, exp_ftz
from tp_gdn.loader.synthetic import gate_parameters
from tp_gdn.workload import WorkloadBuilder, mixed_workload, run_steps

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def tri():
    from tp_gdn.kernels import triton_chunk, triton_conv, triton_decode, triton_norm, triton_ops
    return triton_chunk, triton_conv, triton_decode, triton_norm, triton_ops


def raw_inputs(T, nk, nv, dk, dv, dtype, S=None):
    """Raw (pre-norm) q, k, v, gate inputs a, b, gate parameters, and a random state pool."""
    q = torch.randn(T, nk, dk, dtype=torch.float64)
    k = torch.randn(T, nk, dk, dtype=torch.float64)
    v = torch.randn(T, nv, dv, dtype=torch.float64)
    a = torch.randn(T, nv, dtype=torch.float64)
    b = torch.randn(T, nv, dtype=torch.float64)
    A_log, dt_bias = gate_parameters(nv, dtype=torch.float64)
    pool = torch.randn(S or 4, nv, dk, dv, dtype=torch.float64) * 0.3
    return q, k, v, a, b, A_log, dt_bias, pool


def reference_core(q, k, v, a, b, A_log, dt_bias, pool, batch):
    """fp64 oracle: l2norm, scale, gating, then the varlen reference (updates `pool`)."""
    dk = q.shape[-1]
    g, beta = ref.gdn_gating(a, b, A_log, dt_bias)
    return ref.gated_delta_rule_varlen(ref.l2norm(q) * dk ** -0.5, ref.l2norm(k), v, g, beta, pool,
                                       batch.seq_lens, batch.slots, batch.has_state)


def run_prefill(lens, nk, nv, dk, dv, dtype, tol, has=None, path=None, BV=None, seg_chunks=None):
    """gdn_prefill against the fp64 reference (output and final states). The scan path runs on
    one-chunk segments unless told otherwise, so that every sequence over 64 tokens spans several."""
    *_, ops = tri()
    if path == "scan" and seg_chunks is None:
        seg_chunks = 1
    S = len(lens) + 2
    q, k, v, a, b, A_log, dt_bias, pool = raw_inputs(sum(lens), nk, nv, dk, dv, dtype, S)
    has = has or [i % 2 == 0 for i in range(len(lens))]
    batch = Batch(lens, list(range(S - 1, S - 1 - len(lens), -1)), has)
    pool64 = pool.clone()
    want = reference_core(q, k, v, a, b, A_log, dt_bias, pool64, batch)
    pool_t = pool.float().to(DEV)
    c = lambda x: x.to(DEV, dtype)
    got = ops.gdn_prefill(c(q), c(k), c(v), c(a), c(b), A_log.float().to(DEV), dt_bias.float().to(DEV),
                          pool_t, batch, BV=BV, path=path, seg_chunks=seg_chunks)
    assert got.dtype == dtype
    assert rel_err(got.cpu(), want) < tol
    assert rel_err(pool_t.cpu(), pool64) < tol
    return got


PATHS = ["split", "fused", "scan"]


def tiny_fused_or_skip(path):
    """The tiny fp32 shapes of the fused path run in the interpreter only: compiled, the fused
    path refuses fp32 and BV < 64 (test_gpu_fused_path_refuses_what_miscompiles), and the
    gpu-marked tests cover it in bf16 at BV 64 and 128."""
    if CUDA and path == "fused":
        pytest.skip("the fused path takes bf16 and BV >= 64 on GPUs; covered by the gpu-marked tests")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nk,nv", [(2, 2), (1, 2), (1, 4)])
def test_chunked_prefill_matches_fp64_reference(nk, nv, path):
    tiny_fused_or_skip(path)
    run_prefill([130, 2, 64, 65, 63], nk, nv, 16, 16, torch.float32, 1e-5, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_chunked_prefill_handles_dk_unlike_dv(path):
    tiny_fused_or_skip(path)
    run_prefill([70, 3], 1, 2, 32, 8, torch.float32, 1e-5, has=[True, False], path=path)


@pytest.mark.parametrize("seg_chunks", [2, 3])
def test_scan_path_with_longer_segments_and_dv_blocks(seg_chunks):
    """Segments of several chunks, the last one of a sequence partial; the pass's dv in blocks."""
    run_prefill([300, 2, 129, 64, 450], 1, 2, 16, 32, torch.float32, 1e-5, has=[True, False, True, True, False],
                path="scan", BV=16, seg_chunks=seg_chunks)


@pytest.mark.parametrize("layout", ["wide rows", "heads apart"])
def test_prefill_takes_q_k_v_in_other_layouts(layout):
    """gdn_prefill on q, k, v that are not contiguous, against the fp64 reference: column views of
    one wider buffer (each row packed, a longer row stride: the kernels take them as they are), and
    head-major buffers seen token-major (rows not packed: gdn_prefill packs them first)."""
    *_, ops = tri()
    lens, nk, nv, d = [70, 65], 1, 2, 16
    q, k, v, a, b, A_log, dt_bias, pool = raw_inputs(sum(lens), nk, nv, d, d, torch.float64, 3)
    batch = Batch(lens, [2, 0], [True, False])
    pool64 = pool.clone()
    want = reference_core(q, k, v, a, b, A_log, dt_bias, pool64, batch)
    T = sum(lens)
    if layout == "wide rows":
        buf = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1), torch.zeros(T, 3, dtype=q.dtype)], 1)
        buf = buf.float().to(DEV)
        qkv = (buf[:, :nk * d].view(T, nk, d), buf[:, nk * d:2 * nk * d].view(T, nk, d), buf[:, 2 * nk * d:-3].view(T, nv, d))
        assert all(x.stride() == (buf.shape[1], d, 1) for x in qkv)
    else:
        qkv = tuple(x.transpose(0, 1).contiguous().float().to(DEV).transpose(0, 1) for x in (q, k, v))
        assert not any(x.is_contiguous() for x in qkv[2:])
    pool_t = pool.float().to(DEV)
    got = ops.gdn_prefill(*qkv, a.float().to(DEV), b.float().to(DEV), A_log.float().to(DEV),
                          dt_bias.float().to(DEV), pool_t, batch, path="split")
    assert got.shape == (T, nv, d)
    assert rel_err(got.cpu(), want) < 1e-5 and rel_err(pool_t.cpu(), pool64) < 1e-5


def split_both_ways(lens, nk, nv, d, dtype, has, reps=1, BV=None):
    """gdn_prefill on the split path, steps 2 and 3 as two launches and as one
    (_split_overlap_kernel), `reps` times each from the same pool: [(o, final pool)] per launch form
    and repeat, and the fp64 reference's (o, pool)."""
    *_, ops = tri()
    q, k, v, a, b, A_log, dt_bias, pool = raw_inputs(sum(lens), nk, nv, d, d, torch.float64, len(lens) + 1)
    batch = Batch(lens, list(range(len(lens), 0, -1)), has)
    pool64 = pool.clone()
    want = reference_core(q, k, v, a, b, A_log, dt_bias, pool64, batch)
    c = lambda x: x.to(DEV, dtype)
    runs = {False: [], True: []}
    for overlap in (False, True):
        for _ in range(reps):
            p = pool.float().to(DEV)
            o = ops.gdn_prefill(c(q), c(k), c(v), c(a), c(b), A_log.float().to(DEV), dt_bias.float().to(DEV), p,
                                batch, path="split", BV=BV, overlap=overlap)
            runs[overlap].append((o, p))
    return runs, (want, pool64)


@pytest.mark.parametrize("group", [2, 3, 8])
def test_split_overlap_equals_separate_launches(monkeypatch, group):
    """The split path's one-launch form, whose walk waits for step 2's count of each group of
    `group` chunks, against the two launches: the same bits, and near the fp64 reference (fp32 in
    the interpreter, bf16 compiled). Sequences of 7, 2, 1 and 3 chunks fill their last group in
    part or whole. (In the interpreter step 2's programs run first.)"""
    chunk = tri()[0]
    from tp_gdn.kernels.triton_common import is_hopper
    if CUDA and not is_hopper(torch.device(DEV)):
        pytest.skip("the one-launch form runs on Hopper GPUs only (split_overlap_applies)")
    monkeypatch.setattr(chunk, "SPLIT_GROUP_CHUNKS", group)
    # compiled, the form takes 16-bit inputs and dk, dv >= 64
    d, dtype, tol = (128, torch.bfloat16, 1e-2) if CUDA else (16, torch.float32, 1e-5)
    runs, (want, pool64) = split_both_ways([400, 70, 2, 129], 1, 2, d, dtype, [True, False, True, False])
    (o0, p0), (o1, p1) = runs[False][0], runs[True][0]
    assert torch.equal(o0, o1) and torch.equal(p0, p1)
    assert rel_err(o1.cpu(), want) < tol and rel_err(p1.cpu(), pool64) < tol


def test_split_overlap_is_refused_off_the_split_path():
    *_, ops = tri()
    q, k, v, a, b, A_log, dt_bias, pool = (x.float().to(DEV) for x in raw_inputs(130, 1, 2, 16, 16, torch.float32))
    for path in ("scan", "fused"):
        with pytest.raises(ValueError, match="overlap applies to the split path only"):
            ops.gdn_prefill(q, k, v, a, b, A_log, dt_bias, pool, Batch([130], [0], [False]), path=path, overlap=True)


@pytest.mark.gpu
def test_gpu_split_overlap_is_refused_where_it_does_not_fit():
    """Compiled, the one-launch form needs a Hopper GPU, 16-bit inputs, dk, dv >= 64 and no more
    walking programs than SMs."""
    *_, ops = tri()
    n_sm = torch.cuda.get_device_properties(DEV).multi_processor_count
    for nv, d, dtype in [(2, 16, torch.bfloat16), (2, 128, torch.float32), (n_sm + 1, 128, torch.bfloat16)]:
        q, k, v, a, b, A_log, dt_bias, pool = (x.to(DEV) for x in raw_inputs(130, 1, nv, d, d, torch.float64))
        c = lambda x: x.to(dtype)
        with pytest.raises(ValueError, match="does not fit"):
            ops.gdn_prefill(c(q), c(k), c(v), c(a), c(b), A_log.float(), dt_bias.float(), pool.float(),
                            Batch([130], [0], [False]), path="split", BV=128 if nv > 2 else None, overlap=True)


@pytest.mark.gpu
@pytest.mark.parametrize("lens,nk,nv", [([4096], 16, 32), ([1000, 64, 65, 2100, 130, 2, 63, 517], 4, 8)])
def test_gpu_split_overlap_equals_separate_launches_every_time(lens, nk, nv):
    """Compiled, bf16, real dims, at the walking programs an H100 or H200 holds in one wave (128: one
    sequence of 32 heads at BV 32, and 8 sequences of 8 heads at BV 64): ten calls of each launch
    form give the same bits every time. A walk that read a chunk before step 2 had stored it would
    differ from run to run."""
    from tp_gdn.kernels.triton_common import is_hopper
    if not is_hopper(torch.device(DEV)):
        pytest.skip("the one-launch form runs on Hopper GPUs only (split_overlap_applies)")
    runs, (want, pool64) = split_both_ways(lens, nk, nv, 128, torch.bfloat16, [i % 2 == 0 for i in range(len(lens))],
                                           reps=10)
    o0, p0 = runs[False][0]
    for o, p in runs[False] + runs[True]:
        assert torch.equal(o, o0) and torch.equal(p, p0)
    assert rel_err(o0.cpu(), want) < 1e-2 and rel_err(p0.cpu(), pool64) < 1e-2


def test_segment_tables_cut_each_prefill_sequence():
    """Segments of 2 chunks (128 tokens) over prefill sequences with a decode between them."""
    meta = Batch([300, 1, 128, 129], [0, 1, 2, 3], [True, True, False, False]).meta("cpu")
    seg = meta.segments(2)
    assert seg.num_segments == 3 + 1 + 2
    assert seg.bounds.tolist() == [0, 128, 128, 256, 256, 300, 301, 429, 429, 557, 557, 558]
    assert seg.seq_first.tolist() == [0, 3, 4, 6]
    assert seg.pairs.tolist() == [0, 2, 4, 6, 8, 10]
    assert seg.slots.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5] and seg.ones.tolist() == [1] * 12
    assert meta.segments(2) is seg                   # built once per length
    with pytest.raises(ValueError, match="seg_chunks must be >= 1"):
        meta.segments(0)


def test_segment_length_is_refused_off_the_scan_path():
    *_, ops = tri()
    q, k, v, a, b, A_log, dt_bias, pool = (x.float().to(DEV) for x in raw_inputs(130, 1, 2, 16, 16, torch.float32))
    with pytest.raises(ValueError, match="scan path only"):
        ops.gdn_prefill(q, k, v, a, b, A_log, dt_bias, pool, Batch([130], [0], [False]), path="split", seg_chunks=2)


def test_fused_path_with_dv_split_in_blocks():
    tiny_fused_or_skip("fused")
    run_prefill([70, 129], 1, 2, 16, 32, torch.float32, 1e-5, has=[True, False], path="fused", BV=16)


@pytest.mark.parametrize("path", PATHS)
def test_prefill_reads_no_buffer_element_it_did_not_write(path, monkeypatch):
    """Every scratch buffer starts as NaN (the solve stores only T's blocks on and below the
    diagonal, and its readers must mask the rest): a read of an unwritten element shows."""
    tiny_fused_or_skip(path)
    real_empty = torch.empty

    def nan_empty(*args, **kw):
        t = real_empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    got = run_prefill([130, 2, 64, 65], 1, 2, 16, 16, torch.float32, 1e-5, path=path)
    assert torch.isfinite(got).all()


def solve_inputs(lens, nk, nv, dk, hard, seed=0):
    """Raw k and gate inputs for the solve. hard: the keys of each head nearly parallel, beta
    near 1 and almost no decay, so A's entries are near 1 below the diagonal (its inverse's
    Neumann series then cancels by orders of magnitude: a solve that summed it would show)."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    if hard:
        k = torch.randn(1, nk, dk, generator=gen, dtype=torch.float64) + \
            0.05 * torch.randn(T, nk, dk, generator=gen, dtype=torch.float64)
        a = torch.full((T, nv), -12.0, dtype=torch.float64)
        b = torch.full((T, nv), 7.0, dtype=torch.float64)
    else:
        k = torch.randn(T, nk, dk, generator=gen, dtype=torch.float64)
        a, b = (torch.randn(T, nv, generator=gen, dtype=torch.float64) for _ in range(2))
    A_log, dt_bias = gate_parameters(nv, gen, dtype=torch.float64)
    return k, a, b, A_log, dt_bias


def solve_reference(k, a, b, A_log, dt_bias, lens, nv):
    """fp64 T diag(beta) [tokens, nv, 64] (what the solve stores): per chunk and value head, row i
    of (I + A)^-1 diag(beta) at token i, with
    A_ij = beta_i (k_i . k_j) exp(G_i - G_j) for j < i (G the in-chunk cumulative gate); and the
    smallest mean of A's entries below the diagonal over the chunks of two or more tokens."""
    R = nv // k.shape[1]
    g, beta = ref.gdn_gating(a, b, A_log, dt_bias)
    kn = ref.l2norm(k).repeat_interleave(R, dim=1)
    T = torch.zeros(k.shape[0], nv, 64, dtype=torch.float64)
    least = float("inf")
    t0 = 0
    for n in lens:
        for c0 in range(t0, t0 + n, 64):
            c1 = min(c0 + 64, t0 + n)
            L = c1 - c0
            G = g[c0:c1].cumsum(0)                                              # [L, nv]
            kk = kn[c0:c1].transpose(0, 1)                                       # [nv, L, dk]
            decay = (G.T[:, :, None] - G.T[:, None, :]).tril(-1).exp()                # j < i: <= 1
            A = ((kk @ kk.transpose(1, 2)) * decay * beta[c0:c1].T[:, :, None]).tril(-1)
            if L > 1:
                least = min(least, A.sum().item() / (nv * L * (L - 1) / 2))
            T[c0:c1, :, :L] = torch.linalg.inv(torch.eye(L, dtype=torch.float64) + A).transpose(0, 1)
            T[c0:c1, :, :L] *= beta[c0:c1].T[None]                  # stored as T diag(beta)
        t0 += n
    return T, least


def check_solve(lens, nk, nv, dk, dtype, tol, hard):
    chunk, *_ = tri()
    k, a, b, A_log, dt_bias = solve_inputs(lens, nk, nv, dk, hard)
    k, a, b = (x.to(dtype).double() for x in (k, a, b))       # the solve's error, not the inputs' rounding
    A_log, dt_bias = A_log.float().double(), dt_bias.float().double()
    want, least = solve_reference(k, a, b, A_log, dt_bias, lens, nv)
    if hard:    # as hard as it claims
        assert least > 0.9
    batch = Batch(lens, list(range(len(lens))), [False] * len(lens))
    c = lambda x: x.to(DEV, dtype)
    got, _ = chunk.intra_solve(c(k).reshape(len(k), -1), c(a), c(b), A_log.float().to(DEV),
                                  dt_bias.float().to(DEV), batch.meta(DEV), 0, nk, nv, dk, True)
    got = got.transpose(0, 1)                                   # [nv, T, 64] -> [T, nv, 64]
    lower = torch.ones(64, 64, dtype=torch.bool).tril()       # the stored part: row i up to column i
    t0 = 0
    for n in lens:
        for c0 in range(t0, t0 + n, 64):
            L = min(64, t0 + n - c0)
            diff = (got[c0:c0 + L].double().cpu() - want[c0:c0 + L]).abs().masked_fill(~lower[:L, None, :], 0)
            assert diff.max() <= tol * want[c0:c0 + L].abs().max(), (c0, diff.max().item())
        t0 += n


@pytest.mark.parametrize("hard", [False, True])
def test_solve_inverts_each_chunk_against_fp64(hard):
    """T against an fp64 inverse of (I + A) per chunk, including hard chunks (A near 1 below the
    diagonal, where a series inversion would cancel by orders of magnitude): fp32 inputs must
    keep rounding-level error there too."""
    check_solve([70, 64, 5], 1, 2, 16, torch.float32, 2e-5, hard)


def test_choose_path_keeps_the_fused_path_to_many_16_bit_programs():
    chunk, *_ = tri()
    many = chunk.FUSED_MIN_PROGRAMS
    assert chunk.choose_path(8, 8, 128) == ("fused", 128)                # 8 sequences x 8 heads: one block spans dv
    assert chunk.choose_path(chunk.FUSED_FULL_DV_MIN_PROGRAMS, 1, 128) == ("fused", 128)
    # q and k normalised before the pass (the layer): two dv blocks at 64 pairs, one from 65
    assert chunk.choose_path(64, 1, 128, qk_normed=True) == ("fused", chunk.FUSED_BV)
    assert chunk.choose_path(4, 16, 128, qk_normed=True) == ("fused", chunk.FUSED_BV)
    assert chunk.choose_path(65, 1, 128, qk_normed=True) == ("fused", 128)
    assert chunk.choose_path(8, 16, 128, qk_normed=True) == ("fused", 128)
    assert chunk.choose_path(many, 1, 256) == ("fused", chunk.FUSED_BV)  # dv wider than FUSED_MAX_BV: FUSED_BV blocks
    assert chunk.choose_path(many, 1, 128, torch.float32)[0] == "split"   # fp32 overflows shared memory
    assert chunk.choose_path(many - 1, 1, 128)[0] == "split"
    assert chunk.choose_path(1, 8, 128) == ("split", 16)                 # one long sequence: cut dv finely
    assert chunk.choose_path(many, 1, 16)[0] == "split"                  # dv below the fused block


def test_choose_path_takes_the_scan_for_very_few_long_sequences():
    chunk, *_ = tri()
    assert chunk.choose_path(1, 8, 128, num_chunks=512) == ("scan", None)        # 1x32768 on a tp=4 rank
    assert chunk.scan_seg_chunks(512, 8) == 32                                   # 16 segments x 8 heads
    assert chunk.choose_path(2, 8, 128, num_chunks=512) == ("scan", None)
    assert chunk.choose_path(1, 8, 128, num_chunks=8)[0] == "split"              # one segment: nothing to scan
    assert chunk.choose_path(8, 4, 128, num_chunks=512)[0] != "scan"             # 32 pairs: enough for split
    assert chunk.choose_path(1, 8, 128) == ("split", 16)                         # lengths unknown


def test_unknown_prefill_path_is_refused():
    *_, ops = tri()
    q, k, v, a, b, A_log, dt_bias, pool = (x.float().to(DEV) for x in raw_inputs(5, 1, 1, 16, 16, torch.float32))
    with pytest.raises(ValueError, match="path must be"):
        ops.gdn_prefill(q, k, v, a, b, A_log, dt_bias, pool, Batch([5], [0], [False]), path="fast")


def test_decode_step_matches_reference_with_conv_update():
    *_, ops = tri()
    cfg = tiny_config(nk=2, nv=4, dk=16, dv=16, K=4)
    nk, nv, dk, dv = 2, 4, 16, 16
    kd, vd = nk * dk, nv * dv
    N, S = 5, 8
    P = 2 * kd + 2 * vd + 2 * nv
    proj = torch.randn(N, P)
    conv_w = torch.randn(cfg.conv_dim, 4) * 0.5
    conv_pool = torch.randn(S, 3, cfg.conv_dim)
    ssm_pool = torch.randn(S, nv, dk, dv) * 0.3
    A_log, dt_bias = gate_parameters(nv)
    batch = Batch([1] * N, [6, 0, 3, 7, 1], [True, False, True, True, False])
    cp_ref, sp_ref = conv_pool.clone(), ssm_pool.clone()
    want = ref.gdn_mix(proj, nk, nv, dk, dv, conv_w, A_log, dt_bias, cp_ref, sp_ref, batch)
    cp, sp = conv_pool.to(DEV), ssm_pool.to(DEV)
    got = ops.gdn_mix(proj.to(DEV), nk, nv, dk, dv, conv_w.to(DEV), A_log.to(DEV), dt_bias.to(DEV), cp, sp,
                      batch, batch.meta(DEV))
    assert rel_err(got.cpu(), want) < 1e-5
    assert torch.equal(cp.cpu(), cp_ref)
    assert rel_err(sp.cpu(), sp_ref) < 1e-5


@pytest.mark.parametrize("with_norm", [False, True])
def test_decode_padding_rows_touch_only_the_padding_slot(with_norm):
    """The padding rows of a CUDA graph's batch-size bucket (graphs.py) all run on the cache's
    padding slot, one past its visible slots: the real rows' outputs and slots are the reference's
    for those rows alone, and every other visible slot keeps its bits. Both q|k conv-state shifts:
    the decode kernel's own launch, and the gated norm's (gdn_mix_norm)."""
    *_, ops = tri()
    cfg = tiny_config(nk=2, nv=4, dk=16, dv=16, K=4)
    nk, nv, dk, dv = 2, 4, 16, 16
    kd, vd = nk * dk, nv * dv
    real, G, S = [6, 2, 3], 5, 8
    P = 2 * kd + 2 * vd + 2 * nv
    proj = torch.randn(G, P)
    conv_w = torch.randn(cfg.conv_dim, 4) * 0.5
    conv_pool = torch.randn(S + 1, 3, cfg.conv_dim)          # as StateCache holds them: a padding slot past S
    ssm_pool = torch.randn(S + 1, nv, dk, dv) * 0.3
    A_log, dt_bias = gate_parameters(nv)
    norm_w = torch.rand(dv) + 0.5
    n = len(real)
    ref_batch = Batch([1] * n, real, [True] * n)
    cp_ref, sp_ref = conv_pool.clone(), ssm_pool.clone()
    cp0, sp0 = conv_pool.clone(), ssm_pool.clone()          # (on the CPU, .to(DEV) below is the pool itself)
    if with_norm:
        want = ref.gdn_mix_norm(proj[:n], nk, nv, dk, dv, conv_w, A_log, dt_bias, cp_ref, sp_ref, ref_batch,
                                None, norm_w, 1e-6)
    else:
        want = ref.gdn_mix(proj[:n], nk, nv, dk, dv, conv_w, A_log, dt_bias, cp_ref, sp_ref, ref_batch)
    # the graph's batch (slots 0..G-1, as captured) with its slot buffer rewritten for this step
    batch = Batch([1] * G, list(range(G)), [True] * G)
    meta = batch.meta(DEV)
    meta.slots.copy_(torch.tensor(real + [S] * (G - n)))
    cp, sp = conv_pool.to(DEV), ssm_pool.to(DEV)
    args = (proj.to(DEV), nk, nv, dk, dv, conv_w.to(DEV), A_log.to(DEV), dt_bias.to(DEV), cp[:S], sp[:S], batch, meta)
    got = ops.gdn_mix_norm(*args, norm_w.to(DEV), 1e-6) if with_norm else ops.gdn_mix(*args)
    assert got.shape[0] == G
    assert rel_err(got[:n].cpu(), want) < 1e-5
    others = [s for s in range(S) if s not in real]
    assert torch.equal(cp.cpu()[others], cp0[others]) and torch.equal(sp.cpu()[others], sp0[others])
    assert torch.equal(cp.cpu()[real], cp_ref[real])
    assert rel_err(sp.cpu()[real], sp_ref[real]) < 1e-5
    assert not torch.equal(sp.cpu()[S], sp0[S])      # the padding rows ran, on the padding slot


@pytest.mark.parametrize("world,dtype", [(2, torch.float32), (3, torch.float16)])
def test_push_all_reduce_plays_every_rank_in_one_process(world, dtype):
    """The push all-reduce's kernel, every rank played here on one device: all ranks' pushes,
    then all ranks' reduces, over several calls of uneven sizes (parities and epochs advance per
    program). Every rank gets the fp32 sum in rank order, rounded once: the same bits on all.
    Each reduce writes the calls its rank has got through into that rank's watchdog word, where
    it has one."""
    from tp_gdn.kernels.triton_allreduce import BLOCK_BYTES, push_all_reduce

    BLOCK = BLOCK_BYTES // dtype.itemsize        # elements per program
    slot, programs = 3 * BLOCK, 4
    recv = [torch.zeros(2 * world * slot, dtype=dtype, device=DEV) for _ in range(world)]
    flags = [torch.zeros(programs, world, dtype=torch.int64, device=DEV) for _ in range(world)]
    epochs = [torch.zeros(programs, dtype=torch.int64, device=DEV) for _ in range(world)]
    recv_ptrs = torch.tensor([t.data_ptr() for t in recv], dtype=torch.int64, device=DEV)
    flag_ptrs = torch.tensor([t.data_ptr() for t in flags], dtype=torch.int64, device=DEV)
    # the watchdog's host words (each rank's count of calls it got through; pinned, as a GPU
    # writes them), rank 0 without one
    words = [torch.full((1,), -7, dtype=torch.int32, pin_memory=CUDA) for _ in range(world)]
    word_ptrs = [None] + [w.data_ptr() for w in words[1:]]
    for call, n in enumerate([BLOCK + 300, 7, 3 * BLOCK, 2 * BLOCK - 1], 1):
        xs = [torch.randn(n).to(DEV, dtype) for _ in range(world)]
        outs = [torch.full((n,), float("nan"), device=DEV, dtype=dtype) for _ in range(world)]
        with interp_bounds.also_allow(recv + flags + words):   # reached through the tables
            for phase in ("push", "reduce"):
                for r in range(world):
                    push_all_reduce(xs[r], outs[r], recv_ptrs, flag_ptrs, epochs[r], r, slot, phases=phase,
                                    progress=word_ptrs[r])
                    if phase == "push":
                        assert words[r].item() == (-7 if r == 0 or call == 1 else call - 1)
        assert [w.item() for w in words] == [-7] + [call] * (world - 1)
        want = xs[0].float()
        for x in xs[1:]:
            want = want + x.float()
        for r in range(world):
            assert torch.equal(outs[r], want.to(dtype)), (n, r)
    assert all(torch.equal(e, epochs[0]) for e in epochs)
    assert epochs[0].tolist() == [4, 3, 1, 0]     # calls that used each program


@pytest.mark.parametrize("world,dtype", [(2, torch.bfloat16), (3, torch.float32), (2, torch.float16)])
def test_flag_in_word_all_reduce_plays_every_rank_in_one_process(world, dtype):
    """The all-reduce whose pushed words carry their call's epoch (ll_all_reduce), every rank
    played here on one device: all ranks' pushes, then all ranks' reduces, over five calls of
    uneven sizes (odd ones leave half a word). Every rank gets the fp32 sum in rank order, rounded
    once: the bits the push kernel gives (bf16 inputs here are sums exact in bf16: the interpreter
    rounds fp32 to bf16 toward zero). The words received carry the call's epoch and the sender's
    bytes. Each reduce writes its call count into its rank's watchdog word."""
    from tp_gdn.kernels.triton_allreduce import BLOCK_BYTES, WORD_BYTES, ll_all_reduce

    BLOCK = BLOCK_BYTES // dtype.itemsize
    programs = 4
    slot_words = 3 * BLOCK_BYTES // WORD_BYTES
    recv = [torch.zeros(2 * world * slot_words, dtype=torch.int64, device=DEV) for _ in range(world)]
    epochs = [torch.zeros(programs, dtype=torch.int64, device=DEV) for _ in range(world)]
    recv_ptrs = torch.tensor([t.data_ptr() for t in recv], dtype=torch.int64, device=DEV)
    # the watchdog's host words, pinned: a GPU writes them
    words = [torch.full((1,), -7, dtype=torch.int32, pin_memory=CUDA) for _ in range(world)]
    for call, n in enumerate([BLOCK + 301, 7, 3 * BLOCK, 2 * BLOCK - 1, 1], 1):
        if dtype == torch.bfloat16 and not CUDA:
            # the interpreter casts fp32 to bf16 by truncation, not to nearest: sums exact in bf16
            xs = [(torch.randint(-64, 64, (n,)) / 8).to(DEV, dtype) for _ in range(world)]
        else:
            xs = [torch.randn(n).to(DEV, dtype) for _ in range(world)]
        outs = [torch.full((n,), float("nan"), device=DEV, dtype=dtype) for _ in range(world)]
        with interp_bounds.also_allow(recv + words):       # reached through the table
            for phase in ("push", "reduce"):
                for r in range(world):
                    ll_all_reduce(xs[r], outs[r], recv_ptrs, epochs[r], r, slot_words, phases=phase,
                                  progress=words[r].data_ptr())
        assert [w.item() for w in words] == [call] * world
        want = xs[0].float()
        for x in xs[1:]:
            want = want + x.float()
        for r in range(world):
            assert torch.equal(outs[r], want.to(dtype)), (n, r)
        # the words of program 0 (which every call uses, so its epoch is the call's number) that
        # rank 1 received from rank 0: the epoch in the high half, rank 0's bytes in the low half
        got = recv[1].cpu().view(2, world, slot_words)[call % 2, 0]
        n_bytes = min(n * dtype.itemsize, BLOCK_BYTES)
        n_words = -(-n_bytes // WORD_BYTES)
        assert torch.equal(got[:n_words] >> 32, torch.full((n_words,), call))
        data = (got[:n_words] & 0xFFFFFFFF).to(torch.int32).view(torch.uint8)
        assert torch.equal(data[:n_bytes], xs[0].cpu().view(torch.uint8)[:n_bytes])
    assert all(torch.equal(e, epochs[0]) for e in epochs)
    assert epochs[0].tolist() == [5, 3, 1, 0]


@pytest.mark.parametrize("world", [2, 3])
def test_both_all_reduce_kernels_on_one_table_of_epochs(world):
    """The push and flag-in-word kernels taking turns on one table of epochs (as
    SymmetricAllReduce's default does by size), every rank played here, each kernel on its own
    buffers: each call's reduce finds its pushes where it looks, under the epoch it waits for
    (every output is this call's sum; a wait for an epoch that never comes would hang), and the
    epochs count every call that ran each program, whichever kernel. All pushes run before all
    reduces here, so no wait can pass too early; the GPU tests cover that."""
    from tp_gdn.kernels.triton_allreduce import BLOCK_BYTES, WORD_BYTES, ll_all_reduce, push_all_reduce

    dtype = torch.float16
    BLOCK = BLOCK_BYTES // dtype.itemsize
    programs, slot = 3, 3 * BLOCK
    slot_words = 3 * BLOCK_BYTES // WORD_BYTES
    words = [torch.zeros(2 * world * slot_words, dtype=torch.int64, device=DEV) for _ in range(world)]
    recv = [torch.zeros(2 * world * slot, dtype=dtype, device=DEV) for _ in range(world)]
    flags = [torch.zeros(programs, world, dtype=torch.int64, device=DEV) for _ in range(world)]
    epochs = [torch.zeros(programs, dtype=torch.int64, device=DEV) for _ in range(world)]
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=DEV)
    words_ptrs, recv_ptrs, flag_ptrs = ptrs(words), ptrs(recv), ptrs(flags)
    calls = [("push", BLOCK + 5), ("ll", 9), ("ll", 2 * BLOCK + 1), ("push", 3), ("push", 3 * BLOCK), ("ll", BLOCK),
             ("push", 2 * BLOCK), ("ll", 3 * BLOCK - 2)]
    for kernel, n in calls:
        xs = [torch.randn(n).to(DEV, dtype) for _ in range(world)]
        outs = [torch.full((n,), float("nan"), device=DEV, dtype=dtype) for _ in range(world)]
        with interp_bounds.also_allow(words + recv + flags):
            for phase in ("push", "reduce"):
                for r in range(world):
                    if kernel == "ll":
                        ll_all_reduce(xs[r], outs[r], words_ptrs, epochs[r], r, slot_words, phases=phase)
                    else:
                        push_all_reduce(xs[r], outs[r], recv_ptrs, flag_ptrs, epochs[r], r, slot, phases=phase)
        want = xs[0].float()
        for x in xs[1:]:
            want = want + x.float()
        for r in range(world):
            assert torch.equal(outs[r], want.to(dtype)), (kernel, n, r)
    assert all(torch.equal(e, epochs[0]) for e in epochs)
    used = [sum(-(-n // BLOCK) > c for _, n in calls) for c in range(programs)]
    assert epochs[0].tolist() == used == [8, 5, 3]


@pytest.mark.parametrize("world,dtype", [(2, torch.float16), (3, torch.float32)])
def test_few_row_product_pushes_the_all_reduce_words_itself(world, dtype):
    """One-row products whose programs push their outputs as the flag-in-word all-reduce's words
    (gemv's push), then the all-reduce's reduce alone, in turn with products that do not and the
    whole all-reduce after them, on the same buffers and epochs, every rank played here: each
    output is the fp32 sum in rank order of the ranks' products, rounded once (the bits of the
    path without the push), and the epochs count every call."""
    from tp_gdn.kernels.triton_allreduce import BLOCK_BYTES, WORD_BYTES, ll_all_reduce
    from tp_gdn.kernels.triton_gemv import gemv

    BLOCK = BLOCK_BYTES // dtype.itemsize
    N, K = 3 * BLOCK // 2, 32          # one all-reduce program and half of another
    programs = -(-N // BLOCK)
    slot_words = programs * BLOCK_BYTES // WORD_BYTES
    recv = [torch.zeros(2 * world * slot_words, dtype=torch.int64, device=DEV) for _ in range(world)]
    epochs = [torch.zeros(programs, dtype=torch.int64, device=DEV) for _ in range(world)]
    ptrs = torch.tensor([t.data_ptr() for t in recv], dtype=torch.int64, device=DEV)
    ws = [(torch.randn(N, K) / K ** 0.5).to(DEV, dtype) for _ in range(world)]
    for call, fused in enumerate([True, False, True, True]):
        xs = [torch.randn(1, K).to(DEV, dtype) for _ in range(world)]
        staged = [torch.empty(1, N, device=DEV, dtype=dtype) for _ in range(world)]
        outs = [torch.full((1, N), float("nan"), device=DEV, dtype=dtype) for _ in range(world)]
        with interp_bounds.also_allow(recv):
            for r in range(world):
                push = (ptrs, epochs[r], r, slot_words, BLOCK) if fused else None
                gemv(xs[r], ws[r], staged[r], push=push)
            for phase in (("reduce",) if fused else ("push", "reduce")):
                for r in range(world):
                    ll_all_reduce(staged[r], outs[r], ptrs, epochs[r], r, slot_words, phases=phase)
        want = staged[0].float()
        for part in staged[1:]:
            want = want + part.float()
        for r in range(world):
            assert torch.equal(outs[r], want.to(dtype)), (call, fused, r)
        assert rel_err(outs[0].cpu(), sum(xs[r].double().cpu() @ ws[r].double().cpu().T for r in range(world))) < 1e-2
    assert all(e.tolist() == [4] * programs for e in epochs)
    with pytest.raises(ValueError, match="one packed row"):
        gemv(torch.randn(2, K).to(DEV, dtype), ws[0], push=(ptrs, epochs[0], 0, slot_words, BLOCK))


def check_conv_prefill(nk, dk, vd, lens, slots, has, dtype, tol, S=6, K=4):
    _, conv, *_ = tri()
    C = 2 * nk * dk + vd
    T = sum(lens)
    proj = torch.randn(T, C + 7).to(dtype)          # extra columns: the kernel must read only C
    w = torch.randn(C, K).to(dtype)
    pool = torch.randn(S, K - 1, C).to(dtype)
    pool_ref = pool.float().clone()               # the reference updates it in place
    y = ref.causal_conv1d(proj[:, :C].float(), w.float(), pool_ref, lens, slots, has)
    want = torch.cat([ref.l2norm(y[:, :nk * dk].reshape(T, nk, dk)).reshape(T, -1) * dk ** -0.5,
                      ref.l2norm(y[:, nk * dk:2 * nk * dk].reshape(T, nk, dk)).reshape(T, -1), y[:, 2 * nk * dk:]], 1)
    batch = Batch(lens, slots, has)
    meta = batch.meta(DEV)
    out = torch.full((T, C), float("nan"), device=DEV, dtype=dtype)
    p = pool.to(DEV)
    conv.conv_prefill(proj.to(DEV), w.to(DEV), p, out, meta.chunks, meta.num_chunks, meta.cu_seqlens, meta.slots,
                      meta.has_state, nk, dk)
    conv.conv_state_update(proj.to(DEV), p, meta.prefill_seqs, len(lens), meta.cu_seqlens, meta.slots,
                           meta.has_state)
    assert rel_err(out.cpu(), want) < tol
    assert torch.equal(p.cpu().float(), pool_ref)  # the carried inputs, exactly


@pytest.mark.parametrize("settings", [dict(rows=64), dict(rows=16),
                                      dict(rows=2, ahead=1, qk_heads=1, v_groups=1), dict(rows=8, ahead=3, qk_heads=2)])
def test_conv_prefill_matches_reference_and_updates_conv_state(monkeypatch, settings):
    # rows per program: pieces of a chunk that start past a sequence's end must store nothing;
    # q/k heads and v groups per program: blocks that straddle q|k or end past the channels
    for key, value in settings.items():
        monkeypatch.setitem(tri()[1].LAUNCH, key, value)
    check_conv_prefill(2, 16, 40, [130, 2, 64, 65, 3], [5, 0, 2, 3, 1], [True, True, False, True, True],
                       torch.float32, 1e-6)


@pytest.mark.parametrize("K", [2, 3])
def test_conv_prefill_shorter_kernels(K):
    """Fewer than 4 taps: the walk's oldest rows meet zero weights and never read past the slot."""
    check_conv_prefill(1, 16, 24, [70, 2, 3, 5], [3, 0, 1, 2], [True, True, True, False], torch.float32, 1e-6, K=K)


def test_conv_prefill_head_dim_not_a_power_of_two():
    """dk 24 in 32-wide lanes, 6 q/k heads in blocks of 4 (the second block half empty)."""
    check_conv_prefill(3, 24, 40, [130, 2, 64, 65, 3, 17], [5, 0, 2, 3, 1, 4], [True, True, False, True, True, False],
                       torch.float32, 1e-6)


def test_conv_prefill_refuses_kernels_longer_than_4():
    with pytest.raises(ValueError, match="conv kernels of 2 to 4 taps"):
        check_conv_prefill(1, 16, 16, [70], [0], [False], torch.float32, 1e-6, K=5)


def test_triton_layer_refuses_a_longer_conv_kernel_when_built():
    """A model with a 5-tap conv is refused when its triton layer is built, not at its first
    prefill; the torch backend builds it."""
    cfg = tiny_config(K=5)
    with pytest.raises(ValueError, match="backend 'triton' runs conv kernels of 2 to 4 taps.*is 5"):
        GDNLayer(cfg, 0, backend="triton", device=DEV)
    GDNLayer(cfg, 0, backend="torch", device="cpu")


@triton.jit
def _copy_from(x, out, i, n, B: tl.constexpr):
    o = tl.arange(0, B)
    tl.store(out + o, tl.load(x + i + o, mask=i + o < n, other=0.0))


@pytest.mark.skipif(CUDA, reason="checks what the CPU tests' interpreter checks")
def test_interpreter_refuses_reads_outside_the_arguments():
    """conftest makes the interpreter check every load and store the mask lets through against
    the launch's tensor arguments (tests/interp_bounds.py): the CPU tests then catch reads past a
    buffer, which a GPU may or may not fault on."""
    assert interp_bounds.install(), interp_bounds.INSTALLED
    x, out = torch.randn(8), torch.zeros(4)
    _copy_from[(1,)](x, out, 4, 8, B=4)                 # elements 4..7: inside
    _copy_from[(1,)](x, out, 6, 8, B=4)                 # 8 and 9 masked off
    assert torch.equal(out, torch.cat([x[6:], torch.zeros(2)]))
    with pytest.raises(Exception, match="2 reads of 4 bytes outside every tensor argument"):
        _copy_from[(1,)](x, out, 6, 10, B=4)            # 8 and 9 let through


@pytest.mark.parametrize("key,value,message", [("rows", 24, "must divide the chunk length 64"),
                                               ("qk_heads", 3, "must be a power of two"),
                                               ("v_groups", 0, "must be a power of two"),
                                               ("ahead", 5, "must be 1 to 4 rows")])
def test_conv_prefill_refuses_launch_settings_it_cannot_take(monkeypatch, key, value, message):
    monkeypatch.setitem(tri()[1].LAUNCH, key, value)
    with pytest.raises(ValueError, match=re.escape(f"LAUNCH['{key}'] {message}")):
        check_conv_prefill(1, 16, 16, [70], [0], [False], torch.float32, 1e-6)


def test_gated_rmsnorm_matches_reference():
    *_, norm, _ = tri()
    o, z = torch.randn(37, 3, 24), torch.randn(37, 3 * 24 + 5)[:, :72].reshape(37, 3, 24)
    w = torch.randn(24)
    got = norm.gated_rmsnorm(o.to(DEV), z.to(DEV), w.to(DEV), 1e-6)
    assert rel_err(got.cpu(), ref.gated_rmsnorm(o, z, w, 1e-6)) < 1e-6


def check_triton_layer_against_torch(cfg, full, steps, num_slots, tol=1e-5, dtype=torch.float32):
    """The Triton layer in `dtype` over `steps`, step by step against the fp32 torch layer with the
    same weights (its outputs in `dtype`); after the last step both caches (conv and recurrent
    state of every slot) must agree too, which also covers state that no later output reads.
    For a 16-bit dtype a step's output may also miss `tol` by up to twice the error of the torch
    layer run in that dtype on the same steps: some random steps are ill-conditioned in 16 bits
    (a decode row whose output the gated norm scales up), and both implementations lose the same
    digits there (fp16, one seed in CI: 1.4e-2 for Triton, 1.9e-2 for torch, in one decode step)."""
    ref_cache = StateCache(cfg, [0], num_slots, tp_size=1)
    want = run_steps({0: GDNLayer.from_full(cfg, 0, full, backend="torch")}, ref_cache, steps)
    bound = [tol] * len(steps)
    if dtype != torch.float32:
        same = run_steps({0: GDNLayer.from_full(cfg, 0, full, backend="torch", dtype=dtype)},
                         StateCache(cfg, [0], num_slots, dtype=dtype, tp_size=1), steps)
        bound = [max(tol, 2 * rel_err(h.float(), w)) for h, w in zip(same[0], want[0])]
    cache = StateCache(cfg, [0], num_slots, dtype=dtype, device=DEV, tp_size=1)
    got = run_steps({0: GDNLayer.from_full(cfg, 0, full, backend="triton", device=DEV, dtype=dtype)}, cache, steps)
    for n, (g, w) in enumerate(zip(got[0], want[0])):
        assert g.dtype == dtype and rel_err(g.cpu(), w) < bound[n], (f"step {n}", rel_err(g.cpu(), w), bound[n])
    assert rel_err(cache.conv[0].cpu().float(), ref_cache.conv[0]) < tol
    assert rel_err(cache.ssm[0].cpu(), ref_cache.ssm[0]) < tol


@pytest.mark.parametrize("K", [4, 3])
def test_triton_layer_matches_torch_layer_on_mixed_workload(seed, K):
    """Prefill, decode and mixed steps; K = 3: the conv walk's oldest row meets a zero weight, and
    the decode kernel shifts a 2-row conv state."""
    cfg = tiny_config(nk=2, nv=4, dk=16, dv=16, layers=2, K=K)
    full = random_full_weights(cfg, seed)
    check_triton_layer_against_torch(cfg, full, mixed_workload(cfg.hidden_size, seed), 8)


def check_tiny_triton_layer(seed, steps, num_slots=4):
    """check_triton_layer_against_torch on the tiny layer (2/4 heads, dk = dv = 16) over `steps`,
    each a WorkloadBuilder.step list of (slot, length, continue_from_slot)."""
    cfg = tiny_config(nk=2, nv=4, dk=16, dv=16, layers=2)
    w = WorkloadBuilder(cfg.hidden_size, seed)
    for step in steps:
        w.step(step)
    check_triton_layer_against_torch(cfg, random_full_weights(cfg, seed), w.steps, num_slots)


def fused_full_dv(n_seq, nv, dv, dtype=None, num_chunks=None, qk_normed=False):
    """A choose_path stand-in: every prefill on the fused path, one block spanning dv."""
    return "fused", max(16, 1 << (dv - 1).bit_length())


def test_triton_layer_in_float16_matches_torch_layer(seed):
    """float16 weights and activations through the Triton backend (the interpreter computes the
    16-bit tiles, unlike bf16) against the fp32 torch layer with the same fp16-rounded weights."""
    cfg = tiny_config(nk=2, nv=4, dk=16, dv=16, layers=2)
    full = {k: v.half().float() if v.dim() > 1 else v for k, v in random_full_weights(cfg, seed).items()}
    steps = mixed_workload(cfg.hidden_size, seed)[:5]       # prefills, decodes, then a mixed batch
    check_triton_layer_against_torch(cfg, full, steps, 8, tol=1e-2, dtype=torch.float16)


def check_fused_gated_norm(lens, nk, nv, dk, dv, dtype, tol):
    """The fused pass storing the gated norm of o (z read at a column offset of a wider buffer)
    against the fp64 core followed by the reference gated RMSNorm; final states too."""
    chunk, *_ = tri()
    T, S = sum(lens), len(lens) + 1
    q, k, v, a, b, A_log, dt_bias, pool = raw_inputs(T, nk, nv, dk, dv, dtype, S)
    z = torch.randn(T, nv * dv + 5, dtype=torch.float64)
    w = torch.rand(dv, dtype=torch.float64) + 0.5
    batch = Batch(lens, list(range(len(lens))), [i % 2 == 0 for i in range(len(lens))])
    pool64 = pool.clone()
    want = ref.gated_rmsnorm(reference_core(q, k, v, a, b, A_log, dt_bias, pool64, batch),
                             z[:, 5:].reshape(T, nv, dv), w, 1e-6)
    c = lambda x: x.reshape(T, -1).to(DEV, dtype)
    out, pool_t = torch.empty(T, nv * dv, device=DEV, dtype=dtype), pool.float().to(DEV)
    chunk.chunk_delta_rule_varlen(c(q), c(k), c(v), c(a), c(b), A_log.float().to(DEV), dt_bias.float().to(DEV),
                                  pool_t, out, batch.meta(DEV), 0, 0, 0, nk, nv, dk, dv, normalize_qk=True,
                                  path="fused", BV=max(16, 1 << (dv - 1).bit_length()),
                                  gated_norm=(c(z), 5, w.float().to(DEV), 1e-6))
    assert rel_err(out.cpu().reshape(T, nv, dv), want) < tol
    assert rel_err(pool_t.cpu(), pool64) < tol


def test_fused_pass_forms_the_gated_norm():
    tiny_fused_or_skip("fused")
    check_fused_gated_norm([130, 2, 64, 65], 1, 2, 16, 16, torch.float32, 1e-5)


def test_gated_norm_is_refused_where_the_pass_splits_dv():
    chunk, *_ = tri()
    q, k, v, a, b, A_log, dt_bias, pool = (x.float().to(DEV) for x in raw_inputs(70, 1, 1, 16, 32, torch.float32))
    with pytest.raises(ValueError, match="one dv block only"):
        chunk.chunk_delta_rule_varlen(q.reshape(70, -1), k.reshape(70, -1), v.reshape(70, -1), a, b, A_log, dt_bias,
                                      pool, torch.empty(70, 32, device=DEV), Batch([70], [0], [False]).meta(DEV),
                                      0, 0, 0, 1, 1, 16, 32, normalize_qk=True, path="split",
                                      gated_norm=(v.reshape(70, -1), 0, A_log, 1e-6))


def test_triton_layer_with_the_norm_inside_the_fused_pass_matches_torch_layer(seed, monkeypatch):
    """With FUSE_NORM, the layer's prefill-only steps take the fused pass with the norm inside
    (the path forced here: the interpreter computes in fp32, where choose_path keeps the split
    path); steps with decodes do not."""
    tiny_fused_or_skip("fused")
    chunk, *_, ops = tri()
    monkeypatch.setattr(chunk, "choose_path", fused_full_dv)
    monkeypatch.setattr(ops, "choose_path", fused_full_dv)
    monkeypatch.setattr(ops, "FUSE_NORM", True)     # off by default (slower on an H200)
    fused_calls = []
    real = ops.gdn_mix
    monkeypatch.setattr(ops, "gdn_mix", lambda *a, **kw: fused_calls.append("gated_norm" in kw) or real(*a, **kw))
    check_tiny_triton_layer(seed, [
        [(0, 70, False), (1, 130, False), (2, 3, False)],          # prefill only: norm inside
        [(0, 1, True), (1, 1, True)],                              # decode: norm kernel
        [(0, 65, True), (2, 64, True), (3, 2, False)],             # continued prefills: norm inside
        [(1, 5, True), (0, 1, True)]])                             # mixed: norm kernel
    assert fused_calls == [True, False, True, False]


@pytest.mark.parametrize("renorm", [True, False])
def test_triton_layer_on_the_fused_path_matches_torch_layer(seed, monkeypatch, renorm):
    """The layer's prefills on the fused path (forced; the interpreter's fp32 keeps the split path)
    with the fused pass normalising the conv's normalised q/k again (FUSED_RENORM_MIN_BV, lowered
    here to the tiny dv block) or not: both match the torch layer."""
    tiny_fused_or_skip("fused")
    chunk, *_, ops = tri()
    monkeypatch.setattr(chunk, "choose_path", fused_full_dv)
    monkeypatch.setattr(chunk, "FUSED_RENORM_MIN_BV", 16 if renorm else 1 << 30)
    norm_flags = []
    real_launch = chunk.launch
    monkeypatch.setattr(chunk, "launch", lambda kernel, grid, *a, **kw: (
        kernel is chunk._fused_pass_kernel and norm_flags.append(kw["NORM_QK"])) or real_launch(kernel, grid, *a, **kw))
    check_tiny_triton_layer(seed, [[(0, 70, False), (1, 130, False), (2, 3, False)],
                                   [(0, 65, True), (2, 64, True), (1, 1, True), (3, 2, False)]])
    assert norm_flags and set(norm_flags) == {renorm}


def test_triton_layer_on_the_scan_path_matches_torch_layer(seed, monkeypatch):
    """The layer with every prefill on the scan path at one-chunk segments: decodes between the
    prefill sequences of a batch, continued prefills, and sequences of one segment."""
    chunk, *_ = tri()
    scans = []
    real_bvs = chunk.scan_bvs
    monkeypatch.setattr(chunk, "choose_path", lambda *a, **kw: ("scan", None))
    monkeypatch.setattr(chunk, "scan_bvs", lambda *a: scans.append(a) or real_bvs(*a))
    monkeypatch.setitem(chunk.SCAN, "seg_chunks", 1)
    check_tiny_triton_layer(seed, [[(0, 200, False), (1, 1, False), (2, 64, False)],
                                   [(1, 1, True), (0, 130, True), (2, 1, True), (3, 2, False)]])
    assert [a[0] for a in scans] == [4 + 1, 3 + 1]      # segments per step: 200 + 64, then 130 + 2 tokens


# -- GPU: real shapes, bfloat16, and fla-core as a peer -------------------------------------------
GPU_PATHS = [(torch.bfloat16, 1e-2, "split", None), (torch.float32, 1e-5, "split", None),
             (torch.bfloat16, 1e-2, "fused", 64), (torch.bfloat16, 1e-2, "fused", 128),
             (torch.bfloat16, 1e-2, "scan", None), (torch.float32, 1e-5, "scan", None)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol,path,BV", GPU_PATHS)
@pytest.mark.parametrize("nk,nv", [(4, 4), (4, 8), (2, 8)])
def test_gpu_prefill_real_dims_matches_fp64(nk, nv, dtype, tol, path, BV):
    """The scan path at segments of 4 chunks: the 2100-token sequence spans 9, the 1000-token one 4."""
    run_prefill([1000, 64, 65, 2100, 130, 2, 63, 517], nk, nv, 128, 128, dtype, tol, path=path, BV=BV,
                seg_chunks=4 if path == "scan" else None)


@pytest.mark.gpu
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 8e-3), (torch.float32, 2e-5)])
def test_gpu_solve_real_dims_against_fp64(dtype, tol, hard):
    """The compiled solve on real dims; bf16 T is stored in bf16, whose rounding (2^-9 relative)
    sets the tolerance."""
    check_solve([1000, 64, 65, 130, 2, 63], 4, 8, 128, dtype, tol, hard)


@pytest.mark.gpu
@pytest.mark.parametrize("nk,nv", [(4, 8), (2, 8)])
def test_gpu_fused_gated_norm_real_dims_bf16(nk, nv):
    check_fused_gated_norm([1000, 64, 65, 2100, 130, 2, 63, 517], nk, nv, 128, 128, torch.bfloat16, 1e-2)


@pytest.mark.gpu
def test_gpu_conv_prefill_real_dims_bf16():
    """Head-wide q/k blocks of 128 channels and several v blocks, the last one partial."""
    check_conv_prefill(4, 128, 8 * 128 + 64, [1000, 64, 65, 2, 130, 517, 3], [5, 0, 2, 3, 1, 4, 6],
                       [True, True, False, True, False, True, True], torch.bfloat16, 1e-2, S=7)


@triton.jit
def _exp_both_ways(x, y_ftz, y_exp, n, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    m = o < n
    v = tl.load(x + o, mask=m, other=0.0)
    tl.store(y_ftz + o, exp_ftz(v, True), mask=m)
    tl.store(y_exp + o, exp_ftz(v, False), mask=m)


def test_exp_ftz_against_torch_exp():
    """triton_common.exp_ftz on fresh random fp32 inputs, against torch.exp in float64: within the
    approximate exp's error where exp(x) is a normal fp32 number, both settings. Below 2^-126,
    FTZ=True gives 0 when compiled (ex2.approx.ftz) and the interpreter's tl.exp otherwise;
    FTZ=False is tl.exp, whose results there are subnormal or 0."""
    x = torch.cat([torch.empty(4000).uniform_(-85.0, 85.0), torch.empty(1000).uniform_(-100.0, -87.5),
                   torch.tensor([float("-inf"), 0.0, -87.0, -88.0])]).to(DEV)
    y_ftz, y_exp = torch.empty_like(x), torch.empty_like(x)
    _exp_both_ways[(triton.cdiv(x.numel(), 1024),)](x, y_ftz, y_exp, x.numel(), B=1024)
    want = torch.exp(x.double())
    normal = want >= 2.0 ** -126
    assert normal.sum() > 4000 and (~normal).sum() > 900
    for y in (y_ftz, y_exp):
        # ex2.approx of x log2(e): the product's rounding costs up to |x| 2^-24 relative, 85 at most here
        assert ((y.double() - want).abs() / want)[normal].max() < 1e-5
    assert torch.all(y_exp[~normal].double() <= 2.0 ** -126)
    if _COMPILED:
        assert torch.all(y_ftz[~normal] == 0)
    else:
        assert torch.equal(y_ftz, y_exp)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,BV", [(torch.float32, 64), (torch.bfloat16, 32)])
def test_gpu_fused_path_refuses_what_miscompiles(dtype, BV):
    with pytest.raises(ValueError, match="fused prefill path takes 16-bit inputs and BV >= 64"):
        run_prefill([100], 1, 2, 128, 128, dtype, 1e-2, path="fused", BV=BV)


@pytest.mark.gpu
@pytest.mark.parametrize("BV", [16, 32, 64, 128])
def test_gpu_prefill_any_dv_split_gives_the_same_result(BV):
    *_, ops = tri()
    q, k, v, a, b, A_log, dt_bias, pool = (x.to(DEV) for x in raw_inputs(700, 2, 4, 128, 128, torch.float64))
    batch = Batch([300, 400], [0, 1], [True, False])
    c = lambda x: x.to(torch.bfloat16)
    outs = []
    for bv in (BV, 128):
        p = pool.float().clone()
        outs.append((ops.gdn_prefill(c(q), c(k), c(v), c(a), c(b), A_log.float(), dt_bias.float(), p, batch,
                                     BV=bv), p))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.gpu
@pytest.mark.parametrize("N,nv", [(1, 32), (256, 32), (7, 8)])
def test_gpu_decode_core_matches_fp64(N, nv):
    *_, ops = tri()
    nk, dk, dv = nv // 2, 128, 128
    q, k, v, a, b, A_log, dt_bias, pool = raw_inputs(N, nk, nv, dk, dv, torch.float64, S=N + 3)
    batch = Batch([1] * N, list(range(N + 2, 2, -1))[:N], [i % 3 != 1 for i in range(N)])
    pool64 = pool.clone()
    want = reference_core(q, k, v, a, b, A_log, dt_bias, pool64, batch)
    x = torch.cat([q.reshape(N, -1), k.reshape(N, -1), v.reshape(N, -1), b, a], 1).to(DEV, torch.bfloat16)
    p = pool.float().to(DEV)
    got = ops.gdn_decode(x, nk, nv, dk, dv, A_log.float().to(DEV), dt_bias.float().to(DEV), p, batch)
    assert rel_err(got.cpu(), want) < 1e-2
    assert rel_err(p.cpu(), pool64) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_gpu_decode_steps_with_pdl_equal_plain_launches(monkeypatch, B):
    """The decode kernel launched to start while in_proj's product still runs (PDL; it loads the
    state before it waits for the projection), and the norm (64 sequences) or out_proj's few-row
    product forming the norm (one sequence) launched the same way after it: the same bits as plain
    launches, over steps of fresh inputs, eager and from a graph, at a rank's real dims."""
    from tp_gdn.graphs import GraphedDecoder
    from tp_gdn.kernels import triton_gemv
    from tp_gdn.kernels.triton_common import pdl_possible

    triton_decode, triton_norm = tri()[2:4]
    if not pdl_possible(torch.device(DEV)):
        pytest.skip("PDL needs compute capability 9.0 or above")
    cfg = tiny_config(nk=8, nv=16, dk=128, dv=128, H=2048, layers=1)
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg, 2), dtype=torch.bfloat16, device=DEV)
    base = StateCache(cfg, [0], B, dtype=torch.bfloat16, device=DEV, tp_size=1)
    layer(torch.randn(8 * B, 2048, device=DEV, dtype=torch.bfloat16), Batch([8] * B, list(range(B)), [False] * B), base)
    xs = [torch.randn(B, 2048, device=DEV, dtype=torch.bfloat16) for _ in range(4)]
    runs = []
    for pdl in (False, True):
        for module in (triton_decode, triton_norm, triton_gemv):
            monkeypatch.setattr(module, "PDL", pdl)
        caches = []
        for _ in range(2):
            c = StateCache(cfg, [0], B, dtype=torch.bfloat16, device=DEV, tp_size=1)
            c.conv[0].copy_(base.conv[0]), c.ssm[0].copy_(base.ssm[0])
            caches.append(c)
        slots = list(range(B - 1, -1, -1))
        eager = [layer(x, Batch([1] * B, slots, [True] * B), caches[0]) for x in xs]
        decoder = GraphedDecoder({0: layer}, caches[1])
        decoder.prepare(B)                   # captured under this setting
        graphed = [decoder(x, slots)[0].clone() for x in xs]
        runs.append((eager, graphed, caches))
    (e0, g0, c0), (e1, g1, c1) = runs
    for n in range(len(xs)):
        assert torch.equal(e1[n], e0[n]) and torch.equal(g1[n], g0[n]) and torch.equal(g1[n], e1[n]), n
    for c in c0[1:] + c1:
        assert torch.equal(c.ssm[0], c0[0].ssm[0]) and torch.equal(c.conv[0], c0[0].conv[0])


def fla_or_skip():
    return pytest.importorskip("fla.ops.gated_delta_rule")


@pytest.mark.gpu
def test_gpu_prefill_agrees_with_fla_core():
    fla = fla_or_skip()
    *_, ops = tri()
    lens = [1000, 64, 65, 2100]
    q, k, v, a, b, A_log, dt_bias, pool = (x.to(DEV) for x in raw_inputs(sum(lens), 4, 8, 128, 128, torch.float64))
    bf = lambda x: x.to(torch.bfloat16)
    batch = Batch(lens, [0, 1, 2, 3], [True] * 4)
    h0 = pool[:4].float()
    ours = ops.gdn_prefill(bf(q), bf(k), bf(v), bf(a), bf(b), A_log.float(), dt_bias.float(), h0.clone(), batch)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    cu = torch.tensor(batch.cu_seqlens, device=DEV, dtype=torch.long)
    theirs, _ = fla.chunk_gated_delta_rule(bf(q)[None], bf(k)[None], bf(v)[None], g[None], torch.sigmoid(b.float())[None],
                                           initial_state=h0.clone(), output_final_state=True, cu_seqlens=cu,
                                           use_qk_l2norm_in_kernel=True)
    assert rel_err(ours, theirs[0]) < 1e-2


@pytest.mark.gpu
def test_gpu_decode_agrees_with_fla_core():
    fla = fla_or_skip()
    *_, ops = tri()
    N, nk, nv, dk, dv = 16, 16, 32, 128, 128
    q, k, v, a, b, A_log, dt_bias, pool = (x.to(DEV) for x in raw_inputs(N, nk, nv, dk, dv, torch.float64, S=N))
    bf = lambda x: x.to(torch.bfloat16)
    x = bf(torch.cat([q.reshape(N, -1), k.reshape(N, -1), v.reshape(N, -1), b, a], 1))
    p = pool.float().clone()
    ours = ops.gdn_decode(x, nk, nv, dk, dv, A_log.float(), dt_bias.float(), p, Batch([1] * N, list(range(N)), [True] * N))
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    theirs, _ = fla.fused_recurrent_gated_delta_rule(bf(q)[:, None], bf(k)[:, None], bf(v)[:, None], g[:, None],
                                                     beta=torch.sigmoid(b.float())[:, None], initial_state=pool.float(),
                                                     output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert rel_err(ours, theirs[:, 0]) < 1e-2


@pytest.mark.parametrize("M,N,K", [(1, 37, 100), (3, 64, 64), (4, 50, 700)])
def test_few_rows_product_matches_fp64(M, N, K):
    """triton_gemv: rows of x times a weight whose rows and columns are not whole blocks, into a
    new tensor, and into a view of a larger one (launched under PDL on a GPU that has it)."""
    from tp_gdn.kernels.triton_gemv import gemv
    dt = torch.bfloat16 if CUDA else torch.float32
    x, w = torch.randn(M, K, dtype=torch.float64), torch.randn(N, K, dtype=torch.float64)
    want = x @ w.T
    got = gemv(x.to(DEV, dt), w.to(DEV, dt))
    assert got.shape == (M, N) and got.dtype == dt
    assert rel_err(got.cpu().double(), want) < (1e-2 if CUDA else 1e-6)
    big = torch.zeros(M, N + 5, device=DEV, dtype=dt)
    gemv(x.to(DEV, dt), w.to(DEV, dt), out=big[:, 2:N + 2], pdl=True)
    assert torch.equal(big[:, 2:N + 2], got) and not big[:, :2].any() and not big[:, N + 2:].any()


def test_few_rows_product_refuses_what_it_does_not_take():
    from tp_gdn.kernels.triton_gemv import ROWS, gemv
    w = torch.randn(8, 16, device=DEV)
    with pytest.raises(ValueError, match=f"1 to {ROWS} rows"):
        gemv(torch.randn(ROWS + 1, 16, device=DEV), w)
    with pytest.raises(ValueError, match="packed rows"):
        gemv(torch.randn(1, 16, device=DEV), torch.randn(16, 8, device=DEV).t())
    with pytest.raises(ValueError, match=r"out must be \[1, 8\]"):
        gemv(torch.randn(1, 16, device=DEV), w, out=torch.empty(1, 9, device=DEV))


def same_but_for_sum_order(a, b) -> bool:
    """Outputs of the gated norm inside the few-row product against the norm kernel's then the
    plain product: bit-equal in the interpreter, which sums each head's squares in the same order
    both ways. A GPU may sum them in another order: fp32 outputs then differ in their last bits,
    and a 16-bit normed value may round the other way now and then."""
    if not CUDA:
        return torch.equal(a, b)
    return rel_err(a.float(), b.float()) < (1e-6 if a.dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("heads,dv,dtype", [(16, 16, torch.float32), (5, 32, torch.bfloat16), (12, 128, torch.float16),
                                          (40, 128, torch.bfloat16)])
def test_few_rows_product_forms_the_gated_norm(heads, dv, dtype):
    """gemv(norm=...): x is a row of the mixer's o and the product is of its gated norm, with z a
    strided view of a projection: triton_norm's kernel and then the plain product
    (same_but_for_sum_order), and within rounding of fp64 norm-then-product. K = 5 x 32 is not a
    power of two (the piece's padding heads are masked), and K = 40 x 128 is more than one piece
    of BK = 4096. Its q|k conv-state shift (two decode sequences among three, channel blocks of
    BC = 1024 at 2 x 640 channels: four programs) leaves the conv pool as the decode kernel's own
    shift launch does."""
    from tp_gdn.kernels.triton_decode import _shift_qk_state_kernel, qk_shift_launch
    from tp_gdn.kernels.triton_gemv import gemv
    from tp_gdn.kernels.triton_norm import gated_rmsnorm

    K, N, M = heads * dv, 70, 1
    o = torch.randn(M, K, dtype=torch.float64)
    proj = torch.randn(M, 3 * K + 9, dtype=torch.float64)
    z = proj[:, K + 4:2 * K + 4]
    w, nw = torch.randn(N, K, dtype=torch.float64) / K ** 0.5, 1 + 0.3 * torch.randn(dv, dtype=torch.float64)
    want = ref.gated_rmsnorm(o.view(M, heads, dv), z.reshape(M, heads, dv), nw, 1e-6).reshape(M, K) @ w.T
    od, zd, wd, nwd = o.to(DEV, dtype), proj.to(DEV, dtype)[:, K + 4:2 * K + 4], w.to(DEV, dtype), nw.float().to(DEV)
    got = gemv(od, wd, norm=(zd, nwd, 1e-6, None))
    apart = gemv(gated_rmsnorm(od.view(M, heads, dv), zd.view(M, heads, dv), nwd, 1e-6).view(M, K), wd)
    assert same_but_for_sum_order(got, apart)
    assert rel_err(got.cpu().double(), want) < (1e-2 if dtype != torch.float32 else 1e-5)

    # the shift: batch of a decode sequence, a prefill of 3 tokens and another decode sequence
    nqk, W = 1280, 3
    batch = Batch([1, 3, 1], [4, 0, 2], [True, True, False])
    meta = batch.meta(DEV)
    sproj = torch.randn(5, nqk + 40, device=DEV, dtype=dtype)
    pool = torch.randn(6, W, nqk + 64, device=DEV, dtype=dtype)
    before, want_pool = pool.clone(), pool.clone()
    shift = qk_shift_launch(sproj, want_pool, meta, nqk)
    _shift_qk_state_kernel[(meta.num_decode, shift["blocks"])](*shift["args"], **shift["meta"])
    gemv(od, wd, norm=(zd, nwd, 1e-6, (sproj, pool, meta, nqk)))
    assert not torch.equal(want_pool, before) and torch.equal(pool, want_pool)
    assert torch.equal(pool[:, :, nqk:], before[:, :, nqk:]) and torch.equal(pool[[0, 1, 3, 5]], before[[0, 1, 3, 5]])


def test_few_rows_product_refuses_a_norm_it_cannot_form():
    from tp_gdn.kernels import triton_ops
    from tp_gdn.kernels.triton_gemv import gemv
    x, w, nw = torch.randn(1, 96, device=DEV), torch.randn(8, 96, device=DEV), torch.ones(24, device=DEV)
    with pytest.raises(ValueError, match="power-of-two dv"):
        gemv(x, w, norm=(torch.randn(1, 96, device=DEV), nw, 1e-6, None))           # dv 24
    with pytest.raises(ValueError, match="z \\(1, 64\\)"):
        gemv(x, w, norm=(torch.randn(1, 64, device=DEV), torch.ones(32, device=DEV), 1e-6, None))
    with pytest.raises(ValueError, match="one row"):
        gemv(x.repeat(2, 1), w, norm=(torch.randn(2, 96, device=DEV), torch.ones(32, device=DEV), 1e-6, None))
    product = triton_ops.few_rows_product(pdl=False)
    assert not product.takes_norm(1, 96, 24) and product.takes_norm(1, 96, 32) and not product.takes_norm(2, 96, 32)
    with pytest.raises(ValueError, match="does not form the gated norm"):
        product(x, w, norm=(torch.randn(1, 96, device=DEV), nw, 1e-6, None))


def test_layer_forms_the_gated_norm_in_its_one_token_product(monkeypatch, seed):
    """Calls of one token (decode steps, and a fresh one-token prefill) form the gated norm inside
    out_proj's product, with the q|k conv-state shift: no norm launch, and the same outputs
    (same_but_for_sum_order) and caches (bit for bit) as the norm kernel then the product
    (triton_gemv.NORM_IN_PRODUCT off), which check_triton_layer_against_torch holds to the fp32
    torch layer (in fp16: the interpreter computes 16-bit tiles in fp16, not in bf16)."""
    from tp_gdn.kernels import triton_gemv, triton_ops

    cfg = tiny_config(nk=2, nv=4, dk=16, dv=16, layers=1, K=4)
    full = {k: v.half().float() if v.dim() > 1 else v for k, v in random_full_weights(cfg, seed).items()}
    w = WorkloadBuilder(cfg.hidden_size, seed)
    w.step([(0, 9, False), (1, 20, False)])
    for s in (0, 1, 0, 2, 2, 1):      # slot 2 starts with one token (no state), then goes on
        w.step([(s, 1, s != 2 or len(w.steps) > 4)])
    norms = []
    real = triton_ops.gated_rmsnorm
    monkeypatch.setattr(triton_ops, "gated_rmsnorm", lambda *a, **k: norms.append(a[0].shape[0]) or real(*a, **k))
    runs = []
    for on in (True, False):
        monkeypatch.setattr(triton_gemv, "NORM_IN_PRODUCT", on)
        norms.clear()
        cache = StateCache(cfg, [0], 3, dtype=torch.float16, device=DEV, tp_size=1)
        layer = GDNLayer.from_full(cfg, 0, full, backend="triton", device=DEV, dtype=torch.float16)
        runs.append((run_steps({0: layer}, cache, w.steps)[0], cache, list(norms)))
    (fused, c1, n1), (apart, c0, n0) = runs
    assert n1 == [29] and n0 == [29] + [1] * 6      # the first step's prefill takes the norm kernel
    for n, (a, b) in enumerate(zip(fused, apart)):
        assert same_but_for_sum_order(a, b), n
    assert torch.equal(c1.conv[0], c0.conv[0]) and torch.equal(c1.ssm[0], c0.ssm[0])
    check_triton_layer_against_torch(cfg, full, w.steps, 3, tol=1e-2, dtype=torch.float16)


def test_host_cdiv_and_next_pow2():
    from tp_gdn.kernels.triton_common import cdiv, next_pow2
    for n in range(0, 300):
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_launch_key_separates_what_triton_specialises_on():
    """triton_common._specialise against Triton's own argument specialisation
    (native_specialize_impl, on CPU tensors and ints): arguments with one key never differ in
    Triton's, so a compiled kernel reused by launch() is one Triton would have chosen."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from tp_gdn.kernels.triton_common import _specialise
    buf = torch.randn(4096, dtype=torch.float32)
    args = [buf[i:] for i in range(0, 40, 3)] + [buf.to(torch.bfloat16)[i:] for i in range(9)] + \
        [1, 0, 2, 15, 16, 17, 32, 48, 1 << 31, (1 << 31) - 16, -(1 << 31), -16, 1 << 33, (1 << 33) + 1, (1 << 63) + 16, 0.5, True]
    by_key = {}
    for a in args:
        theirs = native_specialize_impl(BaseBackend, a, False, True, True)
        key, call = _specialise([a])
        assert call == [a.data_ptr() if isinstance(a, torch.Tensor) else a]
        by_key.setdefault(key, set()).add(str(theirs))
    assert all(len(v) == 1 for v in by_key.values()), by_key
    assert len(by_key) == 12   # 2 dtypes x aligned or not; int 1, i32 /16 or not, i64 /16 or not, u64; float; bool
    assert _specialise([buf, "text"]) is None


@pytest.mark.gpu
def test_gpu_short_launch_matches_tritons_own_launches(seed, monkeypatch):
    """triton_common.launch's short path against Triton's own launches (FAST_LAUNCH off): the same
    sequence of calls, bit-equal outputs and states. The calls repeat batches (prefill, decode,
    mixed) so that most launches take the short path, and call the core on q/k/v views whose
    start moves by one element (2 bytes) and back, which Triton specialises on (16-byte
    alignment): a short path that ignored it would reuse the aligned kernel. Afterwards every
    launch of the layer's kernels has a short-path entry."""
    from tp_gdn.kernels import triton_common as tc
    if not tc.FAST_LAUNCH:
        pytest.skip("this Triton (or TP_GDN_FAST_LAUNCH=0) has no short launch path")
    *_, ops = tri()
    cfg = tiny_config(nk=4, nv=8, dk=128, dv=128, H=512, K=4, layers=1)
    full = random_full_weights(cfg, seed)
    bf = torch.bfloat16
    batches = [Batch([300, 77], [0, 1], [False, False]), Batch([1, 1], [0, 1], [True, True]),
               Batch([1, 130, 1], [0, 2, 1], [True, False, True])] * 2
    xs = [torch.randn(b.num_tokens, cfg.hidden_size).to(DEV, bf) for b in batches]
    T, nk, nv = 200, 4, 8
    q, k, v, a, b, A_log, dt_bias, pool = (t.to(DEV) for t in raw_inputs(T, nk, nv, 128, 128, bf, 3))
    flat = [torch.cat([t.to(bf).flatten(), t.new_zeros(1, dtype=bf)]) for t in (q, k, v)]   # one spare element
    core_batch = Batch([120, 80], [0, 1], [True, False])

    def calls(fast):
        monkeypatch.setattr(tc, "FAST_LAUNCH", fast)
        layer = GDNLayer.from_full(cfg, 0, full, backend="triton", device=DEV, dtype=bf)
        cache = StateCache(cfg, [0], 3, device=DEV, dtype=bf, tp_size=1)
        outs = [layer(x, batch, cache) for x, batch in zip(xs, batches)]
        p = pool.float().clone()
        for off in (0, 1, 0, 1):      # views that start 0 or 2 bytes into the buffers
            c = lambda t, n: t[off:off + T * n * 128].view(T, n, 128)
            outs.append(ops.gdn_prefill(c(flat[0], nk), c(flat[1], nk), c(flat[2], nv), a.to(bf), b.to(bf),
                                        A_log.float(), dt_bias.float(), p, core_batch))
        torch.cuda.synchronize()
        return outs + [cache.conv[0], cache.ssm[0], p]

    want = calls(False)
    tc._LAUNCHES.clear()
    got = calls(True)
    for n, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), n
    names = {key[0].fn.__name__ for key in tc._LAUNCHES}
    assert {"_conv_prefill_kernel", "_intra_solve_kernel", "_decode_kernel", "_gated_rmsnorm_kernel"} <= names
    assert all(entry is not None for entry in tc._LAUNCHES.values()), \
        [key[0].fn.__name__ for key, entry in tc._LAUNCHES.items() if entry is None]
    aligned = {key[2][0][1] for key in tc._LAUNCHES if key[0].fn.__name__ == "_intra_solve_kernel"}
    assert aligned == {True, False}      # both specialisations of the core's k were launched


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_layer_real_dims_matches_fp32_torch_layer(seed, monkeypatch, dtype):
    """The whole layer as the benchmarks run it (Qwen3-Next-80B GDN dims, 16-bit, tp=1) against
    the fp32 torch layer with the same rounded weights: a prefill-only step that takes the fused
    path with one block spanning dv (4 sequences x 32 heads), decodes, a mixed step and a small
    prefill that takes the split path; the prefill paths taken are recorded and checked."""
    chunk, *_ = tri()
    taken = []
    real_choose = chunk.choose_path
    monkeypatch.setattr(chunk, "choose_path", lambda *a: taken.append(real_choose(*a)) or taken[-1])
    cfg = tiny_config(nk=16, nv=32, dk=128, dv=128, H=2048, K=4, layers=4)
    full = {k: v.to(dtype).float() if v.dim() > 1 else v for k, v in random_full_weights(cfg, seed).items()}
    w = WorkloadBuilder(cfg.hidden_size, seed)
    w.step([(0, 700, False), (1, 1030, False), (2, 64, False), (3, 513, False)])    # fused, BV 128
    for _ in range(2):
        w.step([(s, 1, True) for s in range(4)])                                    # decode kernel
    w.step([(0, 1, True), (1, 200, True), (4, 77, False), (2, 1, True)])            # mixed: fused, 64 pairs, BV 64
    w.step([(5, 300, False)])                                                       # 32 programs: split, BV 32
    want = run_steps({0: GDNLayer.from_full(cfg, 0, full, backend="torch", device=DEV)},
                     StateCache(cfg, [0], 6, device=DEV, tp_size=1), w.steps)
    cache = StateCache(cfg, [0], 6, device=DEV, dtype=dtype, tp_size=1)
    layer = GDNLayer.from_full(cfg, 0, full, backend="triton", device=DEV, dtype=dtype)
    got = run_steps({0: layer}, cache, w.steps)
    for n, (g, e) in enumerate(zip(got[0], want[0])):
        assert rel_err(g.float(), e) < 3e-2, f"step {n}"
    assert taken == [("fused", 128), ("fused", 64), ("split", 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("model_type,nk,nv", [("qwen3_next", 16, 32), ("qwen3_5", 16, 64)])
def test_gpu_tp8_shares_at_real_dims_sum_to_the_unsharded_layer(seed, model_type, nk, nv):
    """A tp=8 rank's kernels at its real shapes, on one GPU (issue 7's layouts: Qwen3-Next-80B, nk
    16 / nv 32, and a Qwen3.5-style nk 16 / nv 64; hidden 2048, dk = dv = 128, bf16): each of the
    eight shares of the layer (rank r of 8: its nk/8 key and nv/8 value heads and its column block
    of out_proj; no process group, so no all-reduce) runs the workload of the real-dims layer test
    on a cache of its own. Their outputs, summed in rank order as the all-reduce would, against the
    fp32 torch layer unsharded and against the bf16 Triton layer at tp=1; their recurrent states,
    side by side, against the unsharded fp32 layer's."""
    import torch.distributed as dist
    assert not dist.is_initialized(), "a process group would make each share all-reduce"
    bf = torch.bfloat16
    cfg = tiny_config(model_type, nk=nk, nv=nv, dk=128, dv=128, H=2048, K=4, layers=4)
    full = {k: v.to(bf).float() if v.dim() > 1 else v for k, v in random_full_weights(cfg, seed).items()}
    w = WorkloadBuilder(cfg.hidden_size, seed)
    w.step([(0, 700, False), (1, 1030, False), (2, 64, False), (3, 513, False)])
    for _ in range(2):
        w.step([(s, 1, True) for s in range(4)])
    w.step([(0, 1, True), (1, 200, True), (4, 77, False), (2, 1, True)])
    w.step([(5, 300, False)])
    want_cache = StateCache(cfg, [0], 6, device=DEV, tp_size=1)
    want = run_steps({0: GDNLayer.from_full(cfg, 0, full, backend="torch", device=DEV)}, want_cache, w.steps)[0]
    one = run_steps({0: GDNLayer.from_full(cfg, 0, full, backend="triton", device=DEV, dtype=bf)},
                    StateCache(cfg, [0], 6, device=DEV, dtype=bf, tp_size=1), w.steps)[0]
    parts, states = [], []
    for r in range(8):
        layer = GDNLayer.from_full(cfg, 0, full, tp_rank=r, tp_size=8, backend="triton", device=DEV, dtype=bf)
        assert (layer.nk, layer.nv) == (nk // 8, nv // 8) and layer.out_proj.all_reduce_kind(1) == "group"
        cache = StateCache(cfg, [0], 6, device=DEV, dtype=bf, tp_size=8)
        parts.append(run_steps({0: layer}, cache, w.steps)[0])
        states.append(cache.ssm[0])
    for n, e in enumerate(want):
        got = parts[0][n].float()
        for p in parts[1:]:
            got += p[n].float()
        assert rel_err(got, e) < 3e-2, f"step {n}: the shares' sum against the fp32 layer"
        assert rel_err(got, one[n].float()) < 3e-2, f"step {n}: the shares' sum against the tp=1 layer"
        assert rel_err(parts[0][n].float(), e) > 0.5, f"step {n}: one share alone should be far from the whole"
    assert rel_err(torch.cat(states, 1), want_cache.ssm[0]) < 3e-2


def test_kernel_resources_compiles_the_kernels_a_layer_call_launches_for_hopper():
    """benchmarks/kernel_resources.py (a subprocess: here the kernels are interpreted) compiles, for
    sm_90a and without running them, exactly the kernels of the split path's layer call, with
    plausible resources and each launch's program count."""
    import triton
    if not any((Path(triton.__file__).parent / "backends/nvidia/bin" / n).exists() for n in ("ptxas", "ptxas-blackwell")):
        pytest.skip("this Triton build has no ptxas")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(root / "benchmarks/kernel_resources.py"), "--heads", "1/2",
                          "--seqs", "1x130", "--ops"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = re.findall(r"^\s+(_\w+_kernel) .*?(\d+) warps (\d+) stages: +(\d+) regs, spills +(\d+) / +(\d+) B, "
                      r"shared +(\d+) B -> (\d+) per SM; (\d+) programs$", run.stdout, re.M)
    assert [r[0] for r in rows] == ["_conv_prefill_kernel", "_conv_state_update_kernel", "_intra_solve_kernel",
                                    "_split_overlap_kernel", "_gated_rmsnorm_kernel"], run.stdout
    for name, _, _, regs, *_, per_sm, _ in rows:
        assert 0 < int(regs) <= 255 and int(per_sm) >= 1, (name, regs, per_sm)
    ops = [dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)", line))
           for line in re.findall(r"^    instructions: (.*)$", run.stdout, re.M)]
    assert len(ops) == len(rows), run.stdout                 # --ops: one line under each kernel
    for r, o in zip(rows, ops):
        assert o["all"] > o["ldg"] > 0, (r[0], o)
    assert ops[0]["mufu"] > 0 and ops[2]["mma"] > 0, ops     # the conv's exps; the solve's tensor-core products
    programs = {r[0]: int(r[-1]) for r in rows}
    assert programs["_intra_solve_kernel"] == 3 * 2          # 3 chunks x 2 value heads
    # 1 sequence x 2 heads x (128 / BV 16) walking, and 3 chunks x 2 heads of step 2; two an SM at least
    # (split_overlap_fits, which the GPU checks on the kernel it compiled)
    assert programs["_split_overlap_kernel"] == 1 * 2 * 8 + 3 * 2
    assert int(rows[3][7]) >= 2, rows[3]
    bad = subprocess.run([sys.executable, str(root / "benchmarks/kernel_resources.py"), "--heads", "2/3"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "NV a multiple of NK" in bad.stderr


def test_kernel_resources_compiles_the_all_reduce_kernels_for_every_group_size():
    """The decode all-reduce's kernels, and the few-row product that pushes the flag-in-word
    words (also forming the gated norm, and that one without the push), compile for sm_90a at 3, 4
    and 8 ranks, as ranks 0 and 1, in bf16 and fp32
    (kernel_resources.py --all-reduce, a subprocess). Triton 3.6 (the GPU
    machines') failed on the flag-in-word kernel's push from 3 ranks up when it branched on the
    rank; this Triton may not be 3.6, so run it there too (the script's docstring says how)."""
    import triton
    if not any((Path(triton.__file__).parent / "backends/nvidia/bin" / n).exists() for n in ("ptxas", "ptxas-blackwell")):
        pytest.skip("this Triton build has no ptxas")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(root / "benchmarks/kernel_resources.py"), "--all-reduce", "3", "4", "8"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    groups = re.split(r"^== decode all-reduce, (\d+) ranks.*$", run.stdout, flags=re.M)[1:]
    assert [int(w) for w in groups[::2]] == [3, 4, 8], run.stdout
    for block in groups[1::2]:
        rows = re.findall(r"^\s+(_\w+_kernel) .*: +(\d+) regs,", block, re.M)
        # per dtype, rank 0 then 1: both all-reduces, the pushing product, the same forming the
        # gated norm, and (rank 0) the norming product without the push
        launches = ["_push_all_reduce_kernel", "_ll_all_reduce_kernel", "_gemv_kernel", "_gemv_kernel"]
        assert [r[0] for r in rows] == (launches + ["_gemv_kernel"] + launches) * 2, block
        assert all(0 < int(regs) <= 255 for _, regs in rows), block
    bad = subprocess.run([sys.executable, str(root / "benchmarks/kernel_resources.py"), "--all-reduce", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "group sizes of 2 or more" in bad.stderr


def test_kernel_resources_counts_instructions_by_kind():
    kr = load_benchmark("kernel_resources")
    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 LDG.E.128 R8, desc[UR6][R16.64] ;
        /*0020*/                   FFMA R2, R3, R4, R2 ;
        /*0030*/               @P1 MUFU.EX2 R5, R5 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0050*/                   STL [R1], R2 ;
        /*0060*/                   EXIT ;
        .L_x_0:
        /*0070*/                   BRA `(.L_x_0) ;
    """
    ops = kr.sass_ops(sass)
    assert ops["all"] == 8 and ops["ldg"] == 1 and ops["fp32"] == 1 and ops["mufu"] == 1
    assert ops["mma"] == 1 and ops["local"] == 1 and ops["stg"] == 0


def test_kernel_resources_programs_per_sm():
    kr = load_benchmark("kernel_resources")
    assert kr.programs_per_sm(255, 8, 73728) == 1           # the fused pass: registers bound it
    assert kr.programs_per_sm(127, 4, 1024) == 4            # the decode kernel
    assert kr.programs_per_sm(128, 8, 73728) == 2           # 128 registers at 8 warps: two would fit
    assert kr.programs_per_sm(20, 4, 512) == 16             # small kernels: warps per SM bound them
    assert kr.programs_per_sm(40, 1, 0) == 32               # programs per SM bound one-warp kernels
