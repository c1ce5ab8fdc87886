"""Sharded layers equal the unsharded layer built from the same weights, and all ranks agree."""

import pytest
import torch

from helpers import random_full_weights, rel_err, run_ranks, tiny_config
from tp_gdn import GDNLayer, StateCache
from tp_gdn.workload import mixed_workload, run_steps
from tp_gdn import Batch
from workers import overlapped_workload, sharded_workload, tail_chunks_workload


@pytest.mark.parametrize("tp,nk,nv", [(2, 4, 8), (4, 4, 16), (8, 8, 16)])
def test_sharded_layer_equals_unsharded_layer(tmp_path, tp, nk, nv, seed):
    cfg = tiny_config("qwen3_next", nk=nk, nv=nv, dk=16, dv=8, layers=2)
    full = {i: random_full_weights(cfg, seed + i) for i in cfg.linear_layer_ids}
    steps = mixed_workload(cfg.hidden_size, seed)
    unsharded = {i: GDNLayer.from_full(cfg, i, w) for i, w in full.items()}
    want = run_steps(unsharded, StateCache(cfg, list(full), 8, tp_size=1), steps)
    results = run_ranks(tp, sharded_workload, tmp_path, cfg, full, steps, 8)
    for i in full:
        for n, w in enumerate(want[i]):
            for r in range(tp):
                assert torch.equal(results[r][i][n], results[0][i][n]), f"rank {r} differs, layer {i} step {n}"
            assert rel_err(results[0][i][n], w) < 1e-5, f"layer {i} step {n}"


def test_token_pieces_cover_the_batch_and_cut_on_chunk_multiples():
    batch = Batch([300, 1, 130, 5], [3, 0, 7, 2], [False, True, True, False])
    for pieces in (1, 2, 3, 4, 7):
        got = batch.token_pieces(pieces)
        assert got[0][0] == 0 and got[-1][1] == batch.num_tokens
        assert all(a[1] == b[0] for a, b in zip(got[:-1], got[1:]))
        assert all(t1 - t0 == sub.num_tokens for t0, t1, sub in got)
        seen = {}
        for _, _, sub in got:
            for n, slot, has in zip(sub.seq_lens, sub.slots, sub.has_state):
                i = batch.slots.index(slot)
                if slot in seen:               # a later part continues from the slot ...
                    assert has and seen[slot] % 64 == 0   # ... after a cut on a chunk multiple
                else:
                    assert has == batch.has_state[i]
                seen[slot] = seen.get(slot, 0) + n
        assert seen == dict(zip(batch.slots, batch.seq_lens))
    assert len(batch.token_pieces(3)) == 3
    with pytest.raises(ValueError, match="pieces must be >= 1"):
        batch.token_pieces(0)


def test_batch_meta_is_built_once_per_device_however_the_device_is_named():
    """A layer's call looks its batch's meta up by x.device first (Batch.meta): every name of one
    device must reach the same meta, built once, with the batch's own tables."""
    batch = Batch([130, 1, 5], [3, 0, 2], [False, True, True])
    meta = batch.meta("cpu")
    assert batch.meta(torch.device("cpu")) is meta and batch.meta("cpu") is meta
    assert meta.cu_seqlens.tolist() == [0, 130, 131, 136] and meta.slots.tolist() == [3, 0, 2]
    assert meta.num_decode == 1 and meta.num_chunks == 4      # 130 tokens: chunks at 0, 64, 128; 5 tokens: one
    other = Batch([130, 1, 5], [3, 0, 2], [False, True, True]).meta(torch.device("cpu"))
    assert other is not meta and torch.equal(other.chunks, meta.chunks)
    assert meta.chunks.tolist() == [[0, 0], [0, 64], [0, 128], [2, 131]]
    # the chunks again, by their place in their sequence: every sequence's first, then its second, ...
    assert meta.chunks_by_step.tolist() == [[0, 0], [2, 131], [0, 64], [0, 128]]


def mixed_workload_on_the_unsharded_layers(seed, steps=None):
    """A tiny two-layer model's full weights, the steps (the mixed workload by default) and the
    unsharded layers' outputs over them: (cfg, full weights by layer, steps, outputs by layer)."""
    cfg = tiny_config("qwen3_next", nk=4, nv=8, dk=16, dv=8, layers=2)
    full = {i: random_full_weights(cfg, seed + i) for i in cfg.linear_layer_ids}
    steps = mixed_workload(cfg.hidden_size, seed) if steps is None else steps(cfg)
    unsharded = {i: GDNLayer.from_full(cfg, i, w) for i, w in full.items()}
    return cfg, full, steps, run_steps(unsharded, StateCache(cfg, list(full), 8, tp_size=1), steps)


