"""Triton chunked gated delta rule for packed prefill sequences (chunk 64).

Three paths, all starting with the same launch:
  1. `_intra_solve_kernel`  (chunks x value heads, all parallel): gating from raw a/b, the
     in-chunk cumulative decay G, A = beta k k^T o Gamma (strictly lower) and T = (I + A)^-1
     diag(beta), solved on 16-row blocks in registers; only T's blocks on and below the diagonal
     are stored. (Below, T means this product: beta reaches every reader inside it.)
  2. `_intra_wu_kernel`     (chunks x value heads, all parallel): with 64-row products,
     w = T e^G k, u = T v, P = (q k^T o Gamma, j <= i), and the state-free parts
     Q' = e^G q - P w and O_c = P u of the chunk output.
  3. `_state_pass_kernel`   (sequences x value heads x dv blocks): walks the chunks in order,
     U = u - w S, o = O_c + Q' S, S <- e^{G_last} S + (e^{G_last - G} k)^T U, reading the initial
     state from the slot pool and writing the final state back in place (it holds S^T; see below).
That is the "split" path. On a Hopper GPU, steps 2 and 3 run as one launch where that fits
(`_split_overlap_kernel`): the walk takes each group of chunks as soon as step 2 has stored it,
instead of waiting for the whole of step 2. The "fused" path replaces 2 and 3 with
`_fused_pass_kernel`, which forms U = T (v - e^G k S) and the causal q k^T per chunk inside the
sequential walk (o = e^G q S + P U), so only T and G go through memory; it needs many (sequence,
head) programs, since that work lies on the sequential path. It holds the state transposed (S^T), so that the
products on the chain from one chunk's state to the next take their left operand from
registers. When one of its programs spans dv, it can also store the gated RMSNorm of o
(gated_norm) in place of o.
Splitting dv across programs keeps the split path's pass busy when a rank has a few heads and
sequences; when it has very few (one long sequence on a tp=4 rank: 8 programs of 512 steps),
the "scan" path cuts each sequence into segments of several chunks and runs step 3 on all
segments in parallel. Over a segment the recurrence is affine, S_end = M S_start + L, so
  a. `_segment_summary_kernel` (segments x heads x blocks of dv + dk columns) forms L (from S = 0)
     and M (from S = I with u = 0) of every segment in parallel;
  b. `_segment_chain_kernel` (sequences x heads x dv blocks) walks each sequence's segments,
     S <- M S + L from the slot's state, storing each segment's start state and the final state;
  c. `_state_pass_kernel` runs on the segments from those start states.
`choose_path` picks the path. q/k may be given raw (NORM_QK: l2norm and q scale inside; the
solve folds k's norms into its exps instead of scaling k) or already normalised. Value head h
reads key head h // R through strides; q/k are never repeated in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..batch import CHUNK      # the chunk length that Batch schedules prefill work in
from .triton_common import (_COMPILED, cdiv, compiled_per_sm, exp_ftz, is_hopper, launch, next_pow2, sequence_of,
                            sm_count)

_C = tl.constexpr(CHUNK)  # the chunk length as kernels see it

# Launch settings per kernel (benchmarks/bench_kernels.py --sweep measures the alternatives).
LAUNCH = {
    # H200, 8x4096 at 16/32 and 8/16 heads: 1 warp 0.417 / 0.289 ms, 2 warps 0.609 / 0.334, 4 warps
    # 1.083 / 0.623, with T bit-equal (benchmarks/results/exp_solve_h200x4_s4.log)
    # One value head a program. Two heads of one key head a program, sharing the k tile and its Gram
    # blocks, took 0.467 ms against 0.209 at 8x4096, 16/32 heads, k normalised, with T bit-equal:
    # the two inversions' shuffles stay, and spills grew (benchmarks/results/exp_solve_heads_h200_s17.log)
    "solve": dict(num_warps=1, num_stages=1),
    # H200, whole core, the w/u kernel that stores each product as soon as it is formed: 4 warps
    # (255 registers, 2 per SM) against 8 (159-177, 1 per SM): 1x32768 4/8 (scan) 0.829 against
    # 0.868 / 0.916 ms, 1x4096 16/32 (split) 0.471 against 0.631 / 0.550, 8x4096 4/8 (split) 0.763
    # against 0.811 / 0.805, outputs bit-equal (benchmarks/results/exp_wu_h200x2_s7.log). Below
    # dk or dv 64 "wu_small" applies: the kernel before that rewrite faulted (illegal address) with
    # 4 warps for bf16 at dk = dv = 16 on an H200, Triton 3.6, and the rewrite was not tried there
    "wu": dict(num_warps=4, num_stages=1),
    "wu_small": dict(num_warps=8, num_stages=1),
    # The split path's sequential pass. H200, kernel time, medians of 5 interleaved rounds, outputs
    # bit-equal across settings (benchmarks/results/probe_pass_h200_s33d.log): at BV 32 4 warps 2
    # stages took 0.1877 / 0.1625 / 0.1625 ms against 0.1968 / 0.1726 / 0.1727 for 8 warps 3 stages
    # (core 1x4096 16/32, the tp=1 layer at 1x4096, a tp=8 rank's layer at 8x4096); 4 warps 3
    # stages about the same, 1 stage slower (0.2396 / 0.2156 / 0.2148). At BV 64 (core 8x4096 4/8,
    # forced): 0.2284 against 0.2624 (probe_split_h200_s33c.log)
    "pass": dict(num_warps=4, num_stages=2),
    # The scan path's summary and pass. 8 warps 3 stages, as the split pass had before: there 4
    # warps 2 stages took the pass from 0.1594 to 0.3410 ms (core 1x32768 4/8) and from 0.0509 to
    # 0.0855 (a tp=2 rank's layer at 1x4096), 1 stage was slower too (probe_pass_h200_s33d.log).
    # num_stages=1 gave wrong results and faults on an H200 with Triton 3.6 (2026-11-27, an earlier
    # kernel); the seventh session's run gave bit-equal outputs at 1 stage on four split and scan
    # workloads at real dims, and no gain (0.900 against 0.887 ms at 1x32768 4/8; 4 warps 1.3-1.9x
    # slower; benchmarks/results/exp_launch_variants_h200x2_s7.log)
    "scan": dict(num_warps=8, num_stages=3),
    # H200, whole core at 8x4096, 16/32 and 8/16 heads (BV 128) and 4/8 (BV 64): 8 warps 1 stage
    # 1.793 / 0.857 / 0.684 ms, 2 stages 1.773 / 0.934 / 0.776, 3 stages 1.939 / 0.995 / 0.846, bit-equal
    # outputs; every variant holds 255 registers per thread with spills, one program per SM
    # (benchmarks/results/exp_occupancy_h200_s6.log). H100, 8 warps 2 stages 2.382 / 1.141, 3 stages
    # 2.356 / 1.299, 4 warps 2.880 / 1.579 (exp_fused_t_h100.log)
    "fused": dict(num_warps=8, num_stages=1),
    "chain": dict(num_warps=4, num_stages=2),
}
# choose_path: the fused pass from this many (sequence, value head) pairs up, at this dv block,
# and one block spanning dv (which lets the gated norm run inside it) from FUSED_FULL_DV_MIN_PROGRAMS
# pairs up. H200, bench_kernels.py, 8x4096 (benchmarks/results/kernels_h200x4_s4.log):
#   32 heads: fused BV128 1.778 ms, fused BV64 2.912, split BV128 2.376
#   16 heads: fused BV128 0.931 ms, fused BV64 1.470, split BV128 1.218
#    8 heads: fused BV64 0.772 ms, fused BV128 0.802, split BV64 0.745 (within noise)
# and 1x32768 at 8 heads: split BV16 1.768 ms, fused BV64 4.858. Since the nineteenth session's
# changes to the fused pass (exp_ftz and the addresses), one block spanning dv wins from 64 pairs
# up. H200, kernel time, 5 interleaved rounds (benchmarks/results/bv128_h200_s20.log): core 8x4096
# 4/8 0.5189 -> 0.4508 ms and 4x4096 8/16 0.5229 -> 0.4542 (64 pairs), 12x4096 4/8 1.0023 -> 0.4874
# (96 pairs), outputs bit-equal; a tp=4 rank's layer at 8x4096 1.3797 -> 1.3001 ms (q and k are
# normalised again inside at BV 128: output moved by 2.2e-3).
PATHS = ("split", "fused", "scan")
# The split path runs its steps 2 and 3 in one launch (_split_overlap_kernel) where that fits
# (split_overlap_applies, split_overlap_fits), the walk taking the chunks in groups of
# SPLIT_GROUP_CHUNKS as step 2 stores them. H200, kernel time, 5 interleaved rounds against the two
# launches (w/u, then the pass), outputs and states bit-equal (benchmarks/results/
# compare_h200x2_s43c.log): the tp=1 layer at 1x4096 0.2265 against 0.0820 + 0.1654 ms (all its
# kernels 0.6778 against 0.6974), core 1x4096 16/32 0.2600 against 0.0851 + 0.1919, a tp=8 rank's
# layer at 8x4096 0.2266 against 0.0865 + 0.1668, core 2x4096 8/16 0.2586 against 0.0874 + 0.1919.
# Other settings, all kernels of a call (group_h200x2_s43a.log, _s43b.log; step 2 then took the
# batch's chunk order, one sequence after another): groups of 4 chunks 0.6682 / 0.2933 ms against
# 0.6715 / 0.3000 for 8 (layer / core at 1x4096) and 0.7654 against 0.7605 (the tp=8 rank); 2
# slower on all three; 16 slower at 1x4096, 0.7597 on the tp=8 rank; the walk at dv block 64 (64
# walking programs, more room for step 2) slower on every row.
SPLIT_OVERLAP = True
SPLIT_GROUP_CHUNKS = 8
# The scan path: segments of this many chunks (None: scan_seg_chunks), and the dv blocks of its
# phase 1 (summary, over dv + dk columns; None: the widest giving >= 128 programs, scan_bvs) and
# phase 2 (chain). choose_path takes it up to SCAN_MAX_PAIRS (sequence, value head) pairs where
# the sequences span >= 2 segments on average. H200, 8 value heads (benchmarks/results/
# exp_scan_h200x2_s5.log), scan (best segment length) against split:
#   1x32768: 0.940 ms (32 chunks) against 1.864;  2x16384: 0.858 (32) against 1.133
#   16 heads, 1x8192: 0.560 (8), 0.606 (16) against 0.761
#   32 heads, 1x4096: 0.492 (16) against 0.474;  8 heads, 8x4096: 0.908 (32) against 0.766
SCAN = dict(seg_chunks=None, summary_bv=None, chain_bv=16)
SCAN_MAX_PAIRS = 16
SCAN_MIN_SEG_CHUNKS = 8
SCAN_TARGET_PAIRS = 128
FUSED_MIN_PROGRAMS = 64
FUSED_BV = 64
FUSED_FULL_DV_MIN_PROGRAMS = 64
# ... and from this many where q and k come l2-normalised (the layer's calls: normalize_qk False),
# so that at 64 pairs the pass runs dv in two blocks, 128 programs, one on each SM. There a block
# does not normalise q and k again, and the extra programs win; where the pass normalises them
# (gdn_prefill) every block repeats that, and one block stays faster. H200, 7 interleaved rounds,
# kernel time (single call), outputs and states bit-equal (benchmarks/results/compare_bv64_h200_s46e.log):
# a tp=4 rank's layer 8x4096 1.2956 -> 1.2588 ms (1.3341 -> 1.3019), the tp=1 layer 2x4096
# 1.2921 -> 1.2423 (1.3459 -> 1.2928), a tp=2 rank's layer 4x4096 1.2718 -> 1.2546 (1.3224 ->
# 1.3093); core 8x4096 4/8 (q/k normalised inside) 0.4089 -> 0.4362, which keeps one block
FUSED_FULL_DV_MIN_PROGRAMS_QK_NORMED = 65
FUSED_MAX_BV = 128
# The fused pass takes exp_ftz (16-bit inputs) at dv blocks up to this width, tl.exp above it.
# H200, whole core at 8x4096, 5 interleaved rounds, outputs and states bit-equal: BV 64 (4/8
# heads) 0.624 ms with exp_ftz against 0.660; BV 128 0.744 against 0.730 (8/16) and 1.481 against
# 1.433 (16/32) (benchmarks/results/exp_fused_ftz_h200_s12.log). On the kernel of the nineteenth
# session (T with beta folded in), BV 128 with exp_ftz, fused pass kernel time, 3 rounds, bit-equal:
# core 8x4096 0.8791 ms against 0.9373 (16/32) and 0.4445 against 0.4721 (8/16); but the tp=1
# layer's form (q, k normalised before, no second norm) 1.0027 against 0.9509
# (benchmarks/results/compare_ftz128_h200_s19.log). With the second norm on as well (below), the
# layer's pass took 0.8813 against 0.9711 (compare_carve_ftz_renorm_h200_s19.log; that build also
# had branch exp/l1-carveout's carveout, which alone made the pass 3.2% slower in the same call),
# so exp_ftz is on at every width the fused pass takes.
FUSED_FTZ_MAX_BV = 128
# The fused pass l2-normalises q and k again when they come normalised (normalize_qk=False, the
# layer's launch) at dv blocks from this width up. With the norm in, Triton 3.6 laid k out
# differently (without it, k went through an extra layout conversion for the w product, which the
# pass no longer forms) and the pass was faster although it did more. H200, fused pass kernel time,
# 5 interleaved rounds: tp=1 layer at 8x4096 1.093 ms against 1.150 (16/32 heads, BV 128); core on
# normalised q/k at 8x4096, 8/16 heads, BV 128: 0.548 against 0.579; at 4/8, BV 64: 0.485 against
# 0.477, so not there (benchmarks/results/exp_fused_renorm_h200_s14.log). q, k normalised twice
# differ from once by bf16 rounding: the layer's output moved by 6.5e-4 relative, its states by
# 3.6e-4. Again on 0c436b9 (3 rounds): 1.054 ms with the second norm against 1.122 without it in the
# tp=1 layer at 8x4096 (benchmarks/results/compare_renorm_h200_s17.log). With T stored as T
# diag(beta) (eighteenth session) and tl.exp at BV 128 the order reversed: 0.898 ms without the
# second norm against 0.944 with it (compare_renorm_h200_s18.log). With exp_ftz at BV 128
# (nineteenth session) it is the fastest form again: 0.8813 ms against 0.9711 for the eighteenth
# session's (no exp_ftz, no second norm; 3 rounds, with the carveout noted above; output moved by
# 2.3e-3 relative, states by 1.3e-3; compare_carve_ftz_renorm_h200_s19.log). With U = T (v - e^G k
# S) (forty-second session) it reversed again: fused pass kernel time, H200, 5 interleaved rounds,
# without the second norm against with it, 0.7018 against 0.7285 ms in the tp=1 layer at 8x4096 and
# 0.3533 against 0.3687 in a tp=2 rank's layer (output moved by 2.4e-3 / 2.6e-3;
# benchmarks/results/fused_h200_s42e.log), so it is off at every width the pass takes
# (FUSED_MAX_BV). The tests lower this to cover both forms.
FUSED_RENORM_MIN_BV = 256


@triton.jit
def _load_qk(ptr, rows, m_rows, stride_t, col0, o_k, m_k, NORM: tl.constexpr, scale):
    """A [rows, BK] tile of q or k, l2-normalised and scaled where NORM == 1 (True); as stored
    otherwise (NORM 0: normalised before; the solve's NORM 2: normalised through its exps).

    ptr points at the tile's first row (an int64 base the caller forms once per chunk) and rows
    are int32 offsets from it, as in every chunk kernel's loads and stores: against int64 offsets
    per element, H200, outputs bit-equal, kernel times 11-14% less for the solve, 3-4% for the
    fused pass and the state pass, 6-9% for the w/u launch and the segment summary
    (benchmarks/results/exp_chunk_rows_h200_s15.log)."""
    x = tl.load(ptr + (rows[:, None] * stride_t + col0 + o_k[None, :]), mask=m_rows[:, None] & m_k[None, :], other=0.0)
    if NORM == 1:
        xf = x.to(tl.float32)
        xf = xf * (tl.rsqrt(tl.sum(xf * xf, axis=1) + 1e-6) * scale)[:, None]      # one product an entry
        x = xf.to(x.dtype)
    return x


@triton.jit
def _gate_block(a_ptr, b_ptr, rows, m, stride_ab, h, A_log, dt_bias):
    a = tl.load(a_ptr + (rows * stride_ab + h), mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + (rows * stride_ab + h), mask=m, other=0.0).to(tl.float32)
    x = a + tl.load(dt_bias + h).to(tl.float32)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    g = -tl.exp(tl.load(A_log + h).to(tl.float32)) * softplus
    return tl.where(m, g, 0.0), tl.where(m, tl.sigmoid(b), 0.0)


@triton.jit
def _decay(Gi, Gj, STRICT: tl.constexpr, FTZ: tl.constexpr):
    """exp(G_i - G_j) where j < i (or j <= i), else 0; the mask goes in before the exp."""
    o = tl.arange(0, 16)
    if STRICT:
        m = o[:, None] > o[None, :]
    else:
        m = o[:, None] >= o[None, :]
    return exp_ftz(tl.where(m, Gi[:, None] - Gj[None, :], float("-inf")), FTZ)


@triton.jit
def _norm_shift(K, G):
    """(G + ln n as rows, G - ln n as columns) for a 16x16 Gram block K = k k^T of raw k rows,
    n = (diag K + 1e-6)^-1/2 being each row's l2norm factor."""
    o = tl.arange(0, 16)
    d = tl.where(o[:, None] == o[None, :], K, 0.0)
    return G - 0.5 * tl.log(tl.sum(d, 1) + 1e-6), G + 0.5 * tl.log(tl.sum(d, 0) + 1e-6)


@triton.jit
def _head_off(h, n_tok, width: tl.constexpr):
    """Where head h's rows start (int64 elements) in a head-major [heads, n_tok, width] buffer,
    the layout of every buffer that one launch of a path hands the next (T, G, w, u, Q',
    O_c): one head's rows of a chunk are then one contiguous block."""
    return h.to(tl.int64) * n_tok * width


@triton.jit
def _invert_unit_lower4(A0, A1, A2, A3, b0, b1, b2, b3):
    """(I + A)^-1 diag(b) for four strictly lower 16x16 blocks A and 16-vectors b, by elimination
    column by column: X = diag(b), then for j = 0..14, X <- X - A[:, j] X[j, :] (the row operations
    that take I + A to I take diag(b) to (I + A)^-1 diag(b)). The multipliers are A's own entries
    (eliminating column j leaves the other columns of I + A as they were), so extracting A[:, j]
    does not wait on X; only X[j, :] lies on the chain from one step to the next. The four blocks'
    chains are independent, so their latencies overlap. The 15 steps are unrolled. H200, solve
    alone, kernel time with k normalised (the layer's launch) at 8x4096, 16/32 heads: 0.2306 ms,
    against 0.2735 for the row substitution it replaced (each row of X from the rows above, in a
    loop) and 0.2464 for this elimination in a loop; 16-18% less at every shape tried, 0-6% less
    with the l2norm inside (benchmarks/results/exp_solve_h200_s13.log). Inside the tp=1 layer: 0.259
    against 0.309 ms at 8x4096, no change at 1x4096 (exp_solve_core_layer_h200_s13.log)."""
    o = tl.arange(0, 16)
    eye = o[:, None] == o[None, :]
    X0, X1, X2, X3 = (tl.where(eye, b0[:, None], 0.0), tl.where(eye, b1[:, None], 0.0),
                      tl.where(eye, b2[:, None], 0.0), tl.where(eye, b3[:, None], 0.0))
    for j in tl.static_range(15):
        col = (o == j)[None, :]
        row = (o == j)[:, None]
        a0 = tl.sum(tl.where(col, A0, 0.0), 1)
        a1 = tl.sum(tl.where(col, A1, 0.0), 1)
        a2 = tl.sum(tl.where(col, A2, 0.0), 1)
        a3 = tl.sum(tl.where(col, A3, 0.0), 1)
        x0 = tl.sum(tl.where(row, X0, 0.0), 0)
        x1 = tl.sum(tl.where(row, X1, 0.0), 0)
        x2 = tl.sum(tl.where(row, X2, 0.0), 0)
        x3 = tl.sum(tl.where(row, X3, 0.0), 0)
        X0 = X0 - a0[:, None] * x0[None, :]
        X1 = X1 - a1[:, None] * x1[None, :]
        X2 = X2 - a2[:, None] * x2[None, :]
        X3 = X3 - a3[:, None] * x3[None, :]
    return X0, X1, X2, X3


@triton.jit
def _intra_solve_kernel(
    k, a, b, A_log, dt_bias, Tout, Gout, counts, chunks, cu_seqlens,
    stride_k, stride_ab, k_col0, n_tok,
    R, DK: tl.constexpr, BK: tl.constexpr,
    NORM_QK: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr, ZERO_COUNTS: tl.constexpr,
):
    i_c, h = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunks + i_c * 2).to(tl.int64)
    t0 = tl.load(chunks + i_c * 2 + 1).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    o16 = tl.arange(0, 16)
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    col0 = k_col0 + (h // R) * DK
    # addresses: int64 bases at the chunk's first row, int32 offsets (rows of the chunk) from there
    r0, r1, r2, r3 = o16, 16 + o16, 32 + o16, 48 + o16
    n_in = (eos - t0).to(tl.int32)
    m0, m1, m2, m3 = r0 < n_in, r1 < n_in, r2 < n_in, r3 < n_in
    a, b, k = a + t0 * stride_ab, b + t0 * stride_ab, k + t0 * stride_k

    g0, b0 = _gate_block(a, b, r0, m0, stride_ab, h, A_log, dt_bias)
    g1, b1 = _gate_block(a, b, r1, m1, stride_ab, h, A_log, dt_bias)
    g2, b2 = _gate_block(a, b, r2, m2, stride_ab, h, A_log, dt_bias)
    g3, b3 = _gate_block(a, b, r3, m3, stride_ab, h, A_log, dt_bias)
    G0 = tl.cumsum(g0, 0)
    G1 = tl.cumsum(g1, 0) + tl.sum(g0, 0)
    G2 = tl.cumsum(g2, 0) + tl.sum(g0, 0) + tl.sum(g1, 0)
    G3 = tl.cumsum(g3, 0) + tl.sum(g0, 0) + tl.sum(g1, 0) + tl.sum(g2, 0)

    k0 = _load_qk(k, r0, m0, stride_k, col0, o_k, m_k, NORM_QK, 1.0)
    k1 = _load_qk(k, r1, m1, stride_k, col0, o_k, m_k, NORM_QK, 1.0)
    k2 = _load_qk(k, r2, m2, stride_k, col0, o_k, m_k, NORM_QK, 1.0)
    k3 = _load_qk(k, r3, m3, stride_k, col0, o_k, m_k, NORM_QK, 1.0)
    kt0, kt1, kt2 = tl.trans(k0), tl.trans(k1), tl.trans(k2)

    # the diagonal blocks A_jj = beta_i (k_i . k_j) exp(G_i - G_j) (blocks of 16 rows; row scaling
    # by beta after the dot); below them the same without beta (E_ij)
    if NORM_QK == 2:
        # raw k, normalised through the exps: |k_i|^2 is the diagonal of the Gram block k_i k_i^T,
        # and n_i n_j exp(G_i - G_j) = exp((G_i + ln n_i) - (G_j - ln n_j)) with n = (|k|^2 + 1e-6)^-1/2.
        # H200, solve kernel time at 8x4096 against scaling the k tiles first: 0.277 against 0.292 ms
        # (16/32 heads), 0.145 / 0.155 (8/16), 0.078 / 0.084 (4/8); 1x32768 4/8 0.080 / 0.087
        # (benchmarks/results/exp_norm_core_h200_s15.log). The fused pass did not gain from the same
        # fold (1.135 against 1.083 ms at 16/32, more spills), so it still scales its tiles.
        K00 = tl.dot(k0, kt0, input_precision=PREC)
        K11 = tl.dot(k1, kt1, input_precision=PREC)
        K22 = tl.dot(k2, kt2, input_precision=PREC)
        K33 = tl.dot(k3, tl.trans(k3), input_precision=PREC)
        Gr0, Gc0 = _norm_shift(K00, G0)
        Gr1, Gc1 = _norm_shift(K11, G1)
        Gr2, Gc2 = _norm_shift(K22, G2)
        Gr3, Gc3 = _norm_shift(K33, G3)
        A00 = K00 * _decay(Gr0, Gc0, True, FTZ) * b0[:, None]
        A11 = K11 * _decay(Gr1, Gc1, True, FTZ) * b1[:, None]
        A22 = K22 * _decay(Gr2, Gc2, True, FTZ) * b2[:, None]
        A33 = K33 * _decay(Gr3, Gc3, True, FTZ) * b3[:, None]
    else:
        # q/k normalised before (the layer): the products in the order they had before the fold.
        # The order matters to ptxas: with the four Gram blocks first, the tile-scaling form took
        # 0.487 ms where it took 0.292 in this order (H200, 16/32 heads, exp_norm_core_h200_s15.log)
        Gr0, Gc0, Gr1, Gc1, Gr2, Gc2, Gr3 = G0, G0, G1, G1, G2, G2, G3
        A00 = tl.dot(k0, kt0, input_precision=PREC) * _decay(G0, G0, True, FTZ) * b0[:, None]
        A11 = tl.dot(k1, kt1, input_precision=PREC) * _decay(G1, G1, True, FTZ) * b1[:, None]
        A22 = tl.dot(k2, kt2, input_precision=PREC) * _decay(G2, G2, True, FTZ) * b2[:, None]
        A33 = tl.dot(k3, tl.trans(k3), input_precision=PREC) * _decay(G3, G3, True, FTZ) * b3[:, None]
    # below the diagonal blocks (beta enters through the T_jj below)
    E10 = tl.dot(k1, kt0, input_precision=PREC) * exp_ftz(Gr1[:, None] - Gc0[None, :], FTZ)
    E20 = tl.dot(k2, kt0, input_precision=PREC) * exp_ftz(Gr2[:, None] - Gc0[None, :], FTZ)
    E21 = tl.dot(k2, kt1, input_precision=PREC) * exp_ftz(Gr2[:, None] - Gc1[None, :], FTZ)
    E30 = tl.dot(k3, kt0, input_precision=PREC) * exp_ftz(Gr3[:, None] - Gc0[None, :], FTZ)
    E31 = tl.dot(k3, kt1, input_precision=PREC) * exp_ftz(Gr3[:, None] - Gc1[None, :], FTZ)
    E32 = tl.dot(k3, kt2, input_precision=PREC) * exp_ftz(Gr3[:, None] - Gc2[None, :], FTZ)

    # The solve stores T diag(beta), which every reader takes (w = T diag(beta) e^G k,
    # u = T diag(beta) v), so beta goes through memory inside T. Write T_ij for the blocks of
    # T diag(beta) and A_ij = diag(b_i) E_ij. Diagonal blocks: the elimination started from diag(b_j)
    # gives T_jj directly. Below them, from T (I + A) = I: T_ij = -(sum_{j<m<=i} T_im E_mj) T_jj,
    # every factor a block of T diag(beta).
    T00, T11, T22, T33 = _invert_unit_lower4(A00, A11, A22, A33, b0, b1, b2, b3)
    T10 = -tl.dot(tl.dot(T11, E10, input_precision=PREC), T00, input_precision=PREC)
    T21 = -tl.dot(tl.dot(T22, E21, input_precision=PREC), T11, input_precision=PREC)
    T32 = -tl.dot(tl.dot(T33, E32, input_precision=PREC), T22, input_precision=PREC)
    T20 = -tl.dot(tl.dot(T21, E10, input_precision=PREC) + tl.dot(T22, E20, input_precision=PREC), T00,
                  input_precision=PREC)
    T31 = -tl.dot(tl.dot(T32, E21, input_precision=PREC) + tl.dot(T33, E31, input_precision=PREC), T11,
                  input_precision=PREC)
    T30 = -tl.dot(tl.dot(T31, E10, input_precision=PREC) + tl.dot(T32, E20, input_precision=PREC)
                  + tl.dot(T33, E30, input_precision=PREC), T00, input_precision=PREC)

    # Tout: [nv, T, 64], row = token, column = position in its chunk. Only the blocks on and below
    # the diagonal are stored (readers zero the rest after loading; T is lower triangular).
    ty = Tout.dtype.element_ty
    base = Tout + _head_off(h, n_tok, _C) + t0 * _C
    c = o16[None, :]
    tl.store(base + (r0[:, None] * _C + c), T00.to(ty), mask=m0[:, None])
    tl.store(base + (r1[:, None] * _C + c), T10.to(ty), mask=m1[:, None])
    tl.store(base + (r1[:, None] * _C + 16 + c), T11.to(ty), mask=m1[:, None])
    tl.store(base + (r2[:, None] * _C + c), T20.to(ty), mask=m2[:, None])
    tl.store(base + (r2[:, None] * _C + 16 + c), T21.to(ty), mask=m2[:, None])
    tl.store(base + (r2[:, None] * _C + 32 + c), T22.to(ty), mask=m2[:, None])
    tl.store(base + (r3[:, None] * _C + c), T30.to(ty), mask=m3[:, None])
    tl.store(base + (r3[:, None] * _C + 16 + c), T31.to(ty), mask=m3[:, None])
    tl.store(base + (r3[:, None] * _C + 32 + c), T32.to(ty), mask=m3[:, None])
    tl.store(base + (r3[:, None] * _C + 48 + c), T33.to(ty), mask=m3[:, None])
    Gh = Gout + _head_off(h, n_tok, 1) + t0
    tl.store(Gh + r0, G0, mask=m0)
    tl.store(Gh + r1, G1, mask=m1)
    tl.store(Gh + r2, G2, mask=m2)
    tl.store(Gh + r3, G3, mask=m3)
    if ZERO_COUNTS:     # the count at this chunk's first token, for _split_overlap_kernel, launched after
        tl.store(counts + _head_off(h, n_tok, 1) + t0, 0)


@triton.jit
def _walk_start(seqs, cu_seqlens, slots, has_state, state_pool, stride_ps, stride_ph, i_s, h, i_v,
                DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """What a sequential pass over one sequence's chunks starts from: the sequence's tokens
    [bos, eos), and the [BV, BK] block (dv block i_v) of its slot's head-h state, held
    transposed (S^T: rows o_v, columns o_k) in fp32, zero where the sequence starts fresh.
    Returns bos, eos, S^T, o_k, m_k, o_v, m_v, o_c (positions in a chunk), the block's mask and
    its pool pointers (for the final store)."""
    bos, eos, slot, keep = sequence_of(seqs, cu_seqlens, slots, has_state, i_s)
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    o_c = tl.arange(0, _C)
    p_state = state_pool + slot * stride_ps + h * stride_ph + o_k[None, :] * DV + o_v[:, None]
    m_state = m_v[:, None] & m_k[None, :]
    St = tl.load(p_state, mask=tl.where(keep, m_state, False), other=0.0).to(tl.float32)
    return bos, eos, St, o_k, m_k, o_v, m_v, o_c, m_state, p_state


@triton.jit
def _advance(St, Ut, kk, G, G_last, PREC: tl.constexpr, FTZ: tl.constexpr):
    """One chunk's state update on the transposed state: S^T <- e^{G_last} S^T + (U^T e^{G_last - G}) k,
    with the chunk's U^T [BV, C] (u^T - S^T w^T in the state pass, (v^T - S^T (e^G k)^T) T^T in the
    fused pass) and k [C, BK] (the product in k's dtype)."""
    Ud = (Ut * exp_ftz(G_last - G, FTZ)[None, :]).to(kk.dtype)
    return St * tl.exp(G_last) + tl.dot(Ud, kk, input_precision=PREC)


@triton.jit
def _load_T(ptr, i, j, m_i):
    """T[i, j] of one chunk (i, j broadcast to the tile's shape; pass them swapped for T^T), ptr
    at the chunk's row 0. The solve stores the blocks on and below the diagonal only, so the
    entries above it are unwritten memory: they are loaded with the rest, masked by row only,
    and replaced by zeros afterwards. With the triangle in the load's mask, each 16-byte run of
    a row was loaded element by element (16 two-byte loads a thread in the fused pass)."""
    x = tl.load(ptr + (i * _C + j), mask=m_i, other=0.0)
    return tl.where(j <= i, x, 0.0)


@triton.jit
def _wu_chunk(
    q, k, v, Tin, Gin, w_out, qp_out, u_out, oc_out, chunks, cu_seqlens, i_c, h,
    stride_q, stride_k, stride_v, q_col0, k_col0, v_col0, scale, n_tok,
    R, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM_QK: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr,
):
    """Step 2 for chunk i_c (of `chunks`) and value head h: stores its w, Q', u and O_c. Returns
    the chunk's sequence and first token (i_n, t0)."""
    i_n = tl.load(chunks + i_c * 2).to(tl.int64)
    t0 = tl.load(chunks + i_c * 2 + 1).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    # addresses: int64 bases at the chunk's first row, int32 offsets inside the tiles
    o_c = tl.arange(0, _C)
    m_t = o_c < (eos - t0).to(tl.int32)
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    o_v = tl.arange(0, BV)
    m_v = o_v < DV
    hk = h // R

    kk = _load_qk(k + t0 * stride_k, o_c, m_t, stride_k, k_col0 + hk * DK, o_k, m_k, NORM_QK, 1.0)
    qq = _load_qk(q + t0 * stride_q, o_c, m_t, stride_q, q_col0 + hk * DK, o_k, m_k, NORM_QK, scale)
    vv = tl.load(v + t0 * stride_v + (o_c[:, None] * stride_v + v_col0 + h * DV + o_v[None, :]),
                 mask=m_t[:, None] & m_v[None, :], other=0.0)
    T = _load_T(Tin + (_head_off(h, n_tok, _C) + t0 * _C), o_c[:, None], o_c[None, :], m_t[:, None])
    G = tl.load(Gin + (_head_off(h, n_tok, 1) + t0) + o_c, mask=m_t, other=0.0)

    dt = kk.dtype
    eG = exp_ftz(G, FTZ)
    w_out, qp_out = w_out + (_head_off(h, n_tok, DK) + t0 * DK), qp_out + (_head_off(h, n_tok, DK) + t0 * DK)
    u_out, oc_out = u_out + (_head_off(h, n_tok, DV) + t0 * DV), oc_out + (_head_off(h, n_tok, DV) + t0 * DV)
    row_k = o_c[:, None] * DK + o_k[None, :]
    row_v = o_c[:, None] * DV + o_v[None, :]
    mk = m_t[:, None] & m_k[None, :]
    mv = m_t[:, None] & m_v[None, :]
    # each product is stored, and kept only in the 16 bits its later reader takes, as soon as it
    # is formed, so that no fp32 tile lives longer than it must (w_out, u_out hold k's dtype)
    w = tl.dot(T, (kk.to(tl.float32) * eG[:, None]).to(dt), input_precision=PREC).to(dt)
    tl.store(w_out + row_k, w, mask=mk)
    u = tl.dot(T, vv, input_precision=PREC).to(dt)
    tl.store(u_out + row_v, u, mask=mv)
    causal = (o_c[:, None] >= o_c[None, :]) & m_t[:, None]
    P = (tl.dot(qq, tl.trans(kk), input_precision=PREC) *
         exp_ftz(tl.where(causal, G[:, None] - G[None, :], float("-inf")), FTZ)).to(dt)
    qp = qq.to(tl.float32) * eG[:, None] - tl.dot(P, w, input_precision=PREC)
    tl.store(qp_out + row_k, qp.to(qp_out.dtype.element_ty), mask=mk)
    oc = tl.dot(P, u, input_precision=PREC)
    tl.store(oc_out + row_v, oc.to(oc_out.dtype.element_ty), mask=mv)
    return i_n, t0


@triton.jit
def _intra_wu_kernel(
    q, k, v, Tin, Gin, w_out, qp_out, u_out, oc_out, chunks, cu_seqlens,
    stride_q, stride_k, stride_v, q_col0, k_col0, v_col0, scale, n_tok,
    R, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM_QK: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr,
):
    _wu_chunk(q, k, v, Tin, Gin, w_out, qp_out, u_out, oc_out, chunks, cu_seqlens, tl.program_id(0), tl.program_id(1),
              stride_q, stride_k, stride_v, q_col0, k_col0, v_col0, scale, n_tok, R, DK, DV, BK, BV, NORM_QK, PREC, FTZ)


@triton.jit
def _state_pass_kernel(
    k, w_in, qp_in, u_in, oc_in, Gin, out, state_pool, seqs, cu_seqlens, slots, has_state,
    stride_k, k_col0, stride_out, stride_ps, stride_ph, n_tok,
    R, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM_QK: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr,
):
    h = tl.program_id(1)
    # the state transposed, S^T [BV, BK], as in the fused pass: U^T = u^T - S^T w^T,
    # o^T = O_c^T + S^T Q'^T, S^T <- e^{G_last} S^T + (U^T e^{G_last - G}) k
    bos, eos, n_chunks, St, o_k, m_k, o_v, m_v, o_c, m_state, p_state, col_k, Gh, head_k, head_v = _pass_start(
        Gin, seqs, cu_seqlens, slots, has_state, state_pool, stride_ps, stride_ph, k_col0, n_tok,
        tl.program_id(0), h, tl.program_id(2), R, DK, DV, BK, BV)
    for i_t in range(0, n_chunks):
        St = _pass_chunk(k, w_in, qp_in, u_in, oc_in, Gh, out, St, bos + i_t * _C, eos, h, col_k, head_k, head_v,
                         o_c, o_k, m_k, o_v, m_v, stride_k, stride_out, DK, DV, NORM_QK, PREC, FTZ)

    tl.debug_barrier()  # the initial state was read by every lane before it is overwritten
    tl.store(p_state, St.to(state_pool.dtype.element_ty), mask=m_state)


@triton.jit
def _pass_start(Gin, seqs, cu_seqlens, slots, has_state, state_pool, stride_ps, stride_ph, k_col0, n_tok,
                i_s, h, i_v, R, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """What step 3's walk over sequence i_s, head h, dv block i_v starts from: _walk_start's
    values (the chunk count after eos), then k's first column of the head, the head's G and its
    rows' offsets in the head-major buffers of step 2 (dk and dv wide)."""
    bos, eos, St, o_k, m_k, o_v, m_v, o_c, m_state, p_state = _walk_start(
        seqs, cu_seqlens, slots, has_state, state_pool, stride_ps, stride_ph, i_s, h, i_v, DK, DV, BK, BV)
    n_chunks = ((eos - bos + _C - 1) // _C).to(tl.int32)
    return (bos, eos, n_chunks, St, o_k, m_k, o_v, m_v, o_c, m_state, p_state, k_col0 + (h // R) * DK,
            Gin + _head_off(h, n_tok, 1), _head_off(h, n_tok, DK), _head_off(h, n_tok, DV))


@triton.jit
def _pass_chunk(k, w_in, qp_in, u_in, oc_in, Gh, out, St, t0, eos, h, col_k, head_k, head_v, o_c, o_k, m_k, o_v, m_v,
                stride_k, stride_out, DK: tl.constexpr, DV: tl.constexpr, NORM_QK: tl.constexpr,
                PREC: tl.constexpr, FTZ: tl.constexpr):
    """Step 3 for the chunk at token t0: stores its o block and returns the state after it."""
    # addresses: one int64 row base per chunk, int32 offsets inside the tiles
    m_t = o_c < (eos - t0).to(tl.int32)
    col_kt = o_c[None, :] * DK + o_k[:, None]       # [BK, C]
    col_vt = o_c[None, :] * DV + o_v[:, None]       # [BV, C]
    mkt = m_k[:, None] & m_t[None, :]
    mvt = m_v[:, None] & m_t[None, :]
    wt = tl.load(w_in + (head_k + t0 * DK) + col_kt, mask=mkt, other=0.0)
    qpt = tl.load(qp_in + (head_k + t0 * DK) + col_kt, mask=mkt, other=0.0)
    kk = _load_qk(k + t0 * stride_k, o_c, m_t, stride_k, col_k, o_k, m_k, NORM_QK, 1.0)
    ut = tl.load(u_in + (head_v + t0 * DV) + col_vt, mask=mvt, other=0.0).to(tl.float32)
    oct = tl.load(oc_in + (head_v + t0 * DV) + col_vt, mask=mvt, other=0.0).to(tl.float32)
    G = tl.load(Gh + t0 + o_c, mask=m_t, other=0.0)
    G_last = tl.load(Gh + tl.minimum(t0 + _C, eos) - 1)

    Sd = St.to(wt.dtype)
    Ut = ut - tl.dot(Sd, wt, input_precision=PREC)
    ot = oct + tl.dot(Sd, qpt, input_precision=PREC)
    tl.store(out + t0 * stride_out + (o_c[None, :] * stride_out + h * DV + o_v[:, None]),
             ot.to(out.dtype.element_ty), mask=mvt)
    return _advance(St, Ut, kk, G, G_last, PREC, FTZ)


@triton.jit
def _split_overlap_kernel(
    q, k, v, Tin, Gin, w, qp, u, oc, out, state_pool, chunks, seqs, cu_seqlens, slots, has_state, counts,
    stride_q, stride_k, stride_v, q_col0, k_col0, v_col0, scale, stride_out, stride_ps, stride_ph, n_tok,
    n_pass, n_wu, R, HV, NVB,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVF: tl.constexpr,
    GROUP: tl.constexpr, PASS_FIRST: tl.constexpr, NORM_QK: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr,
):
    """Steps 2 and 3 of the split path in one grid, step 3 overlapping step 2: n_pass programs
    walk the chunks as `_state_pass_kernel` does (sequence, head, dv block), and n_wu programs
    do `_intra_wu_kernel`'s work, one (chunk, head) each, in the order the walks need them: every
    head of every sequence's first chunk, then of every second chunk, ... (`chunks` is the
    batch's chunks_by_step; in the batch's own order, one sequence's chunks after another, the
    walks of the later sequences waited for all of the earlier ones').

    A sequence's chunks go in groups of GROUP. Each (chunk, head) program adds 1 to its group's
    count (counts[h, the group's first token], zero before the launch) once its stores are out
    (a barrier, then one lane's atomic add with release semantics at GPU scope); a walking
    program takes a group only once that count holds every chunk of it (one lane's acquire load,
    shared through a barrier). Walking programs never signal and step-2 programs never wait, so
    the walks end as long as step-2 programs can run: the host launches this only with n_pass at
    most the SM count and at least two programs fitting an SM (split_overlap_applies,
    split_overlap_fits), so that however the walks are placed, as many programs again find room.
    PASS_FIRST puts the walking programs first in the grid: the GPU is then seen to place them
    before the rest (program placement in index order is what NVIDIA GPUs do, not a documented
    promise; in another order the walks would start later, not wait for ever). The interpreter
    runs programs one after another, so there step 2 goes first (PASS_FIRST False) and no walk
    waits. A group's chunks form an inner loop of their own, apart from the wait, for Triton's
    pipeliner to take: compiled for sm_90a (Triton 3.6), this kernel holds the same 58 async
    copies (LDGSTS) as `_state_pass_kernel`."""
    pid = tl.program_id(0)
    if PASS_FIRST:
        is_pass = pid < n_pass
        j = tl.where(is_pass, pid, pid - n_pass)
    else:
        is_pass = pid >= n_wu
        j = tl.where(is_pass, pid - n_wu, pid)
    if is_pass:
        h = (j // NVB) % HV
        bos, eos, n_chunks, St, o_k, m_k, o_v, m_v, o_c, m_state, p_state, col_k, Gh, head_k, head_v = _pass_start(
            Gin, seqs, cu_seqlens, slots, has_state, state_pool, stride_ps, stride_ph, k_col0, n_tok,
            j // (NVB * HV), h, j % NVB, R, DK, DV, BK, BV)
        count_h = counts + _head_off(h, n_tok, 1)
        for g0 in range(0, n_chunks, GROUP):
            g1 = tl.minimum(g0 + GROUP, n_chunks)
            while tl.atomic_add(count_h + bos + g0 * _C, 0, sem="acquire", scope="gpu") < g1 - g0:
                pass
            for i_t in range(g0, g1):
                St = _pass_chunk(k, w, qp, u, oc, Gh, out, St, bos + i_t * _C, eos, h, col_k, head_k, head_v,
                                 o_c, o_k, m_k, o_v, m_v, stride_k, stride_out, DK, DV, NORM_QK, PREC, FTZ)
        tl.debug_barrier()  # the initial state was read by every lane before it is overwritten
        tl.store(p_state, St.to(state_pool.dtype.element_ty), mask=m_state)
    else:
        h, i_c = j % HV, j // HV
        i_n, t0 = _wu_chunk(q, k, v, Tin, Gin, w, qp, u, oc, chunks, cu_seqlens, i_c, h,
                            stride_q, stride_k, stride_v, q_col0, k_col0, v_col0, scale, n_tok,
                            R, DK, DV, BK, BVF, NORM_QK, PREC, FTZ)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        group0 = bos + (t0 - bos) // (GROUP * _C) * (GROUP * _C)
        tl.debug_barrier()  # every lane's stores are issued before the release below
        tl.atomic_add(counts + _head_off(h, n_tok, 1) + group0, 1, sem="release", scope="gpu")


@triton.jit
def _segment_summary_kernel(
    k, w_in, u_in, Gin, summary, bounds,
    stride_k, k_col0, n_tok,
    R, HV, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NVB,
    NORM_QK: tl.constexpr, PREC: tl.constexpr, FTZ: tl.constexpr,
):
    """Scan, phase 1 (segments x value heads x column blocks, all parallel). Over one segment the
    recurrence is affine, S_end = M S_start + L: this walks the segment's chunks twice over in
    one grid, from S = 0 with the segment's u (blocks i_b < NVB: rows of L^T) and from S = I with
    u = 0 (blocks i_b >= NVB: rows of M^T, a dk-wide "value" block each), and stores
    summary[g, h] = [L^T; M^T] ([DV + DK, DK] fp32)."""
    i_g, h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(bounds + 2 * i_g).to(tl.int64)
    eos = tl.load(bounds + 2 * i_g + 1).to(tl.int64)
    is_m = i_b >= NVB
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    o_r = tl.where(is_m, i_b - NVB, i_b) * BV + tl.arange(0, BV)    # value column, or key index of M^T's row
    m_r = o_r < tl.where(is_m, DK, DV)
    m_u = m_r & ((i_b + 0 * o_r) < NVB)
    o_c = tl.arange(0, _C)
    St = ((o_r[:, None] == o_k[None, :]) & m_r[:, None] & is_m).to(tl.float32)   # [BV, BK]
    col_k = k_col0 + (h // R) * DK
    Gh = Gin + _head_off(h, n_tok, 1)
    head_k, head_v = _head_off(h, n_tok, DK), _head_off(h, n_tok, DV)

    n_chunks = ((eos - bos + _C - 1) // _C).to(tl.int32)
    for i_t in range(0, n_chunks):
        # addresses: one int64 row base per chunk, int32 offsets inside the tiles
        t0 = bos + i_t * _C
        m_t = o_c < (eos - t0).to(tl.int32)
        wt = tl.load(w_in + (head_k + t0 * DK) + (o_c[None, :] * DK + o_k[:, None]), mask=m_k[:, None] & m_t[None, :],
                     other=0.0)
        kk = _load_qk(k + t0 * stride_k, o_c, m_t, stride_k, col_k, o_k, m_k, NORM_QK, 1.0)
        ut = tl.load(u_in + (head_v + t0 * DV) + (o_c[None, :] * DV + o_r[:, None]), mask=m_u[:, None] & m_t[None, :],
                     other=0.0).to(tl.float32)
        G = tl.load(Gh + t0 + o_c, mask=m_t, other=0.0)
        G_last = tl.load(Gh + tl.minimum(t0 + _C, eos) - 1)
        Ut = ut - tl.dot(St.to(wt.dtype), wt, input_precision=PREC)
        St = _advance(St, Ut, kk, G, G_last, PREC, FTZ)

    row = tl.where(is_m, DV, 0) + o_r
    tl.store(summary + (i_g * HV + h).to(tl.int64) * ((DV + DK) * DK) + row[:, None] * DK + o_k[None, :], St,
             mask=m_r[:, None] & m_k[None, :])


@triton.jit
def _segment_chain_kernel(
    summary, starts, state_pool, seqs, seq_first, slots, has_state, stride_ps, stride_ph,
    HV, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Scan, phase 2 (sequences x value heads x dv blocks): the short sequential walk over one
    sequence's segments, S^T <- S^T M^T + L^T from the slot's initial state. Stores the state each
    segment starts from into starts[g] ([DK, DV] per head, the pool's layout) and the final state
    into the slot."""
    i_s, h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(seqs + i_s).to(tl.int64)
    slot = tl.load(slots + i_n).to(tl.int64)
    keep = tl.load(has_state + i_n) != 0
    g0 = tl.load(seq_first + i_s)
    g1 = tl.load(seq_first + i_s + 1)
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    at = o_k[None, :] * DV + o_v[:, None]
    m_state = m_v[:, None] & m_k[None, :]
    p_state = state_pool + slot * stride_ps + h * stride_ph + at
    St = tl.load(p_state, mask=tl.where(keep, m_state, False), other=0.0).to(tl.float32)     # [BV, BK]
    for g in range(g0, g1):
        tl.store(starts + (g * HV + h).to(tl.int64) * (DK * DV) + at, St, mask=m_state)
        base = summary + (g * HV + h).to(tl.int64) * ((DV + DK) * DK)
        Lt = tl.load(base + o_v[:, None] * DK + o_k[None, :], mask=m_state, other=0.0)
        Mt = tl.load(base + (DV + o_k[:, None]) * DK + o_k[None, :], mask=m_k[:, None] & m_k[None, :], other=0.0)
        St = tl.dot(St, Mt, input_precision=PREC) + Lt
    tl.debug_barrier()  # the initial state was read by every lane before it is overwritten
    tl.store(p_state, St, mask=m_state)


@triton.jit
def _fused_pass_kernel(
    q, k, v, Tin, Gin, out, state_pool, seqs, cu_seqlens, slots, has_state,
    q_col0, k_col0, v_col0, scale, stride_ps, stride_ph,
    z, stride_z, z_col0, norm_w, eps, n_tok,
    R, stride_q: tl.constexpr, stride_k: tl.constexpr, stride_v: tl.constexpr, stride_out: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM_QK: tl.constexpr, PREC: tl.constexpr, GATED_NORM: tl.constexpr, FTZ: tl.constexpr,
):
    """The fused pass with the state held transposed, S^T [BV, BK], and every tile that meets it
    transposed too: U^T = (v^T - S^T (e^G k)^T) T^T, o^T = e^G (S^T q^T) + U^T P^T, S^T <- e^{G_last}
    S^T + (U^T e^{G_last - G}) k. The products on the sequential chain (S^T (e^G k)^T, then its
    difference from v^T times T^T, then U^T k) take the value that came out of the previous step
    as their left operand, which tensor cores read from registers; only operands formed from the
    chunk's inputs (e^G k, T^T, k, q^T, P^T) go through shared memory, and those do not wait for
    the state. (The untransposed form, with S as the right operand, took 3.192 / 1.614 ms at
    8x4096 with 16/32 / 8/16 heads against 2.382 / 1.141 on an H100.) One program per (sequence,
    head, dv block). GATED_NORM (one block spans dv): the output rows are stored as
    norm_w * o * rsqrt(mean(o^2) + eps) * silu(z) instead of o, z's head h at columns z_col0 + h DV.
    FTZ: exps as exp_ftz (_ftz: 16-bit inputs, dv blocks up to FUSED_FTZ_MAX_BV).

    U = T (v - e^G k S) is the WY form's u - w S with T taken out of both terms: a chunk then
    takes six products instead of seven (no w = T e^G k) and holds no w tile. H200, s42 call D,
    kernel time, 5 interleaved rounds, against u - w S: core 8x4096 0.6954 against 0.7964 ms
    (16/32 heads), 0.3526 / 0.3999 (8/16), 0.3415 / 0.3864 (4/8); the tp=1 layer at 8x4096
    0.8655 / 0.8978, a tp=2 rank's layer 0.4278 / 0.4512. Offline (Triton 3.6, sm_90a, core
    16/32) its spill stores fell from 144 to 36 B and its shared memory from 88 to 72 KB. Outputs
    moved by 3.7-4.0e-3 relative, states by 2.7-2.9e-3 (v - e^G k S, not w, is what is rounded to
    16 bits now; benchmarks/results/compare_h200x2_s42d.log)."""
    i_s, h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos, St, o_k, m_k, o_v, m_v, o_c, m_state, p_state = _walk_start(
        seqs, cu_seqlens, slots, has_state, state_pool, stride_ps, stride_ph, i_s, h, i_v, DK, DV, BK, BV)
    hk = h // R
    o_b = tl.arange(0, BV)      # columns of the dv block (o_v = i_v BV + o_b)
    Th, Gh = Tin + _head_off(h, n_tok, _C), Gin + _head_off(h, n_tok, 1)

    n_chunks = ((eos - bos + _C - 1) // _C).to(tl.int32)
    for i_t in range(0, n_chunks):
        # addresses: one int64 base per tile and chunk that holds every scalar part (the chunk's
        # row, the head's and the dv block's column), and int32 offsets inside the tile formed from
        # the aranges and the row strides alone, which are constexprs. The compiler then holds far
        # fewer per-thread offsets across the loop: with the column parts in the offsets and the
        # strides as arguments, the loop spilled and reloaded them (ncu, H200: the top stalls of
        # the pass were address arithmetic waiting on those reloads; benchmarks/results/
        # ncu_fused_h200_s19.log). Spill stores at BV 128 (Triton 3.6, sm_90a): 192 B against 144.
        # H200, fused pass kernel time (with exp_ftz and the second norm at BV 128, against
        # neither; 3 rounds, compare_cstride_h200_s19.log): tp=1 layer 8x4096 0.7841 ms against
        # 0.9698; core 8x4096 16/32 0.7926 against 0.9319, 8/16 0.3997 against 0.4689, 4/8 (BV 64)
        # 0.4519 against 0.4880. One compiled kernel per set of strides (a layer has one).
        t0 = bos + i_t * _C
        m_t = o_c < (eos - t0).to(tl.int32)
        G = tl.load(Gh + t0 + o_c, mask=m_t, other=0.0)
        # FTZ: exp_ftz at dv blocks up to FUSED_FTZ_MAX_BV (16-bit inputs)
        eG = exp_ftz(G, FTZ)
        # k [C, BK] for the products with q and the state, and e^G k for w, each rounded to 16 bits
        # once from k's fp32 tile (with NORM_QK, the norm and e^G in one factor a row). H200, core
        # 16/32 at 8x4096, against rounding e^G k from the rounded k: fused pass 0.9356 against
        # 0.9454 ms (3 rounds, benchmarks/results/compare_micro_h200_s18.log)
        kk = tl.load(k + (t0 * stride_k + k_col0 + hk * DK) + (o_c[:, None] * stride_k + o_k[None, :]),
                     mask=m_t[:, None] & m_k[None, :], other=0.0)
        dt = kk.dtype
        kf = kk.to(tl.float32)
        # kg = -e^G k: the product with the state then adds onto v^T in its accumulator
        if NORM_QK:
            rk = tl.rsqrt(tl.sum(kf * kf, axis=1) + 1e-6)
            kk = (kf * rk[:, None]).to(dt)
            kg = (kf * (-rk * eG)[:, None]).to(dt)
        else:
            kg = (kf * -eG[:, None]).to(dt)
        # q [C, BK]
        qq = _load_qk(q + (t0 * stride_q + q_col0 + hk * DK), o_c, m_t, stride_q, 0, o_k, m_k, NORM_QK, scale)
        mvt = m_v[:, None] & m_t[None, :]
        vt = tl.load(v + (t0 * stride_v + v_col0 + h * DV + i_v * BV) + (o_c[None, :] * stride_v + o_b[:, None]),
                     mask=mvt, other=0.0)                                                                   # [BV, C]
        # Tt[j, i] = T[i, j]: T's row i is token t0 + i
        Tt = _load_T(Th + t0 * _C, o_c[None, :], o_c[:, None], m_t[None, :])
        G_last = tl.load(Gh + tl.minimum(t0 + _C, eos) - 1)

        # P^T is only ever read as a 16-bit operand: cast once, where it is formed (fp32 tiles that
        # live until their use took registers; H200, 8x4096, 8/16 heads: 0.805 against 0.892 ms,
        # outputs bit-equal; benchmarks/results/exp_fused_variants_h200x2_s7.log)
        # Pt[j, i] = (k_j . q_i) e^{G_i - G_j} for j <= i
        causal = (o_c[:, None] <= o_c[None, :]) & m_t[None, :]
        Pt = (tl.dot(kk, tl.trans(qq), input_precision=PREC) * exp_ftz(
            tl.where(causal, G[None, :] - G[:, None], float("-inf")), FTZ)).to(dt)
        Sd = St.to(dt)
        Xt = tl.dot(Sd, tl.trans(kg), vt.to(tl.float32), input_precision=PREC)     # v^T - S^T (e^G k)^T [BV, C]
        Ut = tl.dot(Xt.to(dt), Tt, input_precision=PREC)                                                    # [BV, C]
        ot = tl.dot(Sd, tl.trans(qq), input_precision=PREC) * eG[None, :] + tl.dot(
            Ut.to(dt), Pt, input_precision=PREC)
        if GATED_NORM:                      # masked dv rows of ot are zero
            zz = tl.load(z + (t0 * stride_z + z_col0 + h * DV + i_v * BV) + (o_c[None, :] * stride_z + o_b[:, None]),
                         mask=mvt, other=0.0)
            zz = zz.to(tl.float32)
            nw = tl.load(norm_w + o_v, mask=m_v, other=0.0).to(tl.float32)
            ot = ot * tl.rsqrt(tl.sum(ot * ot, axis=0) / DV + eps)[None, :] * nw[:, None] * (zz * tl.sigmoid(zz))
        tl.store(out + (t0 * stride_out + h * DV + i_v * BV) + (o_c[None, :] * stride_out + o_b[:, None]),
                 ot.to(out.dtype.element_ty), mask=mvt)
        St = _advance(St, Ut, kk, G, G_last, PREC, FTZ)

    tl.debug_barrier()  # the initial state was read by every lane before it is overwritten
    tl.store(p_state, St.to(state_pool.dtype.element_ty), mask=m_state)


def _resolve_path(path: str | None, BV: int | None, n_seq: int, nv: int, dv: int, dtype: torch.dtype,
                  num_chunks: int, qk_normed: bool) -> tuple[str, int | None]:
    """(path, BV) of a call: choose_path's where not given (BV None on the scan path, which picks
    its blocks from its segment count)."""
    auto_path, auto_bv = choose_path(n_seq, nv, dv, dtype, num_chunks, qk_normed)
    if path is None:
        path = auto_path
    if BV is None and path != "scan":
        if path == auto_path:
            BV = auto_bv
        else:
            BV = min(max(16, next_pow2(dv)), FUSED_BV) if path == "fused" else split_bv(n_seq, nv, dv)
    return path, BV


def split_overlap_applies(device: torch.device, dtype: torch.dtype, n_pass: int, dk: int, dv: int) -> bool:
    """What `_split_overlap_kernel` needs before it is compiled: a Hopper GPU (the one kind it was
    measured on, and whose SMs programs_per_sm describes) with at least n_pass SMs (the walking
    programs), 16-bit inputs (fp32's exact products are not the fast path, and the split path's
    fp32 kernels took about two minutes each to compile for an H200), and dk, dv >= 64 (below,
    step 2 takes 8 warps, "wu_small", where the walk takes 4). Always True under the interpreter
    (see split_overlap_fits)."""
    if not _COMPILED:
        return True
    return (is_hopper(device) and dtype in (torch.bfloat16, torch.float16) and n_pass <= sm_count(device)
            and min(dk, dv) >= 64)


def split_overlap_fits(device: torch.device, dtype: torch.dtype, args: tuple, consts: dict) -> bool:
    """Whether `_split_overlap_kernel`, launched with these arguments (q, k, v of `dtype`; the state
    fp32), holds at least two programs an SM (compiled once per key to find out), so that step-2
    programs always find room beside the walking programs, which are at most the SM count
    (split_overlap_applies). Under the interpreter programs run one after another, step 2 first:
    always True."""
    if not _COMPILED:
        return True
    key = ("split_overlap", device, dtype, tuple(consts.items()))
    return compiled_per_sm(key, _split_overlap_kernel, (1,), *args, **consts) >= 2


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (the precision they ask for); 16-bit inputs use tf32
    # for the fp32-by-fp32 products of the solve, like their own bf16 products.
    return "ieee" if dtype == torch.float32 else "tf32"


def _ftz(prec: str, fused_bv: int | None = None) -> bool:
    """The FTZ constexpr of every chunk kernel: whether its exps take exp_ftz (one MUFU) instead of
    tl.exp. Only for 16-bit inputs (prec "tf32"), and in the fused pass (fused_bv given) only at
    dv blocks up to FUSED_FTZ_MAX_BV."""
    return prec != "ieee" and (fused_bv is None or fused_bv <= FUSED_FTZ_MAX_BV)


def scan_seg_chunks(num_chunks: int, nv: int) -> int:
    """The scan path's segment length: the shortest power of two >= SCAN_MIN_SEG_CHUNKS chunks
    that keeps (segment, value head) pairs to about SCAN_TARGET_PAIRS (shorter segments add
    summary and chain work; longer ones leave SMs idle)."""
    want = -(-num_chunks * nv // SCAN_TARGET_PAIRS)
    return max(SCAN_MIN_SEG_CHUNKS, next_pow2(max(1, want)))


def choose_path(n_seq: int, nv: int, dv: int, dtype: torch.dtype = torch.bfloat16,
                num_chunks: int | None = None, qk_normed: bool = False) -> tuple[str, int | None]:
    """(path, BV) for a prefill of n_seq sequences (num_chunks chunks in all) with nv local value
    heads; BV None for "scan", which picks its blocks from its segment count (scan_bvs).
    qk_normed: q and k come l2-normalised (chunk_delta_rule_varlen's normalize_qk False, as the
    layer calls it), which moves where one block starts to span dv (FUSED_FULL_DV_MIN_PROGRAMS_QK_NORMED).

    "fused" (w/u inside the sequential pass) moves the least memory but repeats the w and q k^T
    products in every dv block and runs them on the sequential path, so it needs many (sequence,
    head) programs; "split" (w/u in a parallel launch, a light pass that can cut dv finely)
    keeps the SMs busy when there are few; "scan" (split's launches, its pass run over segments
    in parallel from start states that a short chain per sequence forms) takes over when there
    are very few and long. Thresholds: benchmarks/bench_kernels.py (--sweep) and the notes at SCAN.
    """
    if num_chunks is not None and n_seq * nv <= SCAN_MAX_PAIRS and \
            num_chunks >= 2 * n_seq * scan_seg_chunks(num_chunks, nv):
        return "scan", None
    if n_seq * nv >= FUSED_MIN_PROGRAMS and dtype != torch.float32 and dv >= FUSED_BV:
        full = max(16, next_pow2(dv))
        least = FUSED_FULL_DV_MIN_PROGRAMS_QK_NORMED if qk_normed else FUSED_FULL_DV_MIN_PROGRAMS
        if n_seq * nv >= least and full <= FUSED_MAX_BV:
            return "fused", full
        return "fused", FUSED_BV
    return "split", split_bv(n_seq, nv, dv)


def _widest_block(widest: int, programs) -> int:
    """The widest of 128, 64, 32 (up to `widest`) at which programs(block) >= 128, else 16."""
    return next((bv for bv in (128, 64, 32) if bv <= widest and programs(bv) >= 128), 16)


def split_bv(n_seq: int, nv: int, dv: int) -> int:
    """The split path's dv block: the widest that still gives the sequential pass >= 128 programs
    (measured on an H200: fewer, wider programs leave SMs idle; more, narrower ones redo the w/k
    loads)."""
    return _widest_block(max(16, next_pow2(dv)), lambda bv: n_seq * nv * cdiv(dv, bv))


def scan_bvs(n_seg: int, nv: int, dk: int, dv: int) -> tuple[int, int, int]:
    """The scan path's dv blocks: (summary, chain, pass). The summary and the pass each take the
    widest block that still gives >= 128 programs over the segments (as split_bv)."""
    sum_bv = SCAN["summary_bv"] or _widest_block(max(16, next_pow2(max(dk, dv))),
                                                  lambda bv: n_seg * nv * (cdiv(dv, bv) + cdiv(dk, bv)))
    return sum_bv, SCAN["chain_bv"], split_bv(n_seg, nv, dv)


def intra_solve(k, a, b, A_log, dt_bias, meta, k_col0: int, nk: int, nv: int, dk: int, normalize_qk: bool,
                counts: torch.Tensor | None = None):
    """The first launch of every path, on its own: (T [nv, tokens, 64] in k's dtype, G [nv, tokens]
    fp32), per chunk T = (I + diag(beta) k k^T o Gamma)^-1 diag(beta) (row i at token i, its
    entries above the diagonal left unwritten) and the in-chunk cumulative gate G (arguments as
    chunk_delta_rule_varlen's). Storing T with beta folded in spares its readers beta: H200, against
    T and beta apart, the fused pass took 10% less and the solve 2.5% less in the tp=1 layer at
    8x4096 (benchmarks/results/compare_tbeta2_h200_s18.log). Head-major, so that one head's rows of a
    chunk are one contiguous block for every reader. Against token-major ([tokens, nv, 64]), H200,
    kernel times at 8x4096: the solve 6-15% less; the fused pass the same with q/k normalised
    before it (the layer) and 5-7% more with the l2norm inside (gdn_prefill); the split and scan
    paths 4-6% less in all (benchmarks/results/exp_layout_cmp*_h200_s14.log). counts: an int32
    [nv, tokens] buffer whose entries at each chunk's first token the solve sets to zero
    (`_split_overlap_kernel`'s counts). With a zero fill of their own after the solve, the one
    launch was queued 60 us after the point where the two-launch form queued w/u (core 1x4096
    16/32, a lent H200 host, benchmarks/results/host_h200_s43e.log); with the solve zeroing them,
    28 us after it on another host (host_h200x2_s43f.log)."""
    T, dev, dt = k.shape[0], k.device, k.dtype
    prec = _prec(dt)
    Tbuf = torch.empty(nv, T, CHUNK, device=dev, dtype=dt)
    G = torch.empty(nv, T, device=dev, dtype=torch.float32)
    launch(_intra_solve_kernel, (meta.num_chunks, nv),
        k, a, b, A_log, dt_bias, Tbuf, G, G if counts is None else counts, meta.chunks, meta.cu_seqlens,
        k.stride(0), a.stride(0), k_col0, T,
        R=nv // nk, DK=dk, BK=max(16, next_pow2(dk)), NORM_QK=2 if normalize_qk else 0, PREC=prec,
        FTZ=_ftz(prec), ZERO_COUNTS=counts is not None, **LAUNCH["solve"],
    )
    return Tbuf, G


def chunk_delta_rule_varlen(
    q, k, v, a, b, A_log, dt_bias, state_pool, out, meta, q_col0: int, k_col0: int, v_col0: int,
    nk: int, nv: int, dk: int, dv: int, normalize_qk: bool, BV: int | None = None, path: str | None = None,
    gated_norm: tuple | None = None, seg_chunks: int | None = None, overlap: bool | None = None,
):
    """Chunked gated delta rule over the prefill sequences of `meta` (those longer than 1 token).

    q, k: row-major [T, *] buffers whose columns [q_col0 + j dk, ...) hold key head j (so q, k of a
    fused buffer are used in place); v: [T, *] with value head h at columns v_col0 + h dv;
    a, b: [T, *] raw gate inputs, value head h at column h (pass column views, row stride kept);
    state_pool: [S, nv, dk, dv] (fp32), read for has_state sequences and overwritten with each
    final state; out: [T, *] receives o of value head h at columns h dv, or None: then a new
    [T, nv dv] tensor in v's dtype, allocated after the first launch (so that the solve starts
    sooner), takes o. Returns out.
    normalize_qk: l2-normalise q and k and scale q by dk^-0.5 inside (else they come normalised;
    the fused pass still normalises them again at dv blocks from FUSED_RENORM_MIN_BV up).
    path, BV: "split", "fused" or "scan" and the dv block of the sequential pass (default:
    choose_path; for "scan", scan_bvs). seg_chunks: the scan path's segment length in chunks
    (default SCAN["seg_chunks"], else scan_seg_chunks).
    gated_norm: (z, z_col0, weight, eps) to store norm_w * rmsnorm(o) * silu(z) instead of o,
    inside the fused pass; only where that pass runs with one dv block (fused_norm_applies).
    overlap: on the split path, run steps 2 and 3 in one launch, the walk taking each group of
    chunks as soon as step 2 has stored it (`_split_overlap_kernel`). None: where SPLIT_OVERLAP
    is on and the launch fits (split_overlap_applies, split_overlap_fits); True: raises where it
    does not fit; False: two launches.
    """
    if meta.num_chunks == 0:
        return out
    if path not in (None, *PATHS):
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    T = q.shape[0]
    dev, dt = q.device, q.dtype
    n_seq = meta.prefill_seqs.numel()
    # the split path's one-launch form counts stored chunks, which the solve zeroes: where a call
    # can take that form (the split path, fewer pairs than the fused path takes), its path is
    # worked out before the solve; elsewhere after it
    one_launch = overlap or (overlap is None and SPLIT_OVERLAP)     # asked for, or the default
    counts = None
    resolved = False
    if one_launch and (path == "split" or (path is None and n_seq * nv < FUSED_MIN_PROGRAMS)):
        path, BV = _resolve_path(path, BV, n_seq, nv, dv, dt, meta.num_chunks, not normalize_qk)
        resolved = True
        if path == "split":
            n_pass = n_seq * nv * cdiv(dv, BV)
            if split_overlap_applies(dev, dt, n_pass, dk, dv):
                counts = torch.empty(nv, T, device=dev, dtype=torch.int32)
    # the solve, the same on every path, goes first: a single call's GPU waits for its first kernel
    # while the host works out the rest (a call that the checks below refuse has then run the solve,
    # which writes only its own buffers)
    Tbuf, G = intra_solve(k, a, b, A_log, dt_bias, meta, k_col0, nk, nv, dk, normalize_qk, counts)
    assert state_pool.is_contiguous() and state_pool.dtype == torch.float32
    BK = max(16, next_pow2(dk))
    BVf = max(16, next_pow2(dv))
    if not resolved:
        path, BV = _resolve_path(path, BV, n_seq, nv, dv, dt, meta.num_chunks, not normalize_qk)
    if path == "fused" and q.is_cuda and (dt == torch.float32 or BV < 64):
        # 2026-11-28, H100, Triton 3.6, the untransposed fused kernel: fp32 tiles overflowed shared
        # memory, and BV=32 gave wrong results (4 warps) or an illegal address (8 warps). The
        # transposed kernel has not been tried there; the split path takes these
        raise ValueError(f"the fused prefill path takes 16-bit inputs and BV >= 64 on GPUs (got {dt}, BV={BV}); "
                         "use path='split'")
    if overlap and path != "split":
        raise ValueError(f"overlap applies to the split path only (this call takes path {path!r})")
    if seg_chunks is not None and path != "scan":
        raise ValueError(f"seg_chunks applies to the scan path only (this call takes path {path!r})")
    if gated_norm is not None and (path != "fused" or BV < dv):
        raise ValueError(f"the gated norm runs inside the fused pass with one dv block only (got path {path!r}, "
                         f"BV={BV}, dv={dv})")
    prec = _prec(dt)
    if out is None:
        out = torch.empty(T, nv * dv, device=dev, dtype=v.dtype)
    grid = (meta.num_chunks, nv)
    if path == "fused":
        z, z_col0, norm_w, eps = gated_norm or (out, 0, A_log, 0.0)     # unread without the norm
        launch(_fused_pass_kernel, (n_seq, nv, cdiv(dv, BV)),
            q, k, v, Tbuf, G, out, state_pool, meta.prefill_seqs, meta.cu_seqlens, meta.slots,
            meta.has_state, q_col0, k_col0, v_col0, dk ** -0.5,
            state_pool.stride(0), state_pool.stride(1), z, z.stride(0), z_col0, norm_w, eps, T,
            R=nv // nk, stride_q=q.stride(0), stride_k=k.stride(0), stride_v=v.stride(0), stride_out=out.stride(0),
            DK=dk, DV=dv, BK=BK, BV=BV, NORM_QK=normalize_qk or BV >= FUSED_RENORM_MIN_BV, PREC=prec,
            GATED_NORM=gated_norm is not None, FTZ=_ftz(prec, BV), **LAUNCH["fused"],
        )
        return out
    w = torch.empty(nv, T, dk, device=dev, dtype=dt)        # head-major, as intra_solve's outputs
    qp = torch.empty_like(w)
    u = torch.empty(nv, T, dv, device=dev, dtype=dt)
    oc = torch.empty_like(u)
    if path == "split" and one_launch:
        fits = counts is not None
        if fits:
            args = (q, k, v, Tbuf, G, w, qp, u, oc, out, state_pool, meta.chunks_by_step, meta.prefill_seqs,
                    meta.cu_seqlens, meta.slots, meta.has_state, counts, q.stride(0), k.stride(0), v.stride(0),
                    q_col0, k_col0, v_col0, dk ** -0.5, out.stride(0), state_pool.stride(0), state_pool.stride(1), T,
                    n_pass, meta.num_chunks * nv, nv // nk, nv, cdiv(dv, BV))
            consts = dict(DK=dk, DV=dv, BK=BK, BV=BV, BVF=BVf, GROUP=SPLIT_GROUP_CHUNKS, PASS_FIRST=bool(_COMPILED),
                          NORM_QK=normalize_qk, PREC=prec, FTZ=_ftz(prec), **LAUNCH["pass"])
            fits = split_overlap_fits(dev, dt, args, consts)
        if fits:
            launch(_split_overlap_kernel, (n_pass + meta.num_chunks * nv,), *args, **consts)
            return out
        if overlap:
            raise ValueError(f"the overlapped split pass does not fit this launch ({n_seq * nv * cdiv(dv, BV)} "
                             f"walking programs, {dt}, dk={dk}, dv={dv}): it takes a Hopper GPU, 16-bit inputs, dk "
                             "and dv >= 64, no more walking programs than SMs and two programs an SM "
                             "(split_overlap_applies, split_overlap_fits); use overlap=False")
    launch(_intra_wu_kernel, grid,
        q, k, v, Tbuf, G, w, qp, u, oc, meta.chunks, meta.cu_seqlens,
        q.stride(0), k.stride(0), v.stride(0), q_col0, k_col0, v_col0, dk ** -0.5, T,
        R=nv // nk, DK=dk, DV=dv, BK=BK, BV=BVf, NORM_QK=normalize_qk, PREC=prec, FTZ=_ftz(prec),
        **LAUNCH["wu" if min(dk, dv) >= 64 else "wu_small"],
    )
    pass_launch = dict(LAUNCH["pass" if path == "split" else "scan"])
    if dt == torch.float32:  # fp32 tiles at dk = dv = 128 overflow shared memory at 3 stages (H100)
        pass_launch["num_stages"] = min(pass_launch["num_stages"], 2)
    if path == "split":
        launch(_state_pass_kernel, (n_seq, nv, cdiv(dv, BV)),
            k, w, qp, u, oc, G, out, state_pool, meta.prefill_seqs, meta.cu_seqlens, meta.slots, meta.has_state,
            k.stride(0), k_col0, out.stride(0), state_pool.stride(0), state_pool.stride(1), T,
            R=nv // nk, DK=dk, DV=dv, BK=BK, BV=BV, NORM_QK=normalize_qk, PREC=prec, FTZ=_ftz(prec),
            **pass_launch,
        )
        return out
    # scan: the sequential pass over segments in parallel, from start states chained per sequence
    if seg_chunks is None:
        seg_chunks = SCAN["seg_chunks"] or scan_seg_chunks(meta.num_chunks, nv)
    seg = meta.segments(seg_chunks)
    n_seg = seg.num_segments
    summary = torch.empty(n_seg, nv, dv + dk, dk, device=dev, dtype=torch.float32)
    starts = torch.empty(n_seg, nv, dk, dv, device=dev, dtype=torch.float32)
    sum_bv, chain_bv, pass_bv = scan_bvs(n_seg, nv, dk, dv)
    pass_bv = pass_bv if BV is None else BV
    nvb = cdiv(dv, sum_bv)
    launch(_segment_summary_kernel, (n_seg, nv, nvb + cdiv(dk, sum_bv)),
        k, w, u, G, summary, seg.bounds, k.stride(0), k_col0, T,
        R=nv // nk, DK=dk, DV=dv, BK=BK, BV=sum_bv, NVB=nvb, HV=nv, NORM_QK=normalize_qk, PREC=prec, FTZ=_ftz(prec),
        **pass_launch,
    )
    launch(_segment_chain_kernel, (n_seq, nv, cdiv(dv, chain_bv)),
        summary, starts, state_pool, meta.prefill_seqs, seg.seq_first, meta.slots, meta.has_state,
        state_pool.stride(0), state_pool.stride(1), HV=nv, DK=dk, DV=dv, BK=BK, BV=chain_bv, PREC=prec,
        **LAUNCH["chain"],
    )
    launch(_state_pass_kernel, (n_seg, nv, cdiv(dv, pass_bv)),
        k, w, qp, u, oc, G, out, starts, seg.pairs, seg.bounds, seg.slots, seg.ones,
        k.stride(0), k_col0, out.stride(0), starts.stride(0), starts.stride(1), T,
        R=nv // nk, DK=dk, DV=dv, BK=BK, BV=pass_bv, NORM_QK=normalize_qk, PREC=prec, FTZ=_ftz(prec),
        **pass_launch,
    )
    return out
