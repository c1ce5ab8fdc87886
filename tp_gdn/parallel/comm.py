"""The collectives the tensor-parallel layer uses, each one call, visible at its call site.

Small all-reduces (a decode step's output) can run as one kernel over CUDA symmetric memory instead
of through NCCL: one kernel per rank moves the partial sums over NVLink between buffers that every
rank of the group has mapped, and sums them (`SymmetricAllReduce`; by default our flag-in-word
kernel for the smallest, our push kernel above; TP_GDN_SYMM_KERNEL picks one, or torch's one-shot
kernel). Large outputs that the layer forms in row chunks can move on copy engines instead
(`CopyEngineAllReduce`), so that the next chunk's GEMM keeps every SM. The environment variable
TP_GDN_ALL_REDUCE picks the mode, read where a row-parallel layer is built:
  auto (default)  symmetric memory for outputs of up to SYMM_MAX_BYTES, and copy engines for
                  outputs formed in row chunks, where they apply (NCCL group of CUDA ranks on
                  one host whose GPUs reach each other peer to peer; for the copy engines also
                  a driver with stream memory operations), NCCL for the rest and everywhere else;
  nccl            always the process group's own all-reduce;
  symm            as auto, but an error where either does not apply.
"""

from __future__ import annotations

import math
import os
import socket
import warnings

import torch
import torch.distributed as dist

from . import streamops, watchdog

ALL_REDUCE_MODES = ("auto", "nccl", "symm")
# outputs up to this size take the symmetric-memory all-reduce (a decode step of up to 512
# sequences at hidden size 2048 in bf16). H200 x2, graph replay back to back: the all-reduce of
# [1, 2048] bf16 alone, NCCL 11.5 us, one-shot 9.6; [256, 2048], 20.2 against 16.6
# (benchmarks/results/exp_allreduce_h200x2_s7.log); the layer's decode step at tp=2 (80B dims)
# of 1 / 4 / 16 sequences, NCCL 58.5 / 73.8 / 72.6 us, one-shot 31.4 / 32.0 / 44.8
# (exp_decode_variants_tp2_h200x2_s7.log). Those are torch's one-shot kernel; ours (push) was
# timed in the layer at one sequence only (benchmarks/RESULTS.md, ninth session)
SYMM_MAX_BYTES = 2 << 20