@pytest.mark.parametrize("pieces", [2, 3])
def test_overlapped_all_reduce_gives_the_unsharded_result(tmp_path, pieces, seed):
    cfg, full, steps, want = mixed_workload_on_the_unsharded_layers(seed)
    results = run_ranks(2, overlapped_workload, tmp_path, cfg, full, steps, 8, pieces)
    for i in full:
        for n, w in enumerate(want[i]):
            assert torch.equal(results[1][i][n], results[0][i][n])
            assert rel_err(results[0][i][n], w) < 1e-5, f"layer {i} step {n}"


@pytest.mark.parametrize("chunks", [2, 3])
def test_tail_in_row_chunks_gives_the_unsharded_result(tmp_path, chunks, seed):
    cfg, full, steps, want = mixed_workload_on_the_unsharded_layers(seed)
    (got, started), (other, _) = run_ranks(2, tail_chunks_workload, tmp_path, cfg, full, steps, 8, chunks)
    # every call of every layer (steps in order, layers in order) went through the chunks, which
    # split its rows as forward's row ranges do
    expected = []
    for st in steps:
        t = st.x.shape[0]
        c = min(chunks, t)
        expected += [(i + 1) * t // c - i * t // c for _ in full for i in range(c)]
    assert started == expected
    for i in full:
        for n, w in enumerate(want[i]):
            assert torch.equal(other[i][n], got[i][n])
            assert rel_err(got[i][n], w) < 1e-5, f"layer {i} step {n}"


def test_large_calls_at_tp2_take_the_tail_in_two_chunks_by_default(tmp_path, seed):
    from tp_gdn.workload import WorkloadBuilder

    def prefill_then_decode(cfg):
        w = WorkloadBuilder(cfg.hidden_size, seed)
        w.step([(0, 5000, False), (1, 3201, False)])      # 8201 tokens: at least TAIL_MIN_TOKENS
        w.step([(0, 1, True), (1, 1, True)])              # a decode step: one piece
        return w.steps

    cfg, full, steps, want = mixed_workload_on_the_unsharded_layers(seed, prefill_then_decode)
    (got, started), (other, _) = run_ranks(2, tail_chunks_workload, tmp_path, cfg, full, steps, 8, None)
    assert started == [4100, 4101] * len(full)
    for i in full:
        for n, ref in enumerate(want[i]):
            assert torch.equal(other[i][n], got[i][n])
            assert rel_err(got[i][n], ref) < 1e-5, f"layer {i} step {n}"


def test_large_calls_at_tp2_take_the_copy_engines_tail_in_four_chunks_where_it_applies(tmp_path, seed):
    """Where out_proj has a copy-engine all-reduce (here a stand-in that sums each chunk through
    gloo, as the GPUs' copy engines do over NVLink), a call of 8201 tokens goes through it in
    TAIL_CHUNKS[("copy", 2)] = 4 chunks: one start, four reduces over the forward's row ranges
    (the fourth marked last), one finish, in that order, every layer; smaller calls do not use
    it. Outputs equal the unsharded layer's on both ranks. A call asking for more chunks than it takes is refused on
    every rank before any work. With the stand-in's MIN_ROWS above the call's rows, the call
    does not use it (the group's all-reduce takes the tail, with no limit on chunks)."""
    from tp_gdn.workload import WorkloadBuilder
    from workers import chunked_stand_in_workload

    def steps_of(cfg):
        w = WorkloadBuilder(cfg.hidden_size, seed)
        w.step([(0, 5000, False), (1, 3201, False)])
        w.step([(0, 1, True), (1, 1, True)])
        w.step([(2, 300, False)])
        return w.steps

    cfg, full, steps, want = mixed_workload_on_the_unsharded_layers(seed, steps_of)
    H = cfg.hidden_size
    for min_rows, expected in ((8201, [("start", 8201, H), ("reduce", 2050), ("reduce", 2050), ("reduce", 2050),
                                       ("reduce last", 2051), ("finish",)] * len(full)),
                               (8202, [])):
        (got, log, err), (other, log1, err1) = run_ranks(2, chunked_stand_in_workload, tmp_path, cfg, full, steps,
                                                         8, 7, min_rows)
        assert log == log1 == expected, min_rows
        for i in full:
            for n, ref in enumerate(want[i]):
                assert torch.equal(other[i][n], got[i][n])
                assert rel_err(got[i][n], ref) < 1e-5, f"layer {i} step {n}"
        if expected:
            assert err == err1 and "at most 6 row chunks a call (this call asks for 7)" in err
        else:         # NCCL's tail takes any number of chunks
            assert err is None and err1 is None


def test_a_rank_that_fails_inside_the_copy_engines_tail_ends_the_call_before_raising(tmp_path, seed):
    """The copy engines' peers wait on a rank's flags with no timeout, so a rank that raises
    inside the tail, in its first part (in_proj, the mixer, the first norm) or later, ends the
    all-reduce's call (abort, which raises the flags on GPUs; a call is started first where none
    had) and then raises the error itself; where the call's start itself failed, there is no
    call to end. Driven here through the gloo stand-in, both ranks failing alike."""
    from workers import chunked_stand_in_failure

    cfg = tiny_config("qwen3_next", nk=4, nv=8, dk=16, dv=8, layers=1)
    full = {i: random_full_weights(cfg, seed + i) for i in cfg.linear_layer_ids}
    steps = mixed_workload(cfg.hidden_size, seed)
    T, H = steps[0].batch.num_tokens, cfg.hidden_size
    chunk = [(i + 1) * T // 4 - i * T // 4 for i in range(4)]
    for fail_at, expected in ((1, [("start", T, H), ("abort",)]),
                              (3, [("start", T, H), ("reduce", chunk[0]), ("reduce", chunk[1]), ("abort",)]),
                              (0, [("start refused",)])):     # tried once: no second start to end it
        results = run_ranks(2, chunked_stand_in_failure, tmp_path, cfg, full, steps, 8, fail_at)
        for log, err in results:
            assert log == expected, fail_at
            assert err == (f"injected failure in norm call {fail_at}" if fail_at else "injected failure in start")


def test_copy_engine_abort_raises_its_read_flag_only_after_each_peers_first_chunk_flag():
    """CopyEngineCall.abort's stream operations, recorded in order (no GPU): every later chunk's
    "written" flag into the peer on the main stream; then, on the side stream after the main
    stream, a wait for the peer's chunk-0 flag of this call before this rank's "read" flag goes
    out; last, on the main stream, the call's number into the watchdog's host word, which the
    host counts as queued. Waits are for equality: without that wait, a call that failed before
    its first reduce wrote its read flag at once, and a peer whose start had not yet seen the read
    flag of the call before would wait for ever (the likely reason why one GPU run of the abort's
    test did not finish in the twenty-seventh session)."""
    from tp_gdn.parallel import comm
    from tp_gdn.parallel.watchdog import Progress

    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(("join", self.name, other.name))

    class Ops:
        @staticmethod
        def write(stream, addr, value):
            log.append(("write", stream.name, addr, value))

        @staticmethod
        def wait_equal(stream, addr, value):
            log.append(("wait", stream.name, addr, value))

    M = comm.CopyEngineAllReduce.MAX_CHUNKS
    ar = object.__new__(comm.CopyEngineAllReduce)
    ar.world, ar.rank = 2, 1
    ar._lay_out_flags()
    ar.flag_ptrs, ar.side = [1 << 20, 2 << 20], Stream("side")
    ar.progress = Progress("the stand-in", pinned=False)
    ar.progress.set_queued(6)
    ar.progress.word[0] = 6                                          # the GPU got through call 6
    call = object.__new__(comm.CopyEngineCall)
    call.ar, call.ops, call.e, call.chunks, call.peers, call.main = ar, Ops, 7, 1, [0], Stream("main")
    call.scatter = False                                             # the form tp=2 takes
    call.main_read_peers = False                                     # no last chunk summed on main
    call.abort()
    peer, own = 1 << 20, 2 << 20
    assert log == ([("write", "main", peer + 4 * (M + i), 7) for i in range(1, M)] +
                   [("join", "side", "main"), ("wait", "side", own + 4 * 0, 7),
                    ("write", "side", peer + 4 * (2 * M + 1), 7), ("join", "main", "side"),
                    ("write", "main", ar.progress.address, 7)])
    assert ar.progress.queued == 7 and ar.progress.behind() == 1     # no GPU ran the write here


def test_tail_chunks_below_one_are_refused():
    cfg = tiny_config("qwen3_next", nk=4, nv=8, dk=16, dv=8, layers=1)
    lid = cfg.linear_layer_ids[0]
    layer = GDNLayer.from_full(cfg, lid, random_full_weights(cfg, 0))
    steps = mixed_workload(cfg.hidden_size, 0)
    with pytest.raises(ValueError, match="tail must be >= 1"):
        layer(steps[0].x, steps[0].batch, StateCache(cfg, [lid], 8), tail=0)


@pytest.mark.parametrize("var,getter,default,spelled,value,bad,choices", [
    ("TP_GDN_ALL_REDUCE", "all_reduce_mode", "auto", " NCCL ", "nccl", "nvls", "auto, nccl, symm"),
    ("TP_GDN_SYMM_KERNEL", "symm_kernel", "auto", " OneShot ", "oneshot", "two_shot", "auto, ll, push, oneshot"),
])
def test_all_reduce_settings_are_checked(monkeypatch, var, getter, default, spelled, value, bad, choices):
    from tp_gdn.parallel import comm

    read = getattr(comm, getter)
    monkeypatch.delenv(var, raising=False)
    assert read() == default
    monkeypatch.setenv(var, spelled)
    assert read() == value
    monkeypatch.setenv(var, bad)
    with pytest.raises(ValueError, match=f"{var}='{bad}': expected one of {choices}"):
        read()


def test_symmetric_all_reduce_does_not_apply_to_gloo_ranks(tmp_path, seed):
    """On CPU ranks (gloo) "auto" takes the group's all-reduce for every size, whole or in row
    chunks (no copy engines), and "symm" refuses to build the layer, saying why, on every rank
    alike."""
    from workers import all_reduce_choice

    cfg = tiny_config(nk=2, nv=4)
    full = random_full_weights(cfg, seed)
    assert run_ranks(2, all_reduce_choice, tmp_path, cfg, full, "auto") == [("group", "group", "group")] * 2
    assert run_ranks(2, all_reduce_choice, tmp_path, cfg, full, "nccl") == [("group", "group", "group")] * 2
    refused = run_ranks(2, all_reduce_choice, tmp_path, cfg, full, "symm")
    assert refused[0] == refused[1] and "symmetric memory does not apply: the layer is on cpu" in refused[0]
    # one rank holds the whole sum: no all-reduce at all
    assert GDNLayer.from_full(cfg, 0, full).out_proj.all_reduce_kind(1) == "none"


def test_stream_memory_operations_say_why_they_are_unavailable(monkeypatch):
    """Without a loadable CUDA driver library the copy-engine all-reduce's stream operations give
    the reason (which makes the layer keep NCCL for its tail) and refuse to run, naming it."""
    import ctypes.util

    from tp_gdn.parallel import streamops

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libno-such-cuda-driver.so")
    monkeypatch.setattr(streamops, "_loaded", False)
    monkeypatch.setattr(streamops, "_lib", None)
    monkeypatch.setattr(streamops, "_why", None)
    why = streamops.why_unavailable()
    assert why is not None and "libno-such-cuda-driver.so" in why and "does not load" in why
    with pytest.raises(RuntimeError, match="stream memory operations are unavailable: the CUDA driver library"):
        streamops.wait_equal(None, 0, 1)
    with pytest.raises(RuntimeError, match="unavailable"):
        streamops.write(None, 0, 1)


def test_symmetric_all_reduce_verdict_from_what_the_ranks_report():
    """The decision each rank takes from the gathered (host, GPU uuid, has symmetric memory) of
    every rank: one host whose GPUs each rank sees and reaches applies; anything else gives a
    reason naming what is wrong."""
    from tp_gdn.parallel.comm import _local_verdict

    uuids = ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]
    reach = lambda i, j: True                                   # noqa: E731
    two = [("node0", "GPU-a", True), ("node0", "GPU-c", True)]
    assert _local_verdict(two, uuids, 0, reach) is None
    assert _local_verdict(two, uuids, 2, reach) is None
    assert "more than one host" in _local_verdict([("node0", "GPU-a", True), ("node1", "GPU-a", True)], uuids, 0, reach)
    # Ray actors: each process sees only its own GPU
    assert "rank 1's GPU is not visible" in _local_verdict(two, ["GPU-a"], 0, reach)
    no_p2p = lambda i, j: {i, j} != {0, 2}                      # noqa: E731
    assert _local_verdict(two, uuids, 0, no_p2p) == "GPU 0 cannot reach GPU 2 peer to peer"
    assert "no torch.distributed._symmetric_memory" in _local_verdict(
        [("node0", "GPU-a", True), ("node0", "GPU-b", False)], uuids, 0, reach)
