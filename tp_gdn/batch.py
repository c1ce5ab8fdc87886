"""Batch: which packed sequences a forward call holds, and where their states live."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

CHUNK = 64  # chunk length of the chunked delta rule; prefill work is scheduled in these units


def _int32_on(device, *parts) -> tuple[torch.Tensor, ...]:
    """The int32 sequences `parts` on `device` as views of one buffer that travels in one copy,
    each part starting on a 16-byte boundary."""
    host, starts = [], []
    for part in parts:
        starts.append(len(host))
        host.extend(part)
        host.extend([0] * (-len(host) % 4))
    buf = torch.tensor(host, dtype=torch.int32).to(device, non_blocking=True)
    return tuple(buf[a: a + len(p)] for a, p in zip(starts, parts))


@dataclass(frozen=True)
class BatchMeta:
    """A batch's index tensors on one device, built once and shared by every layer's call."""

    cu_seqlens: torch.Tensor   # [N + 1] int32, token offsets of the packed sequences
    slots: torch.Tensor        # [N] int64, state-pool slot of each sequence
    has_state: torch.Tensor    # [N] int32 (0/1), continue from the slot (else start from zero)
    decode_seqs: torch.Tensor  # [Nd] int32, sequences of length 1 (one recurrent step)
    prefill_seqs: torch.Tensor  # [Np] int32, sequences longer than 1 token (chunked prefill)
    chunks: torch.Tensor       # [NC, 2] int32, (sequence, first token of the chunk) of longer ones
    # the same rows ordered by the chunk's place in its sequence, then by sequence (every
    # sequence's first chunk, then every second one, ...)
    chunks_by_step: torch.Tensor
    num_decode: int
    num_chunks: int
    # host copy: (first token, end token) of each prefill sequence, in prefill_seqs order
    prefill_bounds: tuple = ()
    _segments: dict = field(default_factory=dict, compare=False, repr=False)

    def segments(self, seg_chunks: int) -> "SegmentMeta":
        """The prefill sequences cut into segments of `seg_chunks` chunks (the last one of each
        sequence shorter), as tables on this meta's device, built once per segment length."""
        if seg_chunks < 1:
            raise ValueError(f"seg_chunks must be >= 1, got {seg_chunks}")
        if seg_chunks not in self._segments:
            step = seg_chunks * CHUNK
            bounds, first = [], [0]
            for bos, eos in self.prefill_bounds:
                for t in range(bos, eos, step):
                    bounds += [t, min(t + step, eos)]
                first.append(len(bounds) // 2)
            G = len(bounds) // 2
            b, f, pairs, ones = _int32_on(self.cu_seqlens.device, bounds, first, range(0, 2 * G, 2), [1] * (2 * G))
            slots = torch.arange(2 * G, dtype=torch.int64).div_(2, rounding_mode="floor")
            self._segments[seg_chunks] = SegmentMeta(
                bounds=b, seq_first=f, pairs=pairs, ones=ones,
                slots=slots.to(self.cu_seqlens.device, non_blocking=True), num_segments=G)
        return self._segments[seg_chunks]


@dataclass(frozen=True)
class SegmentMeta:
    """Prefill sequences cut into segments (BatchMeta.segments), for the chunk-parallel scan.

    Segment g spans tokens [bounds[2g], bounds[2g + 1]); prefill sequence i (in prefill_seqs
    order) owns segments [seq_first[i], seq_first[i + 1]). pairs = 2g, slots[2g] = g and
    ones let the segments stand in for sequences of a kernel that reads (cu_seqlens[n],
    cu_seqlens[n + 1]), slots[n] and has_state[n] for n = seqs[i]: each segment starts from
    its own entry g of a scratch state buffer."""

    bounds: torch.Tensor     # [2G] int32
    seq_first: torch.Tensor  # [Np + 1] int32
    pairs: torch.Tensor      # [G] int32, 2g
    ones: torch.Tensor       # [2G] int32
    slots: torch.Tensor      # [2G] int64, n // 2
    num_segments: int


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} = {value!r}: expected an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} = {value!r}: expected an integer") from None


def _checked(seq_lens: list, slots: list, has_state: list) -> tuple[list, list, list]:
    """Entry-by-entry checks with a message naming the first bad entry; plain-int copies."""
    seq_lens = [_as_int(n, f"seq_lens[{i}]") for i, n in enumerate(seq_lens)]
    slots = [_as_int(s, f"slots[{i}]") for i, s in enumerate(slots)]
    for i, n in enumerate(seq_lens):
        if n < 1:
            raise ValueError(f"seq_lens[{i}] = {n}: each sequence needs a length >= 1")
    for i, s in enumerate(slots):
        if s < 0:
            raise ValueError(f"slots[{i}] = {s}: slots are >= 0")
    seen: dict[int, int] = {}
    for i, s in enumerate(slots):
        if s in seen:
            raise ValueError(f"slot {s} is used twice in one batch (sequences {seen[s]} and {i})")
        seen[s] = i
    for i, h in enumerate(has_state):
        if h not in (True, False):
            raise ValueError(f"has_state[{i}] = {h!r}: must be True or False")
    return seq_lens, slots, [bool(h) for h in has_state]


