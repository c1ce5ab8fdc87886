"""Triton all-reduces (sum) for small tensors over memory that every rank of a group has mapped.

Two kernels, one launch per rank each: the push kernel (below) and the flag-in-word kernel
(`ll_all_reduce`, after it).

The push kernel: one cross-GPU wait. Each rank's buffer holds two halves (parities) of
`world` receive regions. Program c of rank r, for bytes [c BLOCK_BYTES, (c+1) BLOCK_BYTES) of
the tensor (the same bytes of every region whatever the dtype, so that the parity argument
below holds across calls of different dtypes):

1. takes epoch e = epochs[c] + 1 (a counter in this rank's memory; every rank runs the same
   calls, so the counters agree) and parity e % 2;
2. push: writes its partial sum into region (parity, r) of every peer, then, after a barrier,
   sets flag (c, r) of every peer to e with release semantics at system scope;
3. waits until its own flags (c, p) of every peer p reach e (acquire, system scope);
4. sums the regions (parity, p) for p = 0..world-1 in that order, in fp32 (its own part from
   registers), so every rank produces the same bits, and stores epochs[c] = e. Where `progress`
   is given, program 0, once past its wait, first writes e (mod 2^32) to the host word it points
   to: program 0 runs in every call, so e counts the calls whose wait this rank has got through
   (parallel/watchdog.py).

Why one wait is enough: a peer writes region (parity, r) of step e + 2 only after finishing
step e + 1, which needed this rank's flag of step e + 1, set only after this rank's step e
(which read that region) had finished. Flags only grow (int64), so a flag already at e + 1
when this rank waits for e also passes.

No host synchronisation; the launch can be captured in a CUDA graph (the epochs live on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import cdiv, launch, pdl_launch, wait_for_prior_grid

BLOCK_BYTES = 2048  # bytes per program: 1024 bf16 elements, 512 fp32
# programmatic dependent launch: the programs are placed while the launch ahead (the out_proj
# GEMM that writes `send`) finishes, and wait for it before anything (wait_for_prior_grid). On a
# host of 2 H200, the graphed decode step of one sequence at tp=2 (80B dims) with this and the
# decode and norm launches' PDL took 29.5 / 22.5 us single / back to back, against 31.7 / 24.6
# with all three plain (benchmarks/results/layer_dec_h200x2_s25_tp2.log; not measured apart)
PDL = True


@triton.jit
def _push_all_reduce_kernel(send, out, recv_ptrs, flag_ptrs, epochs, progress, numel, rank, slot,
                            WORLD: tl.constexpr, BLOCK: tl.constexpr, PUSH: tl.constexpr,
                            REDUCE: tl.constexpr, WATCH: tl.constexpr, GDC: tl.constexpr = False):
    wait_for_prior_grid(GDC)
    c = tl.program_id(0)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    epoch = tl.load(epochs + c) + 1
    parity = epoch % 2
    x = tl.load(send + offs, mask=m, other=0.0)
    if PUSH:
        for p in tl.static_range(WORLD):
            if p != rank:
                dst = tl.load(recv_ptrs + p).to(tl.pointer_type(send.dtype.element_ty))
                # pointers read from memory carry no alignment the compiler can see; the regions
                # start 16-byte aligned (aligned bases, whole programs of 2 KiB): 16-byte stores
                dst = dst + (parity * WORLD + rank) * slot + offs
                tl.store(tl.max_contiguous(tl.multiple_of(dst, 16), BLOCK), x, mask=m)
        tl.debug_barrier()      # every lane's stores are issued before the flags release them
        for p in tl.static_range(WORLD):
            if p != rank:
                flag = tl.load(flag_ptrs + p).to(tl.pointer_type(tl.int64))
                tl.atomic_xchg(flag + c * WORLD + rank, epoch, sem="release", scope="sys")
    if REDUCE:
        mine = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int64))
        for p in tl.static_range(WORLD):
            if p != rank:
                while tl.atomic_add(mine + c * WORLD + p, 0, sem="acquire", scope="sys") < epoch:
                    pass
        tl.debug_barrier()
        if WATCH:
            if c == 0:      # past the only wait that can hang; stored before the sum, which hides its latency
                tl.store(progress.to(tl.int64).to(tl.pointer_type(tl.int32)), epoch.to(tl.int32))   # the low 32 bits
        recv = tl.load(recv_ptrs + rank).to(tl.pointer_type(send.dtype.element_ty))
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            # .cg: straight from L2, never a line this SM cached two steps ago. This rank's own
            # region is never written; its part comes from registers
            src = recv + (parity * WORLD + p) * slot + offs
            v = tl.load(tl.max_contiguous(tl.multiple_of(src, 16), BLOCK), mask=m, other=0.0, cache_modifier=".cg")
            acc += tl.where(p == rank, x, v).to(tl.float32)
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=m)
        tl.store(epochs + c, epoch)


def push_all_reduce(send: torch.Tensor, out: torch.Tensor, recv_ptrs: torch.Tensor, flag_ptrs: torch.Tensor,
                    epochs: torch.Tensor, rank: int, slot: int, phases: str = "both",
                    progress: int | None = None) -> torch.Tensor:
    """out <- sum over ranks of `send` (contiguous, same shape and dtype on every rank).

    recv_ptrs / flag_ptrs: [world] int64 device addresses, as this rank maps them, of every rank's
    receive buffer (2 x world regions of `slot` elements of send's dtype) and flags ([programs,
    world] int64, zero at start); epochs: [programs] int64 in this rank's memory, zero at start.
    phases "push" / "reduce" run one half (for tests that play every rank in one process: all
    pushes, then all reduces); "both" is the real thing. progress: the address of a uint32 in
    pinned host memory, or None: the reduce writes its call count there (watchdog.Progress). It
    goes in as a scalar argument, so that the write costs no load.
    """
    numel = send.numel()
    assert send.is_contiguous() and out.is_contiguous() and out.numel() == numel and numel <= slot
    block = BLOCK_BYTES // send.element_size()
    assert slot % block == 0, f"regions of {slot} elements are not whole programs of {block}"
    grid = cdiv(numel, block)
    assert grid <= epochs.numel(), f"{numel} elements need {grid} programs, the buffers hold {epochs.numel()}"
    launch(_push_all_reduce_kernel, (grid,),
        send, out, recv_ptrs, flag_ptrs, epochs, progress or 0, numel, rank, slot,
        WORLD=recv_ptrs.numel(), BLOCK=block, PUSH=phases in ("both", "push"), REDUCE=phases in ("both", "reduce"),
        WATCH=progress is not None, num_warps=4,
        **pdl_launch(PDL, send.device))
    return out


# -- data and flag in one word ------------------------------------------------------------------
#
# The push kernel's flag costs a release at system scope after the data's stores (a fence that
# waits until the stores have reached the peer's memory) and a second write over NVLink. Here
# each 8-byte word a rank pushes carries 4 bytes of data in its low half and the call's epoch in
# its high half, written by one store, which reaches the peer whole. A rank waits until every word
# of its regions holds this call's epoch and reads the data out of the words it waited on: no
# fence, no flag, one trip over NVLink. The words take twice the data's bytes. Program c covers
# the same BLOCK_BYTES of the tensor as the push kernel's program c, with the same epochs and
# parities, and the argument for one wait stands as above: a peer writes region (parity, r) of
# call e + 2 only after its call e + 1, which needed this rank's words of call e + 1, pushed
# after this rank's call e had read the region. Epochs are compared in their low 32 bits.

WORD_BYTES = 4          # data bytes in one 8-byte word


@triton.jit
def epoch_of(epochs, c):
    """Program c's epoch for this call, its parity and its tag (the epoch's low 32 bits in the
    high half of a word)."""
    epoch = tl.load(epochs + c) + 1
    return epoch, epoch % 2, epoch.to(tl.uint32).to(tl.int64) << 32


@triton.jit
def push_words(x, tag, parity, words, m_w, recv_ptrs, rank, slot_words,
               WORLD: tl.constexpr, N_WORDS: tl.constexpr, PACK: tl.constexpr):
    """Write x (a block of N_WORDS * PACK elements, 16- or 32-bit) as words `words` of this rank's
    region at `parity` in every peer's buffer: word j holds elements PACK j .. PACK j + PACK - 1
    (the first in the low bits) in its low half and `tag` in its high half."""
    if PACK == 2:
        lo, hi = tl.split(tl.reshape(x.to(tl.int16, bitcast=True), [N_WORDS, 2]))
        data = (lo.to(tl.int32) & 0xFFFF) | (hi.to(tl.int32) << 16)
    else:
        data = x.to(tl.int32, bitcast=True)
    word = tag | data.to(tl.uint32).to(tl.int64)
    for p in tl.static_range(WORLD):
        # a store masked off at p == rank, not a branch on it: Triton 3.6 failed to compile the
        # branch from three ranks up ("operand does not dominate this use")
        dst = tl.load(recv_ptrs + p).to(tl.pointer_type(tl.int64))
        dst = dst + (parity * WORLD + rank) * slot_words + words
        tl.store(tl.max_contiguous(tl.multiple_of(dst, 16), N_WORDS), word, mask=tl.where(rank != p, m_w, False))


@triton.jit
def _ll_all_reduce_kernel(send, out, recv_ptrs, epochs, progress, numel, rank, slot_words,
                          WORLD: tl.constexpr, BLOCK: tl.constexpr, PACK: tl.constexpr, PUSH: tl.constexpr,
                          REDUCE: tl.constexpr, WATCH: tl.constexpr, GDC: tl.constexpr = False):
    # BLOCK elements a program, PACK (1 or 2) of them in a word's 4 data bytes
    wait_for_prior_grid(GDC)
    WORDS: tl.constexpr = BLOCK // PACK
    c = tl.program_id(0)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    words = c * WORDS + tl.arange(0, WORDS)
    m_w = words * PACK < numel
    epoch, parity, tag = epoch_of(epochs, c)
    x = tl.load(send + offs, mask=m, other=0.0)
    if PUSH:
        push_words(x, tag, parity, words, m_w, recv_ptrs, rank, slot_words, WORLD, WORDS, PACK)
    if REDUCE:
        recv = tl.load(recv_ptrs + rank).to(tl.pointer_type(tl.int64))
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            if p == rank:
                acc += x.to(tl.float32)
            else:
                src = tl.max_contiguous(tl.multiple_of(recv + (parity * WORLD + p) * slot_words + words, 16), WORDS)
                # volatile loads (relaxed, system scope): each pass reads what the peer's stores have
                # delivered so far; masked words count as arrived
                v = tl.load(src, mask=m_w, other=tag, volatile=True)
                while tl.sum(((v & -4294967296) != tag).to(tl.int32), axis=0) > 0:
                    v = tl.load(src, mask=m_w, other=tag, volatile=True)
                data = v.to(tl.int32)
                if PACK == 2:
                    lo = data.to(tl.int16)
                    hi = (data >> 16).to(tl.int16)
                    got = tl.reshape(tl.join(lo, hi), [BLOCK]).to(x.dtype, bitcast=True)
                else:
                    got = data.to(x.dtype, bitcast=True)
                acc += got.to(tl.float32)
        if WATCH:
            if c == 0:      # past every wait of the call (as the push kernel's program 0)
                tl.store(progress.to(tl.int64).to(tl.pointer_type(tl.int32)), epoch.to(tl.int32))
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=m)
        tl.store(epochs + c, epoch)


def ll_all_reduce(send: torch.Tensor, out: torch.Tensor, recv_ptrs: torch.Tensor, epochs: torch.Tensor, rank: int,
                  slot_words: int, phases: str = "both", progress: int | None = None) -> torch.Tensor:
    """out <- sum over ranks of `send` (contiguous, 16- or 32-bit, the same shape and dtype on
    every rank), the data pushed in words that carry their call's epoch (above).

    recv_ptrs: [world] int64 device addresses, as this rank maps them, of every rank's receive
    buffer: 2 x world regions of `slot_words` int64 words (a word per WORD_BYTES of data), zero at
    start; epochs: [programs] int64 in this rank's memory, zero at start. phases and progress as
    push_all_reduce's; phases "reduce" also serves a caller whose kernel pushed send's words as it
    formed send (triton_gemv.gemv's push). The sum runs in fp32 in rank order, as the push
    kernel's: the same bits.
    """
    numel = send.numel()
    size = send.element_size()
    assert size in (2, 4), f"the flag-in-word all-reduce takes 16- and 32-bit data, not {send.dtype}"
    assert send.is_contiguous() and out.is_contiguous() and out.numel() == numel and out.dtype == send.dtype
    block = BLOCK_BYTES // size
    assert slot_words % (BLOCK_BYTES // WORD_BYTES) == 0, f"regions of {slot_words} words are not whole programs"
    assert numel * size <= slot_words * WORD_BYTES, f"{numel} elements do not fit regions of {slot_words} words"
    grid = cdiv(numel, block)
    assert grid <= epochs.numel(), f"{numel} elements need {grid} programs, the buffers hold {epochs.numel()}"
    launch(_ll_all_reduce_kernel, (grid,),
           send, out, recv_ptrs, epochs, progress or 0, numel, rank, slot_words,
           WORLD=recv_ptrs.numel(), BLOCK=block, PACK=WORD_BYTES // size, PUSH=phases in ("both", "push"),
           REDUCE=phases in ("both", "reduce"), WATCH=progress is not None, num_warps=4,
           **pdl_launch(PDL, send.device))
    return out
