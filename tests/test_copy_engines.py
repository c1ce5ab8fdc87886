"""comm.CopyEngineAllReduce's protocol on CPU: several ranks' streams (main, side, gather)
simulated in one process. The call's own code queues its work through a stand-in for
comm.StreamWork: each flag wait or write, copy and sum becomes an operation on a simulated
stream, and each rank's buffer is a CPU tensor that its peers "map" (the same object). A
scheduler then runs the streams' operations in a random interleaving (a wait runs once its flag
holds the value; a stream's wait on another once that one has run up to where it was asked), as
GPUs would, and fails on a deadlock. So the group sizes that no lent machine has (tp = 3, 4, 8)
run through the same code as tp = 2, in both forms (whole and scatter), including a rank that
aborts a call. The GPU tests (test_gpu_launch.py) run the real streams at the tp the machine
has."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from tp_gdn.parallel import comm


class Deadlock(AssertionError):
    pass


class SimStream:
    def __init__(self, sim, name: str):
        self.sim, self.name, self.queue, self.done = sim, name, [], 0

    def wait_stream(self, other: "SimStream") -> None:
        self.queue.append(("join", other, len(other.queue) + other.done))

    def ready(self) -> bool:
        kind, *args = self.queue[0]
        if kind == "wait":
            return self.sim.flags.get(args[0], 0) == args[1]
        if kind == "join":
            return args[0].done >= args[1]
        return True

    def step(self) -> None:
        kind, *args = self.queue.pop(0)
        if kind == "write":
            self.sim.flags[args[0]] = args[1]
        elif kind == "run":
            args[0]()
        self.done += 1


class SimWork:
    """comm.StreamWork's interface, queuing on simulated streams."""

    def __init__(self, sim, rank: int):
        self.sim, self.rank, self.current = sim, rank, None

    def wait_equal(self, stream, address, value):
        stream.queue.append(("wait", address, value & 0xFFFFFFFF))

    def write(self, stream, address, value):
        stream.queue.append(("write", address, value & 0xFFFFFFFF))

    def current_stream(self, device):
        return self.current

    @contextlib.contextmanager
    def on(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def copy(self, stream, dst, src):
        assert dst.shape == src.shape and dst.is_contiguous() and src.is_contiguous()
        stream.queue.append(("run", lambda: dst.copy_(src)))

    def sum(self, parts, out):
        self.current.queue.append(("run", lambda: comm.sum_in_rank_order(parts, out)))

    def empty(self, numel, device, dtype):
        return torch.full((numel,), float("nan"), dtype=dtype)

    def capturing(self):
        return False


class SimAllReduce(comm.CopyEngineAllReduce):
    """One rank's CopyEngineAllReduce with simulated flags, streams and buffers (no GPU, no group)."""

    MAX_CHUNKS = 8

    def __init__(self, sim, rank: int, world: int, rows: int, cols: int, dtype):
        self.world, self.rank, self.device = world, rank, "sim"
        self._lay_out_flags()
        self.flag_ptrs = [(r + 1) << 20 for r in range(world)]   # each rank's flags at its own "address"
        self.tmp, self.epoch, self.progress = None, 0, None
        self.ops = SimWork(sim, rank)
        self.main, self.side = SimStream(sim, f"main{rank}"), SimStream(sim, f"side{rank}")
        self.gather = SimStream(sim, f"gather{rank}")
        self.ops.current = self.main
        self.buffer = torch.full((rows, cols), float("nan"), dtype=dtype)
        self.sim = sim

    def _reserve(self, nbytes):
        assert nbytes <= self.buffer.numel() * self.buffer.element_size()

    def views(self, rows, cols, dtype):
        own = self.buffer.view(-1)[: rows * cols].view(rows, cols)
        return own, {p: self.sim.ranks[p].buffer.view(-1)[: rows * cols].view(rows, cols)
                     for p in range(self.world) if p != self.rank}


class Sim:
    def __init__(self, world: int, rows: int, cols: int, dtype, scatter_from: int, last_on_main: bool = True):
        self.flags: dict[int, int] = {}
        self.ranks = []
        for r in range(world):
            ar = SimAllReduce(self, r, world, rows, cols, dtype)
            ar.SCATTER_MIN_WORLD, ar.LAST_ON_MAIN = scatter_from, last_on_main
            self.ranks.append(ar)

    def call(self, rank: int, rows: int, partials: list[torch.Tensor], bounds, abort_after: int | None = None):
        """Queue one call of `rank`: for each chunk, its partial rows written on the main stream
        (as the out_proj GEMM does), then reduce (the last chunk marked so, as the layer's tail
        marks it); finish, or abort after `abort_after` chunks.
        Returns its output (filled in once the streams have run)."""
        ar = self.ranks[rank]
        cols = partials[0].shape[1]
        out = torch.full((rows, cols), float("nan"), dtype=partials[0].dtype)
        call = ar.start(rows, cols, out.dtype)
        for n, (r0, r1) in enumerate(bounds):
            if abort_after is not None and n == abort_after:
                call.abort()
                return out
            dst, src = call.partial(r0, r1), partials[rank][r0:r1]
            ar.main.queue.append(("run", lambda dst=dst, src=src: dst.copy_(src)))
            call.reduce(r0, r1, out[r0:r1], last=n == len(bounds) - 1)
        if abort_after is not None and abort_after >= len(bounds):
            call.abort()
        else:
            call.finish()
        return out

    def run(self, rng: random.Random) -> int:
        """Run every stream to its end, each step taken by a ready stream drawn at random with
        a weight of its own for this run, most of them far apart (so that some streams lag far
        behind others, as a GPU whose host launched late does); returns the steps taken."""
        streams = [s for ar in self.ranks for s in (ar.main, ar.side, ar.gather)]
        weight = {s.name: rng.random() ** 6 + 1e-9 for s in streams}
        steps = 0
        while any(s.queue for s in streams):
            ready = [s for s in streams if s.queue and s.ready()]
            if not ready:
                raise Deadlock("no stream can go on: " + "; ".join(
                    f"{s.name} at {s.queue[0][0]} {s.queue[0][1:]}" for s in streams if s.queue))
            rng.choices(ready, [weight[s.name] for s in ready])[0].step()
            steps += 1
        return steps


def _chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    return [(i * rows // chunks, (i + 1) * rows // chunks) for i in range(chunks)]


def _rank_order_sum(partials):
    out = torch.empty_like(partials[0])
    comm.sum_in_rank_order(list(partials), out)
    return out


FORMS = ["whole", "whole, last chunk on the side stream", "scatter"]


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("form", FORMS)
def test_copy_engine_calls_sum_every_chunk_on_every_rank(world, form, seed):
    """Calls of several sizes and chunk counts (chunks of fewer rows than ranks among them),
    queued back to back on every rank and run in random interleavings: every rank's output is
    the rank-order sum of the ranks' partial rows, bit for bit (bf16), the same on every rank,
    and no stream waits for ever. In the whole form the main stream sums each call's last chunk
    (LAST_ON_MAIN), or the side stream does, as it does the others."""
    rng = random.Random(seed)
    cols, dtype = 8, torch.bfloat16
    calls = [(37, 3), (64, 4), (5, 2), (29, 1), (37, 5)]        # (rows, chunks)
    for interleaving in range(4):
        sim = Sim(world, 64, cols, dtype, scatter_from=2 if form == "scatter" else world + 1,
                  last_on_main=form == "whole")
        queued = []
        for rows, chunks in calls:
            partials = [torch.randn(rows, cols).to(dtype) for _ in range(world)]
            outs = [sim.call(r, rows, partials, _chunk_bounds(rows, chunks)) for r in range(world)]
            queued.append((partials, outs))
        assert all(ar.epoch == len(calls) for ar in sim.ranks)
        sim.run(random.Random(rng.random()))
        for n, (partials, outs) in enumerate(queued):
            want = _rank_order_sum(partials)
            for r, out in enumerate(outs):
                assert torch.equal(out, want), (interleaving, n, r)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("form", ["whole", "scatter"])
@pytest.mark.parametrize("abort_after", [0, 1, 3])
def test_a_rank_that_aborts_a_call_leaves_its_peers_and_the_next_call_whole(world, form, abort_after, seed):
    """The last rank aborts the second call after `abort_after` of its 3 chunks (0: as where its
    first part raised, or its start was made only to end the call): every stream of every rank
    still runs to its end, in random interleavings, and the calls before and after are exact on
    every rank."""
    rng = random.Random(seed)
    cols, dtype, rows = 4, torch.bfloat16, 24
    for interleaving in range(12):
        sim = Sim(world, rows, cols, dtype, scatter_from=2 if form == "scatter" else world + 1)
        checked = []
        for n in range(3):
            partials = [torch.randn(rows, cols).to(dtype) for _ in range(world)]
            outs = [sim.call(r, rows, partials, _chunk_bounds(rows, 3),
                             abort_after=abort_after if (n == 1 and r == world - 1) else None)
                    for r in range(world)]
            if n != 1:
                checked.append((partials, outs))
        sim.run(random.Random(rng.random()))
        for partials, outs in checked:
            want = _rank_order_sum(partials)
            assert all(torch.equal(out, want) for out in outs), interleaving


def test_the_scatter_form_reads_fewer_rows_from_peers():
    """What the docstring claims of the two forms, counted: rows a rank reads out of its peers'
    buffers (by copies, and by the whole form's sum of the last chunk on the main stream) over a
    call of 3 chunks of 64 rows, (p - 1) 192 whole and 2 (p - 1) / p 192 scattered."""
    def peer_rows(world, scatter_from):
        sim = Sim(world, 192, 2, torch.float32, scatter_from)
        copied = [0]
        work = sim.ranks[0].ops
        plain_copy, plain_sum = work.copy, work.sum

        def a_peers(t):
            return any(t.untyped_storage().data_ptr() == sim.ranks[p].buffer.untyped_storage().data_ptr()
                       for p in range(1, world))

        def counting(stream, dst, src):
            if src.data_ptr() != dst.data_ptr() and a_peers(src):
                copied[0] += src.shape[0]
            plain_copy(stream, dst, src)

        def counting_sum(parts, out):
            copied[0] += sum(t.shape[0] for t in parts if a_peers(t))
            plain_sum(parts, out)

        work.copy, work.sum = counting, counting_sum
        partials = [torch.randn(192, 2) for _ in range(world)]
        for r in range(world):
            sim.call(r, 192, partials, _chunk_bounds(192, 3))
        sim.run(random.Random(0))
        return copied[0]

    for world in (2, 4, 8):
        assert peer_rows(world, world + 1) == (world - 1) * 192
        assert peer_rows(world, 2) == 2 * (world - 1) * 192 // world


def test_the_simulator_catches_a_summed_flag_raised_before_the_sum(monkeypatch, seed):
    """The simulator can fail: with the scatter form's "summed" flag written before the slice's
    sum (a broken order), some interleaving hands a peer the unsummed slice."""
    calls = []
    original = comm.CopyEngineCall.reduce

    def early_flag_reduce(self, r0, r1, out, last=False):
        # queue the peers' "summed" flags of this chunk ahead of everything else on the side stream
        for p in self.peers:
            self.ops.write(self.ar.side, self.ar._summed(p, self.ar.rank, self.chunks), self.e)
        calls.append(None)
        original(self, r0, r1, out, last)

    monkeypatch.setattr(comm.CopyEngineCall, "reduce", early_flag_reduce)
    rng, wrong = random.Random(seed), 0
    for interleaving in range(20):
        sim = Sim(2, 16, 4, torch.float32, scatter_from=2)
        partials = [torch.randn(16, 4) for _ in range(2)]
        outs = [sim.call(r, 16, partials, _chunk_bounds(16, 2)) for r in range(2)]
        try:
            sim.run(random.Random(rng.random()))
        except Deadlock:
            wrong += 1                 # the early flag left a later wait for the same value unmet
            continue
        want = _rank_order_sum(partials)
        wrong += not all(torch.equal(o, want) for o in outs)
    assert calls and wrong > 0
