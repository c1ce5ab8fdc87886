"""GDNLayer: one Gated DeltaNet layer holding this rank's slice of the heads.

Rank p of tp holds key heads [p nk/tp, (p+1) nk/tp) and the value heads that read them; every
per-head stage is local, and the output projection's partial sums are all-reduced (the only
communication: in `RowParallelLinear.forward`, per token piece in `forward(overlap=N)`, or per row
chunk of the output in `forward(tail=N)`, the default for large calls at tp=2, where copy engines
move the chunks if they can).

Parameters and how each takes its shard from the full (unsharded) layer:
  in_proj.weight   [2kd + 2vd + 2nv, H]  rows [q | k | v | z | b | a], block p of each segment
  conv_weight      [2kd + vd, K]         rows [q | k | v], block p of each segment
  A_log, dt_bias   [nv]                  block p (fp32)
  norm_weight      [dv]                  replicated (fp32)
  out_proj.weight  [H, vd]               column block p
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .batch import Batch
from .cache import StateCache
from .config import GDNConfig
from .kernels import get_ops, resolve_backend
from .kernels.reference import proj_z
from .parallel import ColumnParallelLinear, Replicate, RowParallelLinear, Split, load_full_, sharded_parameter
from .parallel.blaslt import TunedGemm, gemm_mode
from .parallel.comm import all_reduce_sum_async_
from .parallel.linear import product

# forward's default overlap: token pieces whose all-reduce runs while the next piece computes,
# used at tp > 1 for calls of at least OVERLAP_MIN_TOKENS tokens. Off: on H100s at 8x4096 tokens
# 2 pieces gained 2% at tp=2 and lost 11% at tp=4 (benchmarks/RESULTS.md, bench_layer.py)
OVERLAP_PIECES = 1
OVERLAP_MIN_TOKENS = 8192
# forward's default tail: for calls of at least TAIL_MIN_TOKENS tokens whose output takes the
# process group's all-reduce as a whole, the gated norm, out_proj and the all-reduce run in row
# chunks, chunk i's all-reduce beside chunk i+1's norm and GEMM: TAIL_CHUNKS[(kind, tp)] chunks,
# kind being the all-reduce the chunks take (out_proj.chunked_all_reduce_kind): "copy" (copy
# engines, comm.CopyEngineAllReduce, where it applies, from its MIN_ROWS rows) or "group" (NCCL's
# stream); a pair without an entry takes 1 (off). Measured at tp=2 only. NCCL: H200 x2, 8x4096
# tokens, 80B dims, three runs, single / back to back, 2 chunks 2.761 / 2.670, 2.734 / 2.681,
# 2.826 / 2.716 ms against 2.860 / 2.747, 2.824 / 2.751, 2.868 / 2.734 in one piece; 4 chunks
# 2.810 / 2.705, 2.808 / 2.744, 2.862 / 2.710; the GEMM and all-reduce cut without the norm gained nothing
# (benchmarks/results/exp_ar_*_h200x2_s22.log); bench_layer.py on another host: 2 chunks 2.689 /
# 2.657 against 2.793 / 2.731, 4 chunks 2.764 / 2.720, outputs bit-equal (layer_pre_h200x2_s22_tp2.log).
# Copy engines, H200 x2, 8x4096, outputs bit-equal to one piece on NCCL in every run, single /
# back to back, ms (one host per line):
#   a prototype: 2 / 4 / 8 chunks 2.692 / 2.565, 2.658 / 2.529, 2.692 / 2.504; NCCL's 2 chunks
#     2.766 / 2.593 and 2.843 / 2.657 (before and after) (exp_ce_h200x2_s26.log)
#   bench_layer.py: 2 / 4 / 8 chunks 2.887 / 2.609, 2.854 / 2.552, 3.187 / 3.364; NCCL's 2 / 4
#     chunks 2.849 / 2.629, 2.925 / 2.698 (layer_pre_h200x2_s26_tp2.log)
#   bench_layer.py: 2 / 4 / 8 chunks 2.855 / 2.811, 2.791 / 2.562, 2.777 / 2.532; NCCL's 2 / 4
#     chunks 2.882 / 2.695, 2.888 / 2.683 (layer_pre_h200x2_s26b_tp2.log)
#   medians of 3 interleaved rounds: 2 / 3 / 4 / 6 / 8 chunks 2.900 / 2.660, 2.826 / 2.647,
#     2.832 / 2.611, 2.801 / 2.622, 2.989 / 2.649; NCCL's 2 chunks 2.885 / 2.735, one piece
#     2.995 / 2.816 (exp_ce2_h200x2_s26.log)
#   with the last chunk summed on the main stream (CopyEngineAllReduce.LAST_ON_MAIN), medians of 7
#     interleaved rounds, two hosts: 3 / 4 / 6 chunks 2.849 / 2.663, 2.777 / 2.655, 2.771 / 2.676
#     and 2.825 / 2.649, 2.849 / 2.651, 2.820 / 2.631 (exp_last_h200x2_s30c.log, _s30g.log); a
#     last chunk of 20, 16 or 12% of the rows (the rest even) gained nothing at 4 chunks
#     (exp_uneven_h200x2_s30d.log)
TAIL_CHUNKS = {("copy", 2): 4, ("group", 2): 2}
TAIL_MIN_TOKENS = 8192


# the dtypes each backend computes in (weights and activations; the recurrent state is fp32)
BACKEND_DTYPES = {"torch": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
                  "triton": (torch.float32, torch.bfloat16, torch.float16)}


def check_dtype(dtype: torch.dtype, backend: str) -> None:
    """Refuse a dtype that the (resolved) backend does not compute in, e.g. an integer or fp8
    dtype, to which a load would otherwise silently cast the weights."""
    if dtype not in BACKEND_DTYPES[backend]:
        names = ", ".join(str(d).removeprefix("torch.") for d in BACKEND_DTYPES[backend])
        raise ValueError(f"dtype {dtype} is not one the {backend!r} backend computes in ({names})")


def full_shapes(cfg: GDNConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the unsharded layer's parameters, by parameter name."""
    kd, vd, nv = cfg.key_dim, cfg.value_dim, cfg.num_v_heads
    return {
        "in_proj.weight": (2 * kd + 2 * vd + 2 * nv, cfg.hidden_size),
        "conv_weight": (cfg.conv_dim, cfg.conv_kernel),
        "A_log": (nv,),
        "dt_bias": (nv,),
        "norm_weight": (cfg.head_v_dim,),
        "out_proj.weight": (cfg.hidden_size, vd),
    }