class Batch:
    """Packed sequences of one forward call.

    `seq_lens[i]` tokens of sequence i follow each other in `x`; `slots[i]` is its state slot;
    `has_state[i]` says whether it continues from that slot (decode step or continued prefill)
    or starts from zero state. Slots must be distinct within a batch.
    """

    def __init__(self, seq_lens: Sequence[int], slots: Sequence[int], has_state: Sequence[bool]):
        seq_lens, slots, has_state = list(seq_lens), list(slots), list(has_state)
        if not seq_lens:
            raise ValueError("a batch needs at least one sequence")
        if not (len(seq_lens) == len(slots) == len(has_state)):
            raise ValueError(
                f"seq_lens, slots and has_state must have one entry per sequence, got "
                f"{len(seq_lens)}, {len(slots)} and {len(has_state)}"
            )
        plain = (all(type(n) is int for n in seq_lens) and all(type(s) is int for s in slots)
                 and all(type(h) is bool for h in has_state))
        if not (plain and min(seq_lens) >= 1 and min(slots) >= 0 and len(set(slots)) == len(slots)):
            # the slow path names the first bad entry (the fast checks above only say "some")
            seq_lens, slots, has_state = _checked(seq_lens, slots, has_state)
        self.seq_lens = tuple(seq_lens)
        self.slots = tuple(slots)
        self.has_state = tuple(has_state)
        self.cu_seqlens = (0, *itertools.accumulate(seq_lens))
        self.num_tokens = self.cu_seqlens[-1]
        self._meta: dict[torch.device, BatchMeta] = {}
        self._pieces: dict[int, list[tuple[int, int, "Batch"]]] = {}

    def __len__(self) -> int:
        return len(self.seq_lens)

    def __repr__(self) -> str:
        return f"Batch(seq_lens={list(self.seq_lens)}, slots={list(self.slots)}, has_state={list(self.has_state)})"

    def token_pieces(self, pieces: int) -> list[tuple[int, int, "Batch"]]:
        """Cut the packed tokens into about `pieces` consecutive ranges of similar size, as
        [(first token, end token, sub-batch)]. A cut inside a sequence falls on a multiple of
        CHUNK from its start (so the chunks stay the same) and the later part continues from the
        slot (has_state=True): running the sub-batches in order gives the states and outputs of
        the whole batch. Used to overlap one piece's all-reduce with the next piece's compute."""
        if pieces < 1:
            raise ValueError(f"pieces must be >= 1, got {pieces}")
        if pieces not in self._pieces:
            T = self.num_tokens
            cuts = set()
            for k in range(1, pieces):
                want = k * T // pieces
                i = max(j for j in range(len(self.seq_lens)) if self.cu_seqlens[j] <= want)
                start, n = self.cu_seqlens[i], self.seq_lens[i]
                off = round((want - start) / CHUNK) * CHUNK
                cuts.add(start + min(off, n) if off > 0 else start)
            bounds = sorted(cuts | {0, T})
            out = []
            for t0, t1 in zip(bounds[:-1], bounds[1:]):
                if t1 <= t0:
                    continue
                lens, slots, has = [], [], []
                for i, (s0, n) in enumerate(zip(self.cu_seqlens, self.seq_lens)):
                    a, b = max(s0, t0), min(s0 + n, t1)
                    if a < b:
                        lens.append(b - a)
                        slots.append(self.slots[i])
                        has.append(self.has_state[i] if a == s0 else True)
                out.append((t0, t1, Batch(lens, slots, has)))
            self._pieces[pieces] = out
        return self._pieces[pieces]

    def meta(self, device) -> BatchMeta:
        built = self._meta.get(device)     # a layer's call passes x.device, a key as built below
        if built is not None:
            return built
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._meta:
            decode = [i for i, n in enumerate(self.seq_lens) if n == 1]
            prefill = [i for i, n in enumerate(self.seq_lens) if n > 1]
            chunks = [x for i in prefill for c in range(0, self.seq_lens[i], CHUNK)
                      for x in (i, self.cu_seqlens[i] + c)]
            longest = max((self.seq_lens[i] for i in prefill), default=0)
            by_step = [x for c in range(0, longest, CHUNK) for i in prefill if c < self.seq_lens[i]
                       for x in (i, self.cu_seqlens[i] + c)]
            cu, has, dec, pre, ch, st = _int32_on(device, self.cu_seqlens, self.has_state, decode, prefill, chunks,
                                                  by_step)
            self._meta[device] = BatchMeta(
                cu_seqlens=cu,
                slots=torch.tensor(self.slots, dtype=torch.int64).to(device, non_blocking=True),
                has_state=has,
                decode_seqs=dec,
                prefill_seqs=pre,
                chunks=ch.view(len(chunks) // 2, 2),
                chunks_by_step=st.view(len(chunks) // 2, 2),
                num_decode=len(decode),
                num_chunks=len(chunks) // 2,
                prefill_bounds=tuple((self.cu_seqlens[i], self.cu_seqlens[i + 1]) for i in prefill),
            )
        return self._meta[device]