def all_reduce_sum_(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `x` over the ranks of `group` in place and return it (a no-op on one rank)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_reduce_sum_async_(x: torch.Tensor, group=None):
    """Start summing `x` over the ranks of `group` in place; returns the work to `wait()` on
    (None on one rank). NCCL runs it on its own stream, so later kernels overlap it."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        return dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return None


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """Environment variable `name`, trimmed and lower-cased (default: choices[0]), checked."""
    value = os.environ.get(name, choices[0]).strip().lower()
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def all_reduce_mode() -> str:
    """TP_GDN_ALL_REDUCE (default "auto"), checked."""
    return _env_choice("TP_GDN_ALL_REDUCE", ALL_REDUCE_MODES)


SYMM_KERNELS = ("auto", "ll", "push", "oneshot")
# "auto" takes the flag-in-word kernel for all-reduces of up to this many bytes, the push kernel
# above. H200 x2, graphed decode step at tp=2 (80B dims, 7 interleaved rounds each), single /
# back to back in us, flag-in-word against push: 1 sequence (4 KiB) 22.96 / 18.64 against 24.35 /
# 20.28; 32 (128 KiB) 51.68 / 47.81 against 53.39 / 48.88; 64 (256 KiB) 70.42 / 66.42 against
# 71.25 / 67.06; 128 (512 KiB) 117.76 / 104.80 against 117.41 / 104.40; 256 (1 MiB) 187.30 /
# 182.14 against 183.97 / 179.20; 512 (2 MiB) 348.90 / 342.52 against 339.06 / 333.00
# (benchmarks/results/decode_ab_h200x2_s44[cd]_b*.log)
LL_MAX_BYTES = 256 << 10


def symm_kernel() -> str:
    """TP_GDN_SYMM_KERNEL (default "auto"), checked: which kernel the symmetric all-reduce runs."""
    return _env_choice("TP_GDN_SYMM_KERNEL", SYMM_KERNELS)


class SymmetricAllReduce:
    """Sum of small tensors over CUDA symmetric memory, for the ranks of one group on one host.
    A caller writes its partial sum into `staging(shape, dtype)` and calls
    `reduce_out(staged, out)`. It runs on the current stream, with no host synchronisation, and
    can be captured in a CUDA graph. Build it on every rank of the group at the same point (it is
    a collective). The kernels (TP_GDN_SYMM_KERNEL, read here):

    auto (default)  ll for all-reduces of up to LL_MAX_BYTES, push above (where ll's words, twice
                    the data's bytes, cost more than push's flag);
    ll              ours (kernels/triton_allreduce.ll_all_reduce): each rank writes its partial
                    sum into every peer's mapped buffer in 8-byte words that carry 4 bytes of
                    data and the call's epoch; each rank waits until its words hold this call's
                    epoch and sums what it received, in rank order (every rank gets the same
                    bits). No flag and no fence at system scope;
    push            ours (triton_allreduce.push_all_reduce): as ll, but the data goes as it is,
                    and then a flag, raised with release semantics at system scope, says it has
                    arrived. On two H200s the tp=2 decode step of one sequence (80B dims, graph,
                    back to back, one run) took 23.6 us, against 27.0 with oneshot and 27.8 with
                    NCCL (benchmarks/results/layer_dec_tp2_h200x2_s9.log);
    oneshot         torch's one_shot_all_reduce: staging is this rank's mapped buffer; the kernel
                    waits until every rank has written, reads and sums every rank's buffer, and
                    waits again until every rank has read.

    ll and push give the same bits. Under auto they share one table of epochs: a call of either
    kernel advances the epochs of the programs it runs, so the argument for one wait
    (triton_allreduce) holds across the two, each on its own buffers. Where ll applies, the kernel
    that forms the staged output may push ll's words itself (`word_push`: the few-row product at
    one token, triton_gemv), and `reduce_out(..., pushed=True)` then only waits and sums. H200 x2,
    decode 1 at tp=2, 7 interleaved rounds: 25.68 / 18.17 us single / back to back against 25.94 /
    18.92 with the all-reduce pushing (benchmarks/results/decode_ab_h200x2_s44i_b1.log).
    """

    def __init__(self, group, device: torch.device, max_bytes: int = SYMM_MAX_BYTES, kernel: str | None = None):
        import torch.distributed._symmetric_memory as symm

        self.group, self.group_name = group, group.group_name
        self.device, self.max_bytes = device, max_bytes
        self.kernel = symm_kernel() if kernel is None else kernel
        if self.kernel not in SYMM_KERNELS:
            raise ValueError(f"kernel {self.kernel!r}: expected one of {', '.join(SYMM_KERNELS)}")
        if hasattr(symm, "enable_symm_mem_for_group"):
            # older torch needs this before a rendezvous; torch 2.11 (where this ran) calls it
            # deprecated and unneeded, and would warn on every rank
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm.enable_symm_mem_for_group(self.group_name)
        if self.kernel == "oneshot":
            self.buffer = symm.empty(max_bytes, dtype=torch.uint8, device=device)
            self.handle = symm.rendezvous(self.buffer, self.group_name)
            return
        from ..kernels.triton_allreduce import BLOCK_BYTES, WORD_BYTES

        world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        whole = lambda n: -(-n // BLOCK_BYTES) * BLOCK_BYTES      # noqa: E731 (whole programs)
        max_bytes = self.max_bytes = whole(max_bytes)
        programs = max_bytes // BLOCK_BYTES
        # the bytes of the all-reduces each kernel takes: flag-in-word up to ll_max, push above
        self.ll_max = {"auto": whole(min(LL_MAX_BYTES, max_bytes)), "ll": max_bytes, "push": 0}[self.kernel]
        push_bytes = max_bytes if self.ll_max < max_bytes else 0
        # one mapped buffer: ll's words [parity, source rank, a region's words] (8 bytes a word per
        # WORD_BYTES of data), push's regions [parity, source rank, bytes] and its flags [program,
        # source rank] int64; all zero at start (epoch 0 in every word and flag)
        self.slot_words = self.ll_max // WORD_BYTES
        ll_bytes = 2 * world * self.slot_words * 8
        push_recv = 2 * world * push_bytes
        flag_bytes = programs * world * 8 if push_bytes else 0
        self.buffer = symm.empty(ll_bytes + push_recv + flag_bytes, dtype=torch.uint8, device=device)
        self.handle = symm.rendezvous(self.buffer, self.group_name)
        self.buffer.zero_()
        self.staged = torch.empty(max_bytes, dtype=torch.uint8, device=device)
        self.epochs = torch.zeros(programs, dtype=torch.int64, device=device)
        ptrs = list(self.handle.buffer_ptrs)
        self.words_ptrs = torch.tensor(ptrs, dtype=torch.int64, device=device) if self.ll_max else None
        self.recv_ptrs = self.flag_ptrs = None
        if push_bytes:
            self.recv_ptrs = torch.tensor([q + ll_bytes for q in ptrs], dtype=torch.int64, device=device)
            self.flag_ptrs = torch.tensor([q + ll_bytes + push_recv for q in ptrs], dtype=torch.int64, device=device)
        # the kernels spin on what their peers push with no timeout: the watchdog ends a process
        # whose GPU stays behind (None where TP_GDN_COLLECTIVE_TIMEOUT=0)
        self.progress = watchdog.progress_for(
            f"rank {self.rank} of group {self.group_name!r} on {device}: the decode all-reduce "
            f"(TP_GDN_SYMM_KERNEL={self.kernel})")
        torch.cuda.synchronize(device)
        dist.barrier(group=group)                              # no rank pushes before every rank zeroed

    def fits(self, numel: int, dtype: torch.dtype) -> bool:
        return numel * dtype.itemsize <= self.max_bytes

    def staging(self, shape, dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        if not self.fits(numel, dtype):
            raise ValueError(f"{tuple(shape)} {dtype} does not fit the {self.max_bytes}-byte symmetric buffer")
        source = self.buffer if self.kernel == "oneshot" else self.staged
        return source[: numel * dtype.itemsize].view(dtype).view(shape)

    def kernel_for(self, numel: int, dtype: torch.dtype) -> str:
        """The kernel an all-reduce of `numel` elements of `dtype` runs: "ll", "push" or "oneshot"."""
        if self.kernel == "oneshot":
            return "oneshot"
        return "ll" if numel * dtype.itemsize <= self.ll_max else "push"

    def word_push(self, staged: torch.Tensor) -> tuple | None:
        """Where the all-reduce of `staged` takes the flag-in-word kernel: what a kernel that forms
        `staged` needs to push its words itself (triton_gemv.gemv's push: the peers' buffers, the
        epochs, this rank, a region's words, a program's elements); else None. A caller whose
        kernel pushed them calls reduce_out(..., pushed=True)."""
        if self.kernel_for(staged.numel(), staged.dtype) != "ll":
            return None
        from ..kernels.triton_allreduce import BLOCK_BYTES

        return self.words_ptrs, self.epochs, self.rank, self.slot_words, BLOCK_BYTES // staged.element_size()

    def reduce_out(self, staged: torch.Tensor, out: torch.Tensor, pushed: bool = False) -> torch.Tensor:
        """out <- the sum over ranks of staged. pushed: staged's words have been pushed already, by
        the kernel that formed it (word_push), so the flag-in-word kernel only waits and sums."""
        kernel = self.kernel_for(staged.numel(), staged.dtype)
        if pushed and kernel != "ll":
            raise ValueError(f"pushed words apply to the flag-in-word kernel; this all-reduce takes {kernel}")
        if kernel == "oneshot":
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, out)
            return out
        from ..kernels.triton_allreduce import ll_all_reduce, push_all_reduce

        progress = None if self.progress is None else self.progress.address
        if kernel == "ll":
            ll_all_reduce(staged, out, self.words_ptrs, self.epochs, self.rank, self.slot_words,
                          phases="reduce" if pushed else "both", progress=progress)
        else:
            push_all_reduce(staged, out, self.recv_ptrs, self.flag_ptrs, self.epochs, self.rank,
                            self.max_bytes // staged.element_size(), progress=progress)
        if self.progress is not None:
            self.progress.launched()
        return out


def sum_in_rank_order(parts: list[torch.Tensor], out: torch.Tensor) -> None:
    """out <- parts[0] + parts[1] + ... (the ranks' partial rows, in rank order) on the current
    stream: one add for two parts, else an fp32 sum rounded once. `out` may be one of the parts."""
    if len(parts) == 2:
        torch.add(parts[0], parts[1], out=out)
        return
    acc = parts[0].float()
    for t in parts[1:]:
        acc += t
    out.copy_(acc)


class StreamWork:
    """How a copy-engine call queues its work: a stream's wait on a flag and write of one, and a
    copy between packed tensors (streamops), sums on the current stream, and which stream that
    is. One place, so that the CPU tests can stand in a simulator of several ranks' streams for
    it (tests/test_copy_engines.py)."""

    @staticmethod
    def wait_equal(stream, address: int, value: int) -> None:
        streamops.wait_equal(stream, address, value)

    @staticmethod
    def write(stream, address: int, value: int) -> None:
        streamops.write(stream, address, value)

    @staticmethod
    def current_stream(device):
        return torch.cuda.current_stream(device)

    @staticmethod
    def on(stream):
        """Context in which sum and empty queue on `stream`."""
        return torch.cuda.stream(stream)

    @staticmethod
    def copy(stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src on `stream`, both packed, of one shape and dtype (checked)."""
        if dst.shape != src.shape or dst.dtype != src.dtype or not (dst.is_contiguous() and src.is_contiguous()):
            raise ValueError(f"copy of {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} {dst.dtype}: "
                             "both must be packed and alike")
        streamops.copy(stream, dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())

    @staticmethod
    def sum(parts: list[torch.Tensor], out: torch.Tensor) -> None:
        sum_in_rank_order(parts, out)

    @staticmethod
    def empty(numel: int, device, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, device=device, dtype=dtype)

    @staticmethod
    def capturing() -> bool:
        return torch.cuda.is_current_stream_capturing()


class CopyEngineAllReduce:
    """Sum of a large output that a caller forms in row chunks, moved by copy engines, for the
    ranks of one group on one host (the tail of GDNLayer.forward). Each rank writes its partial
    sum of each chunk into its own mapped (symmetric) buffer and raises a flag in every peer's
    mapped flag buffer; a side stream waits on the peers' flags with stream memory operations
    (no kernel), copies rows out of their buffers (a device-to-device copy from mapped memory: a
    copy engine over NVLink, no SM) and sums them in rank order (a short kernel; every rank gets
    the same bits). So the next chunk's GEMM keeps every SM while this chunk moves, where NCCL's
    kernels would take SMs from it: on a host of 2 H200, the GEMM of [16384, 2048] x [2048,
    2048] took 0.198 ms alone and beside a pull of its rows from the peer, and 0.392 beside
    NCCL's all-reduce of them; a pull of 64 MiB took 0.186 ms (361 GB/s)
    (benchmarks/results/exp_ce_h200x2_s26.log). Two forms, by group size:

    whole (groups below SCATTER_MIN_WORLD ranks)  each rank copies every peer's rows of the chunk
        and sums all of them: a rank reads (p - 1) chunks from its peers;
    scatter (from SCATTER_MIN_WORLD ranks)  rank q copies only its slice q of the chunk's rows
        (the chunk cut in p row blocks) from each peer, sums that slice into its own buffer and
        raises a second flag ("summed"); then each rank copies every peer's summed slice into its
        output (a reduce-scatter, then an all-gather): a rank reads 2 (p - 1) / p chunks, 1.5 at
        p = 4 against 3, 1.75 at 8 against 7. At p = 2 both read one chunk.

    The last chunk (reduce's `last`) in the whole form: the current stream itself waits for the
    peers' rows and sums them straight out of their buffers (the add's kernel reads them over
    NVLink), since nothing is left for the copy engines to hide behind by then: one kernel where
    the side stream would pull, then add (LAST_ON_MAIN).

    Use: `call = ar.start(rows, cols, dtype)`; for each chunk, write the partial rows into
    `call.partial(r0, r1)` on the current stream, then `call.reduce(r0, r1, out_rows, last)`;
    finally `call.finish()`, after which the current stream sees every chunk's sum. Every rank
    makes the same calls in the same order (epochs count them). No host synchronisation; not for
    CUDA graph capture. Build it on every rank of the group at the same point (a collective);
    the first call, and a call larger than any before, maps a larger buffer (a collective too).
    """

    MAX_CHUNKS = 256   # row chunks a call (flags per peer and chunk)
    # outputs of fewer rows keep NCCL (RowParallelLinear.chunked_all_reduce_kind). Measured at
    # 32768 rows only (8x4096 tokens at tp=2). Its host work is fixed: on hosts of 2 H200 a
    # prefill call took 1.0-1.1 ms of host time with it against 0.65-0.72 on NCCL's stream
    # (benchmarks/results/probe_host_h200x2_s26.log), so a smaller call, whose GPU work is
    # shorter, could end up waiting on the host
    MIN_ROWS = 32768
    # groups of at least this many ranks take the scatter form (above), chosen by the bytes each
    # rank reads, not by a timing: only tp=2 has run (no host of more GPUs lent since the copy
    # engines were written), where both forms read the same bytes. H200 x2, the layer's tail at
    # 8x4096 (80B dims), medians of 7 interleaved rounds, single / back to back, outputs
    # bit-equal: 4 chunks, whole 2.699 / 2.599 ms, scatter 2.718 / 2.621; 8 chunks, whole 2.934 /
    # 2.911, scatter 4.050 / 3.825 (benchmarks/results/exp_scatter_h200x2_s29b.log). With the
    # second step on the side stream (before the gather stream), scatter took 2.820 / 2.745 at 4
    # chunks against 2.733 / 2.657 on another host (exp_scatter_h200x2_s29a.log)
    SCATTER_MIN_WORLD = 3
    # the whole form's last chunk summed on the current stream from the peers' buffers (above).
    # H200 x2, 8192 x 2048 bf16 (the last of 4 chunks at 8x4096), both ranks at once, medians:
    # a copy engine's pull 99-100 us, then the add: 128-130 us in all; torch.add reading the
    # peer's rows itself 103 us (324 GB/s over NVLink; Triton kernels in 10 launch settings the
    # same), bit-equal (benchmarks/results/exp_pull_h200x2_s30c.log). The layer at 8x4096, tp=2,
    # medians of 7 interleaved rounds, single / back to back, on the main stream against on the
    # side: 3 chunks 2.849 / 2.663 ms against 2.899 / 2.701, 4 chunks 2.777 / 2.655 against
    # 2.890 / 2.681, 6 chunks 2.771 / 2.676 against 2.884 / 2.742 (exp_last_h200x2_s30c.log); on
    # another host 4 chunks 2.849 / 2.651 against 2.880 / 2.686 (exp_last_h200x2_s30g.log);
    # outputs bit-equal to one piece on NCCL
    LAST_ON_MAIN = True
    ops = StreamWork

    def __init__(self, group, device: torch.device):
        import torch.distributed._symmetric_memory as symm

        self.group, self.group_name, self.device = group, group.group_name, device
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.flags = symm.empty(self._lay_out_flags(), dtype=torch.int32, device=device)
        self.flag_handle = symm.rendezvous(self.flags, self.group_name)
        self.flags.zero_()
        self.flag_ptrs = list(self.flag_handle.buffer_ptrs)
        self.buffer = self.handle = self.tmp = None
        self.capacity, self._views = 0, {}
        # high priority: the sums' kernels take SMs ahead of the GEMM blocks queued beside them
        self.side = torch.cuda.Stream(device=device, priority=-1)
        # the scatter form's second step (copying the peers' summed blocks), apart from the side
        # stream, so that the next chunk's first step does not wait for this chunk's second
        self.gather = torch.cuda.Stream(device=device, priority=-1)
        self.epoch = 0
        # stream waits have no timeout: the watchdog ends a process whose GPU stays behind
        self.progress = watchdog.progress_for(
            f"rank {self.rank} of group {self.group_name!r} on {device}: the copy-engine all-reduce")
        torch.cuda.synchronize(device)
        dist.barrier(group=group)                              # no rank writes a flag before every rank zeroed

    def _lay_out_flags(self) -> int:
        """Sets where each kind of flag starts in a rank's flags (uint32): [source rank, chunk]
        "written" epochs, [source rank] "read" epochs, then [source rank, chunk] "summed" epochs
        (the scatter form's); returns how many flags that is."""
        self._done0 = self.world * self.MAX_CHUNKS
        self._summed0 = self._done0 + self.world
        return self._summed0 + self.world * self.MAX_CHUNKS

    def _flag(self, owner: int, index: int) -> int:
        return self.flag_ptrs[owner] + 4 * index

    def _written(self, owner: int, source: int, chunk: int) -> int:
        """Address, in `owner`'s flags, of `source`'s "chunk written" flag."""
        return self._flag(owner, source * self.MAX_CHUNKS + chunk)

    def _summed(self, owner: int, source: int, chunk: int) -> int:
        """Address, in `owner`'s flags, of `source`'s "my slice of the chunk is summed" flag."""
        return self._flag(owner, self._summed0 + source * self.MAX_CHUNKS + chunk)

    def _read(self, owner: int, source: int) -> int:
        """Address, in `owner`'s flags, of `source`'s "rows read" flag."""
        return self._flag(owner, self._done0 + source)

    def _reserve(self, nbytes: int) -> None:
        import torch.distributed._symmetric_memory as symm

        if nbytes <= self.capacity:
            return
        if self.buffer is not None:        # every peer has read the old buffer before it goes
            torch.cuda.synchronize(self.device)
            dist.barrier(group=self.group)
        # whole MiB, and at least twice the old size, so that growing calls remap it a few times only
        nbytes = max(-(-nbytes // (1 << 20)) << 20, 2 * self.capacity)
        self.buffer = self.handle = None
        self._views = {}
        self.buffer = symm.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.handle = symm.rendezvous(self.buffer, self.group_name)
        self.capacity = nbytes

    def views(self, rows: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """This rank's buffer and {peer: its buffer as this rank maps it}, viewed as [rows, cols]
        of dtype (kept per shape: forming them costs host time in every call)."""
        key = (rows, cols, dtype)
        if key not in self._views:
            own = self.buffer[: rows * cols * dtype.itemsize].view(dtype).view(rows, cols)
            self._views[key] = own, {p: self.handle.get_buffer(p, (rows, cols), dtype)
                                     for p in range(self.world) if p != self.rank}
        return self._views[key]

    def start(self, rows: int, cols: int, dtype: torch.dtype) -> "CopyEngineCall":
        if self.ops.capturing():
            raise RuntimeError("the copy-engine all-reduce cannot be captured in a CUDA graph "
                               "(its flags count calls on the host); capture calls of fewer rows")
        self._reserve(rows * cols * dtype.itemsize)
        self.epoch = (self.epoch + 1) & 0xFFFFFFFF
        return CopyEngineCall(self, rows, cols, dtype)


def _slice(r0: int, r1: int, j: int, world: int) -> tuple[int, int]:
    """Rows of rank j's slice of rows r0..r1 in the scatter form (world row blocks, in rank order)."""
    n = r1 - r0
    return r0 + j * n // world, r0 + (j + 1) * n // world


class CopyEngineCall:
    """One call of CopyEngineAllReduce (see there)."""

    def __init__(self, ar: CopyEngineAllReduce, rows: int, cols: int, dtype: torch.dtype):
        self.ar, self.ops, self.e, self.chunks = ar, ar.ops, ar.epoch, 0
        self.cols, self.dtype = cols, dtype
        self.scatter = ar.world >= ar.SCATTER_MIN_WORLD
        self.own, self.mapped = ar.views(rows, cols, dtype)
        self.peers = list(self.mapped)
        self.main = self.ops.current_stream(ar.device)
        self.main_read_peers = False     # whether the main stream read the peers' buffers (a last chunk)
        for p in self.peers:   # the peers have read this rank's rows of the call before
            self.ops.wait_equal(self.main, ar._read(ar.rank, p), self.e - 1)

    def partial(self, r0: int, r1: int) -> torch.Tensor:
        """Where this rank writes its partial sum of rows r0..r1 (on the current stream)."""
        return self.own[r0:r1]

    def reduce(self, r0: int, r1: int, out: torch.Tensor, last: bool = False) -> None:
        """out [r1 - r0, cols] <- the sum over ranks of rows r0..r1, once the current stream has
        written this rank's partial rows (queued work; finish() joins it). `last`: no chunk
        follows before finish (in the whole form, with LAST_ON_MAIN, the current stream sums it)."""
        ar, ops, i, me = self.ar, self.ops, self.chunks, self.ar.rank
        if i >= ar.MAX_CHUNKS:
            raise ValueError(f"a call of the copy-engine all-reduce takes at most {ar.MAX_CHUNKS} chunks")
        if out.shape != (r1 - r0, self.cols) or out.dtype != self.dtype:
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, expected {(r1 - r0, self.cols)} {self.dtype}")
        self.chunks += 1
        on_main = last and ar.LAST_ON_MAIN and not self.scatter
        # the peers' "written" flags, and (unless the main stream sums this chunk) this rank's own
        # slot of them (unused otherwise), on which its side stream waits: a flag costs less host
        # time than an event, and the main stream cannot write the next call's before the side
        # stream is past this one (finish joins it)
        for p in self.peers if on_main else range(ar.world):
            ops.write(self.main, ar._written(p, me, i), self.e)
        if on_main:
            for p in self.peers:
                ops.wait_equal(self.main, ar._written(me, p, i), self.e)
            ops.sum([self.own[r0:r1] if p == me else self.mapped[p][r0:r1] for p in range(ar.world)], out)
            self.main_read_peers = True
            return
        side = ar.side
        ops.wait_equal(side, ar._written(me, me, i), self.e)
        a, b = _slice(r0, r1, me, ar.world) if self.scatter else (r0, r1)   # the rows this rank sums
        n = (b - a) * self.cols
        pulled = {}
        if ar.tmp is None or ar.tmp.numel() < len(self.peers) * n or ar.tmp.dtype != self.dtype:
            with ops.on(side):         # freed on the side stream, its last user
                ar.tmp = ops.empty(len(self.peers) * n, ar.device, self.dtype)
        for j, p in enumerate(self.peers):
            ops.wait_equal(side, ar._written(me, p, i), self.e)
            pulled[p] = ar.tmp[j * n: (j + 1) * n].view(b - a, self.cols)
            ops.copy(side, pulled[p], self.mapped[p][a:b])
        parts = [self.own[a:b] if p == me else pulled[p] for p in range(ar.world)]    # rank order
        with ops.on(side):
            # the whole form: the sum into out; scatter: into this rank's own buffer, where the
            # peers copy it from
            ops.sum(parts, self.own[a:b] if self.scatter else out)
        if not self.scatter:
            return
        for p in range(ar.world):      # this rank's own slot: for its gather stream
            ops.write(side, ar._summed(p, me, i), self.e)
        gather = ar.gather
        ops.wait_equal(gather, ar._summed(me, me, i), self.e)
        ops.copy(gather, out[a - r0: b - r0], self.own[a:b])
        for p in self.peers:
            ops.wait_equal(gather, ar._summed(me, p, i), self.e)
            pa, pb = _slice(r0, r1, p, ar.world)
            ops.copy(gather, out[pa - r0: pb - r0], self.mapped[p][pa:pb])

    def finish(self) -> None:
        """Tell the peers this rank has read their rows; the current stream waits for the sums."""
        ar = self.ar
        if self.scatter:            # the peers' buffers are read on both streams
            ar.side.wait_stream(ar.gather)
        if self.main_read_peers:    # and on the main stream (a last chunk)
            ar.side.wait_stream(self.main)
        for p in self.peers:
            self.ops.write(ar.side, ar._read(p, ar.rank), self.e)
        self.main.wait_stream(ar.side)
        if ar.progress is not None:     # the call's number, once the main stream is past it
            self.ops.write(self.main, ar.progress.address, self.e)
            ar.progress.set_queued(self.e)

    def abort(self) -> None:
        """In place of finish after an error on this rank between start and finish: raise every
        flag of this call that the peers may wait on (each chunk's "written", and in the scatter
        form "summed", up to MAX_CHUNKS, and "read"), so that their streams go on; stream waits
        have no timeout, and without this a peer would wait for ever. The peers' sums of the
        chunks this rank had not written hold whatever its buffer held: the error this rank
        raises is what says the call failed. The epochs stay in step, so the next call on every
        rank is whole again. Only peers that reach this call are released: this rank's own read
        flag waits for theirs (below), as its reduce would have."""
        ar = self.ar
        flags = (ar._written, ar._summed) if self.scatter else (ar._written,)
        for p in self.peers:
            for i in range(self.chunks, ar.MAX_CHUNKS):
                for flag in flags:
                    self.ops.write(self.main, flag(p, ar.rank, i), self.e)
        # Waits are for equality, so this rank's "read" flag of this call must not reach a peer
        # before the peer's start has seen the one of the call before: finish's write waits for
        # each peer's chunk-0 flag of this call, which a peer raises only past its start (in
        # reduce, or in its own abort). A normal call orders it so through its first reduce; a
        # call that failed before any had no such wait, and its early write could hang a peer
        # (the likely reason why one GPU run of the abort's test did not finish, s27 call 5)
        ar.side.wait_stream(self.main)
        for p in self.peers:
            self.ops.wait_equal(ar.side, ar._written(ar.rank, p, 0), self.e)
        self.finish()


_SYMM: dict[tuple, SymmetricAllReduce | None] = {}
# why symmetric memory does not apply (None: it does), per (group, device type, index): its collectives run once
_VERDICTS: dict[tuple, str | None] = {}


def _local_verdict(where: list, visible: list, index: int, can_access) -> str | None:
    """This rank's reason why the symmetric all-reduce does not apply (None: no reason), from every
    rank's (host name, GPU uuid, has symmetric memory), the uuids of the GPUs this process sees,
    the index of its own, and can_access(i, j) (peer access between visible GPUs i and j)."""
    if not all(h for _, _, h in where):
        return "a rank's torch has no torch.distributed._symmetric_memory"
    if len({host for host, _, _ in where}) > 1:
        return "the group's ranks are on more than one host"
    for r, (_, uuid, _) in enumerate(where):
        if uuid not in visible:
            return f"rank {r}'s GPU is not visible to every rank (each sees its own CUDA_VISIBLE_DEVICES)"
        peer = visible.index(uuid)
        if peer != index and not can_access(index, peer):
            return f"GPU {index} cannot reach GPU {peer} peer to peer"
    return None


def _why_not_symmetric(group, device: torch.device) -> str | None:
    """Why the symmetric-memory all-reduce does not apply to `group` on `device` (None: it does).
    Past the first checks (the same on every rank) it is a collective, and every rank returns the
    same answer."""
    if device.type != "cuda":
        return f"the layer is on {device}, not CUDA"
    backend = dist.get_backend(group)
    if backend != "nccl":
        return f"the process group's backend is {backend}, not nccl"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
        have = True
    except ImportError:
        have = False
    visible = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    where = [None] * dist.get_world_size(group)
    dist.all_gather_object(where, (socket.gethostname(), visible[device.index], have), group=group)
    why = _local_verdict(where, visible, device.index, torch.cuda.can_device_access_peer)
    verdicts = [None] * len(where)
    dist.all_gather_object(verdicts, why, group=group)     # one rank's reason holds for all
    return next((v for v in verdicts if v is not None), None)


def _built_once(cache: dict, group, device, what: str, build, extra_key=(), also_why=None):
    """The shared part of symmetric_all_reduce_for and copy_engine_all_reduce_for: None where
    TP_GDN_ALL_REDUCE=nccl or there is no group of several ranks; else, once per (group, device,
    *extra_key), build(group, device) where symmetric memory applies and also_why() (this rank's
    further reason, gathered from every rank so that all agree) gives none, else None, or with
    "symm" a ValueError naming `what`."""
    mode = all_reduce_mode()
    if mode == "nccl" or not dist.is_initialized() or dist.get_world_size(group) == 1:
        if mode == "symm" and not dist.is_initialized():
            raise ValueError("TP_GDN_ALL_REDUCE=symm: no process group is initialised")
        return None
    group = group or dist.group.WORLD
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (group.group_name, device.type, device.index, *extra_key)
    if key not in cache:
        where = key[:3]
        if where not in _VERDICTS:
            _VERDICTS[where] = _why_not_symmetric(group, device)
        why = _VERDICTS[where]
        if why is None and also_why is not None:
            verdicts = [None] * dist.get_world_size(group)
            dist.all_gather_object(verdicts, also_why(), group=group)
            why = next((v for v in verdicts if v is not None), None)
        if why is not None and mode == "symm":
            raise ValueError(f"TP_GDN_ALL_REDUCE=symm, but {what} does not apply: {why}")
        cache[key] = None if why is not None else build(group, device)
    return cache[key]


def symmetric_all_reduce_for(group, device) -> SymmetricAllReduce | None:
    """The group's symmetric-memory all-reduce on `device`, built once and shared by every layer
    (None where TP_GDN_ALL_REDUCE=nccl, or, with "auto", where it does not apply; with "symm"
    that is an error). Call it on every rank of the group at the same point."""
    kernel = symm_kernel()
    return _built_once(_SYMM, group, device, "symmetric memory",
                       lambda g, d: SymmetricAllReduce(g, d, kernel=kernel), extra_key=(kernel,))


_COPY: dict[tuple, CopyEngineAllReduce | None] = {}


def copy_engine_all_reduce_for(group, device) -> CopyEngineAllReduce | None:
    """The group's copy-engine all-reduce on `device` (for outputs formed in row chunks), built
    once and shared by every layer: None where TP_GDN_ALL_REDUCE=nccl, or, with "auto", where
    it does not apply (where symmetric memory does not, or the driver lacks stream memory
    operations, the same on every rank of one host); with "symm" that is an error. Call it on
    every rank of the group at the same point."""
    return _built_once(_COPY, group, device, "the copy-engine all-reduce", CopyEngineAllReduce,
                       also_why=streamops.why_unavailable)


def release_symmetric_buffers() -> None:
    """Drop the symmetric buffers (before the process group goes)."""
    _SYMM.clear()
    _COPY.clear()
    _VERDICTS.clear()