class GDNLayer(nn.Module):
    def __init__(self, cfg: GDNConfig, layer_id: int, tp_rank: int = 0, tp_size: int = 1, group=None,
                 dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto"):
        super().__init__()
        cfg.check_tp(tp_size)
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is not in [0, {tp_size})")
        cfg.check_layer_ids([layer_id])
        self.cfg, self.layer_id = cfg, layer_id
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.dtype, self.device = dtype, torch.device(device)
        self.backend = resolve_backend(backend, self.device)
        check_dtype(dtype, self.backend)
        self.ops = get_ops(self.backend)
        self.ops.check_config(cfg)
        self.nk, self.nv = cfg.num_k_heads // tp_size, cfg.num_v_heads // tp_size
        self.dk, self.dv = cfg.head_k_dim, cfg.head_v_dim

        kd, vd, nv = cfg.key_dim, cfg.value_dim, cfg.num_v_heads
        shapes = full_shapes(cfg)
        f32 = torch.float32
        self.in_proj = ColumnParallelLinear(cfg.hidden_size, (kd, kd, vd, vd, nv, nv), tp_size, dtype, device)
        self.conv_weight = sharded_parameter(shapes["conv_weight"], Split(0, (kd, kd, vd)), tp_size, dtype, device)
        self.A_log = sharded_parameter(shapes["A_log"], Split(0, (nv,)), tp_size, f32, device)
        self.dt_bias = sharded_parameter(shapes["dt_bias"], Split(0, (nv,)), tp_size, f32, device)
        self.norm_weight = sharded_parameter(shapes["norm_weight"], Replicate(), tp_size, f32, device)
        self.out_proj = RowParallelLinear(vd, cfg.hidden_size, tp_size, dtype, device, group)
        if hasattr(self.ops, "few_rows_product"):
            # calls of up to triton_gemv.MAX_ROWS tokens (one: a decode step of one sequence): Triton
            # products; out_proj's follows the mixer's kernels under PDL, and forms the gated norm
            # itself where it can (_core_out_proj)
            self.in_proj.products = (self.ops.few_rows_product(pdl=False),)
            self.out_proj.products = (self.ops.few_rows_product(pdl=True),)
        # the backend of the fast path on GPUs: products of many rows through cuBLASLt, the algorithm
        # picked by timing (parallel/blaslt.py; TP_GDN_GEMM=cublas leaves them to torch's call)
        mode = gemm_mode()      # checked wherever the layer runs
        self.gemm = "tuned" if mode == "tuned" and self.backend == "triton" and self.device.type == "cuda" else "cublas"
        if self.gemm == "tuned":
            tuned = TunedGemm.for_device(self.device)
            self.in_proj.products += (tuned,)
            self.out_proj.products += (tuned,)

    @classmethod
    def from_full(cls, cfg: GDNConfig, layer_id: int, full: dict[str, torch.Tensor], tp_rank: int = 0,
                  tp_size: int = 1, **kw) -> "GDNLayer":
        """Build this rank's shard from the unsharded layer's weights (names as in `full_shapes`)."""
        layer = cls(cfg, layer_id, tp_rank, tp_size, **kw)
        load_full_(layer, full, tp_rank, tp_size)
        return layer

    def extra_repr(self) -> str:
        return (f"layer={self.layer_id}, tp={self.tp_rank}/{self.tp_size}, heads k/v={self.nk}/{self.nv}, "
                f"dtype={self.dtype}, backend={self.backend}, gemm={self.gemm}")

    # -- checks that run before any state is touched (forward: in_proj, _check_x, _check_cache) ---
    def _check_x(self, x: torch.Tensor, batch: Batch) -> None:
        """What in_proj's product needs: x a [tokens, H] tensor of the layer's dtype and device,
        one row per token of a tp_gdn.Batch."""
        H = self.cfg.hidden_size
        if not isinstance(batch, Batch):
            raise TypeError(f"batch must be a tp_gdn.Batch, got {type(batch).__name__}")
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a [tokens, hidden_size={H}] tensor, got {shape}")
        T, width = x.shape
        if width != H:
            raise ValueError(f"x has width {width}, but hidden_size is {H}")
        if T != batch.num_tokens:
            raise ValueError(
                f"x has {T} rows, but the batch's seq_lens {list(batch.seq_lens)} sum to {batch.num_tokens}")
        if x.dtype != self.dtype:
            raise ValueError(f"x is {x.dtype}, but layer {self.layer_id} holds {self.dtype} weights")
        if x.device != self.in_proj.weight.device:
            raise ValueError(f"x is on {x.device}, but layer {self.layer_id} is on {self.in_proj.weight.device}")

    def _check_cache(self, x: torch.Tensor, batch: Batch, cache: StateCache) -> None:
        """What the mixer needs: a cache that holds this layer's states, for this tp, in x's dtype
        and on x's device, with a slot for every sequence of the batch."""
        if not isinstance(cache, StateCache):
            raise TypeError(f"cache must be a tp_gdn.StateCache, got {type(cache).__name__}")
        if self.layer_id not in cache.conv:
            raise ValueError(f"the cache holds no state for layer {self.layer_id} (it has {cache.layer_ids})")
        if cache.tp_size != self.tp_size:
            raise ValueError(f"the cache was built for tp={cache.tp_size}, the layer is sharded for tp={self.tp_size}")
        conv_pool = cache.conv[self.layer_id]
        if conv_pool.device != x.device or conv_pool.dtype != x.dtype:
            raise ValueError(
                f"the cache's conv state is {conv_pool.dtype} on {conv_pool.device}; x is {x.dtype} on {x.device}")
        bad = [s for s in batch.slots if s >= cache.num_slots]
        if bad:
            raise ValueError(f"slot {bad[0]} is out of range: the cache has {cache.num_slots} slots "
                             f"(0..{cache.num_slots - 1})")

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x_TH: torch.Tensor, batch: Batch, cache: StateCache, overlap: int | None = None,
                tail: int | None = None) -> torch.Tensor:
        """x [tokens, H] (the same on every rank) -> y [tokens, H] (the same on every rank).

        Each used slot holds its sequence's state after the call. `overlap` > 1 (at tp > 1) cuts
        the tokens into that many pieces (Batch.token_pieces) and all-reduces each piece's
        output asynchronously while the next piece computes; None takes OVERLAP_PIECES for calls
        of at least OVERLAP_MIN_TOKENS tokens, else 1. `tail` > 1 (at tp > 1, where the output
        takes the process group's all-reduce, in one piece) cuts the gated norm, out_proj and
        the all-reduce into that many row chunks, each chunk's all-reduce started before the next
        chunk's norm (the norm runs as its own kernel there), on copy engines where
        out_proj.chunked_all_reduce_kind says "copy", else on NCCL's stream; None takes
        TAIL_CHUNKS[(kind, tp)] for calls of at least TAIL_MIN_TOKENS tokens, else 1 (and 1 where
        the backend forms the norm inside its fused pass, triton_ops.FUSE_NORM). Both give the
        same numbers as one piece at tp=2 (at tp > 2 the copy engines' sum, in rank order, can
        differ from NCCL's in the last bit). Runs without autograd (as under torch.no_grad).
        """
        if not torch.is_grad_enabled():
            return self._forward(x_TH, batch, cache, overlap, tail)
        # torch.set_grad_enabled as a call, not the no_grad decorator: 1.1 against 2.3 us of host
        # time a call on the development machine, 3-5x that on the lent GPU hosts, where a single
        # call's GPU waits for the host up to in_proj
        torch.set_grad_enabled(False)
        try:
            return self._forward(x_TH, batch, cache, overlap, tail)
        finally:
            torch.set_grad_enabled(True)

    def _forward(self, x_TH, batch: Batch, cache: StateCache, overlap: int | None, tail: int | None):
        proj = meta = None
        if overlap == 1 or (overlap is None and OVERLAP_PIECES == 1):
            # in_proj over the whole call, queued before the rest of the host's work (x's and the
            # cache's checks, the tail's set-up): in a single call the idle GPU waits for this
            # first kernel. A call that the checks refuse has then run one GEMM at most, and no
            # state has changed; where the product itself fails on x, x's check reports why. The
            # batch meta's index copies (a new batch's) go ahead of the GEMM, which is then the
            # launch just ahead of gdn_mix's (after_gemm)
            try:
                meta = batch.meta(x_TH.device)
                proj = self.in_proj(x_TH)
            except Exception as e:
                failed = e
            else:
                failed = None
            if failed is not None:
                self._check_x(x_TH, batch)      # the clear error where x or the batch is at fault
                raise failed
        self._check_x(x_TH, batch)
        if overlap is None:
            overlap = OVERLAP_PIECES if batch.num_tokens >= OVERLAP_MIN_TOKENS else 1
        if overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {overlap}")
        if tail is not None and tail < 1:
            raise ValueError(f"tail must be >= 1, got {tail}")
        pieces = batch.token_pieces(overlap) if overlap > 1 and self.tp_size > 1 else []
        if proj is None and len(pieces) < 2:
            meta = batch.meta(x_TH.device)
            proj = self.in_proj(x_TH)
        self._check_cache(x_TH, batch, cache)
        kind = self.out_proj.chunked_all_reduce_kind(batch.num_tokens)
        if tail is None:
            # off where the backend forms the gated norm inside its fused pass (triton_ops.FUSE_NORM):
            # the tail cuts the norm apart
            fused_norm = getattr(self.ops, "FUSE_NORM", False)
            tail = TAIL_CHUNKS.get((kind, self.tp_size), 1) \
                if batch.num_tokens >= TAIL_MIN_TOKENS and not fused_norm else 1
        parts = len(pieces) if len(pieces) > 1 else min(tail, batch.num_tokens)
        if kind == "copy" and parts > self.out_proj.copy.MAX_CHUNKS:
            raise ValueError(f"the copy-engine all-reduce takes at most {self.out_proj.copy.MAX_CHUNKS} row chunks "
                             f"a call (this call asks for {parts}); TP_GDN_ALL_REDUCE=nccl takes any number")
        if proj is not None:
            if tail > 1 and kind in ("group", "copy"):
                return self._out_proj_by_rows(x_TH, self._tail_chunks(x_TH, batch, cache, parts, proj, meta), kind)
            return self._core_out_proj(x_TH, batch, cache, proj, meta)
        return self._out_proj_by_rows(
            x_TH, ((t0, t1, self.partial_core(x_TH[t0:t1], sub, cache)) for t0, t1, sub in pieces), kind)

    def _core_out_proj(self, x_TH, batch: Batch, cache: StateCache, proj, meta) -> torch.Tensor:
        """out_proj(partial_core(...)), in one piece. Where out_proj's first product forms the
        gated norm as it reads the mixer's o (few_rows_product's takes_norm: a decode step of one
        token), it does, and also the q|k conv-state shift that the norm's launch would do: one
        launch fewer a step. proj, meta: as partial_core's."""
        T = x_TH.shape[0]
        nk, nv, dk, dv = self.nk, self.nv, self.dk, self.dv
        first = self.out_proj.products[0] if self.out_proj.products else None
        takes_norm = getattr(first, "takes_norm", None)
        if takes_norm is None or not takes_norm(T, nv * dv, dv):
            return self.out_proj(self.partial_core(x_TH, batch, cache, proj, meta))
        conv = cache.conv[self.layer_id]
        o = self.ops.gdn_mix(proj, nk, nv, dk, dv, self.conv_weight, self.A_log, self.dt_bias, conv,
                             cache.ssm[self.layer_id], batch, meta, shift_qk=False, after_gemm=True)
        norm = self.ops.product_norm(proj, nk, nv, dk, dv, conv, meta, self.norm_weight, self.cfg.rms_norm_eps)
        return self.out_proj(o.view(T, nv * dv), norm=norm)

    def _out_proj_by_rows(self, x_TH, parts, kind: str) -> torch.Tensor:
        """y [tokens, H] from `parts`, (r0, r1, the gated-norm output of rows r0..r1) in turn: each
        part's out_proj product goes into its rows, and its all-reduce starts at once, before the
        next part is formed (`parts` is a generator, so the next part's kernels run beside it):
        with kind "copy" on the copy engines (the product goes into the mapped buffer, the sum
        into y), else on NCCL's stream (in place in y). Returns y once every all-reduce is done
        (as the current stream sees it). The first part is formed before anything else here, so
        that the call's first kernels (in_proj and the mixer) are queued as early as they can be:
        an idle GPU waits for them (a single call at tp=2, copy engines, H200 x2: in_proj was
        queued 145 us after the call started with the copy engines' start ahead of it, against
        68 us with NCCL's stream; benchmarks/results/probe_host_h200x2_s26.log)."""
        parts = iter(parts)
        if kind == "copy":
            return self._copy_engine_tail(x_TH, parts)
        first = next(parts)
        y = torch.empty(x_TH.shape, device=x_TH.device, dtype=x_TH.dtype)
        pending = []
        for r0, r1, a in itertools.chain([first], parts):
            product(self.out_proj, a, out=y[r0:r1])
            pending.append(all_reduce_sum_async_(y[r0:r1], self.out_proj.group))
        for work in pending:
            if work is not None:
                work.wait()
        return y

    def _copy_engine_tail(self, x_TH, parts) -> torch.Tensor:
        """_out_proj_by_rows on the copy engines. The peers' streams wait on this rank's flags,
        and stream waits have no timeout: if this rank raises anywhere from the first part
        (in_proj) to the last reduce, it releases them before the error goes on (CopyEngineCall.
        abort; starting the call first where it had not started), so that a caller who catches
        the error does not leave its peers' GPUs waiting for ever."""
        copy = self.out_proj.copy
        call, starting = None, False
        try:
            first = next(parts)
            y = torch.empty(x_TH.shape, device=x_TH.device, dtype=x_TH.dtype)
            starting = True
            call = copy.start(y.shape[0], y.shape[1], y.dtype)
            for r0, r1, a in itertools.chain([first], parts):
                product(self.out_proj, a, out=call.partial(r0, r1))
                call.reduce(r0, r1, y[r0:r1], last=r1 == y.shape[0])
        except BaseException as e:
            if call is not None or not starting:      # (where start itself failed there is no call to end)
                try:
                    (call or copy.start(x_TH.shape[0], x_TH.shape[1], x_TH.dtype)).abort()
                except Exception as abort_error:
                    e.add_note(f"releasing the peers' copy-engine waits failed as well: {abort_error!r}")
            raise
        call.finish()
        return y

    def _tail_chunks(self, x_TH, batch: Batch, cache: StateCache, chunks: int, proj, meta):
        """The call's gated-norm output in `chunks` row chunks, (r0, r1, rows r0..r1), each formed
        when asked: the mixer runs once, then each chunk's norm. Each row's norm is the one
        partial_core forms. proj: in_proj's product of x, the launch just ahead (after_gemm);
        meta: the batch's."""
        T = x_TH.shape[0]
        nk, nv, dk, dv = self.nk, self.nv, self.dk, self.dv
        o = self.ops.gdn_mix(proj, nk, nv, dk, dv, self.conv_weight, self.A_log, self.dt_bias,
                             cache.conv[self.layer_id], cache.ssm[self.layer_id], batch, meta, after_gemm=True)
        z = proj_z(proj, nk, nv, dk, dv)
        for i in range(chunks):
            r0, r1 = i * T // chunks, (i + 1) * T // chunks
            normed = self.ops.gated_rmsnorm(o[r0:r1], z[r0:r1], self.norm_weight, self.cfg.rms_norm_eps,
                                            out_dtype=x_TH.dtype)
            yield r0, r1, normed.reshape(r1 - r0, nv * dv)

    def partial_core(self, x_TH, batch: Batch, cache: StateCache, proj=None, meta=None) -> torch.Tensor:
        """Everything before the output projection: the gated-norm output [T, nv/tp * dv]. proj,
        meta: in_proj's product of x, launched just ahead, and the batch's meta (both formed here
        where not given)."""
        T = x_TH.shape[0]
        nk, nv, dk, dv = self.nk, self.nv, self.dk, self.dv
        if proj is None:
            meta = batch.meta(x_TH.device)     # a new batch's index copies go ahead of the GEMM (after_gemm)
            proj = self.in_proj(x_TH)
        y = self.ops.gdn_mix_norm(proj, nk, nv, dk, dv, self.conv_weight, self.A_log, self.dt_bias,
                                  cache.conv[self.layer_id], cache.ssm[self.layer_id], batch, meta,
                                  self.norm_weight, self.cfg.rms_norm_eps, out_dtype=x_TH.dtype, after_gemm=True)
        return y.reshape(T, nv * dv)
