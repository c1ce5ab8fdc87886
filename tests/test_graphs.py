"""GraphedDecoder's host side on the CPU: which steps send their slots to the graph's index buffer,
which copy x into its input buffer, and what a step refuses. A stand-in takes the captured graph's
place: its replay runs the layer on the graph's input buffer with the slots that the index buffer
holds, so a step whose slots did not reach that buffer gives another sequence's output; each
replay counts the watchdog's calls it holds. The real graphs are checked against eager steps on
a GPU (tests/test_gpu_launch.py)."""

import types

import pytest
import torch

from helpers import random_full_weights, tiny_config
from tp_gdn import Batch, GDNLayer, StateCache
from tp_gdn import graphs
from tp_gdn.graphs import GraphedDecoder
from tp_gdn.parallel.watchdog import Progress


class Counter:
    """Stands in for the CUDA event that a slot send records."""

    def __init__(self):
        self.records = 0

    def record(self):
        self.records += 1

    def synchronize(self):
        pass


def stand_in_decoder(layer, cache, buckets=None):
    """A GraphedDecoder whose capture makes a stand-in graph (module docstring). Its replay runs
    the layer on the rows whose slot is not the cache's padding slot, which must come first, and
    fills the padding rows with NaN (their outputs mean nothing)."""
    decoder = GraphedDecoder.__new__(GraphedDecoder)
    decoder.layers, decoder.cache = {0: layer}, cache
    decoder.device, decoder.dtype, decoder.H = layer.device, layer.dtype, layer.cfg.hidden_size
    decoder.buckets = graphs.check_buckets(buckets)
    decoder._sizes = graphs.size_table(decoder.buckets)
    decoder._graphs = {}
    decoder.progress = Progress("the stand-in's all-reduce", pinned=False)
    decoder.captured = []

    def capture(B):
        decoder.captured.append(B)
        x = torch.zeros(B, decoder.H, dtype=decoder.dtype)
        index = torch.arange(B)             # the graph's slot buffer, as captured
        ys = {0: torch.zeros(B, decoder.H, dtype=decoder.dtype)}

        def replay():
            slots = index.tolist()
            n = sum(s != cache.padding_slot for s in slots)
            assert all(s == cache.padding_slot for s in slots[n:]), slots       # padding rows after the real ones
            ys[0][:n] = layer(x[:n], Batch([1] * n, slots[:n], [True] * n), cache)
            ys[0][n:] = float("nan")

        # as if the graph held two watched all-reduces (parallel/watchdog.py): each replay counts them
        return dict(graph=types.SimpleNamespace(replay=replay), x=x, meta=types.SimpleNamespace(slots=index), ys=ys,
                    host=torch.empty(B, dtype=torch.int64), copied=Counter(), last=None,
                    watched=[(decoder.progress, 2)])

    decoder._capture = capture
    return decoder


def test_decode_steps_send_slots_and_copy_inputs_only_when_they_change(seed):
    cfg = tiny_config(nk=2, nv=4, dk=8, dv=8, H=32, layers=1)
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg, seed), dtype=torch.float32)
    caches = [StateCache(cfg, [0], 5, tp_size=1) for _ in range(2)]
    prompt = torch.randn(24, cfg.hidden_size)
    for c in caches:
        layer(prompt, Batch([10, 14], [3, 1], [False, False]), c)
    decoder = stand_in_decoder(layer, caches[1])

    slots = [3, 1]
    sends = []
    # (slots as passed, whether they are sent): the first step; the same list; the same list
    # object changed in place; a tuple of the last values (checked, not sent); a new list
    for step, (s, sent) in enumerate([(slots, True), (slots, False), (None, True), ((1, 3), False),
                                      ([3, 1], True)]):
        if s is None:
            slots[0], slots[1] = 1, 3
            s = slots
        x = torch.randn(2, cfg.hidden_size)
        want = layer(x, Batch([1, 1], list(s), [True, True]), caches[0])
        assert torch.equal(decoder(x, s)[0], want), step
        g = decoder._graphs[2]
        sends.append(g["copied"].records)
        assert sends[-1] - (sends[-2] if step else 0) == int(sent), step
    assert torch.equal(caches[0].ssm[0], caches[1].ssm[0]) and torch.equal(caches[0].conv[0], caches[1].conv[0])
    assert decoder.progress.queued == 2 * 5          # five replays of two watched all-reduces

    # the graph's own input buffer: nothing copied into it (a stand-in buffer that refuses copies)
    buf = decoder.input_buffer(2)
    buf.copy_(torch.randn(2, cfg.hidden_size))
    want = layer(buf.clone(), Batch([1, 1], [3, 1], [True, True]), caches[0])
    buf.copy_ = None
    assert torch.equal(decoder(buf, [3, 1])[0], want)


def test_decode_steps_refuse_bad_inputs(seed):
    cfg = tiny_config(nk=2, nv=4, dk=8, dv=8, H=32, layers=1)
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg, seed), dtype=torch.float32)
    decoder = stand_in_decoder(layer, StateCache(cfg, [0], 4, tp_size=1))
    x = torch.randn(2, cfg.hidden_size)
    decoder(x, [0, 1])
    with pytest.raises(ValueError, match="at least one sequence"):
        decoder(x[:0], [])
    with pytest.raises(ValueError, match=r"x has shape \(3, 32\), expected \[2, 32\]"):
        decoder(torch.randn(3, cfg.hidden_size), [0, 1])
    with pytest.raises(ValueError, match="x is torch.float64"):
        decoder(x.double(), [0, 1])
    with pytest.raises(ValueError, match="slot 4 is out of range: the cache has 4 slots"):
        decoder(x, [0, 4])
    with pytest.raises(ValueError, match="slot"):
        decoder(x, [1, 1])
    # a refused step changed nothing: the last good slots are still the graph's
    assert list(decoder._graphs[2]["last"]) == [0, 1] and decoder._graphs[2]["meta"].slots.tolist() == [0, 1]


def test_batch_size_buckets():
    assert graphs.DEFAULT_BUCKETS[:5] == (1, 2, 4, 8, 16) and graphs.DEFAULT_BUCKETS[-1] == 512
    assert all(b % 8 == 0 for b in graphs.DEFAULT_BUCKETS[3:])
    b = graphs.check_buckets([8, 2, 2, 32])
    assert b == (2, 8, 32)
    assert [graphs.bucket_for(B, b) for B in (1, 2, 3, 8, 9, 32, 33, 100)] == [2, 2, 8, 8, 32, 32, 33, 100]
    assert graphs.bucket_for(5, None) == 5 and graphs.check_buckets(None) is None
    assert graphs.size_table(b) == [graphs.bucket_for(B, b) for B in range(33)] and graphs.size_table(None) == []
    for bad in ([0], [2, -1], [True], [2.0], []):
        with pytest.raises(ValueError, match="bucket"):
            graphs.check_buckets(bad)


def test_decode_steps_pad_to_their_bucket_and_return_only_their_rows(seed):
    """Steps of 1..6 sequences replay the graphs of buckets 2, 4 and 8 (one capture each, the
    padding rows on the cache's padding slot), and a step of 9 a graph of its own size; each
    returns its own rows, equal to an eager step's, and the states equal an eager run's."""
    cfg = tiny_config(nk=2, nv=4, dk=8, dv=8, H=32, layers=1)
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg, seed), dtype=torch.float32)
    caches = [StateCache(cfg, [0], 12, tp_size=1) for _ in range(2)]
    prompt = torch.randn(40, cfg.hidden_size)
    for c in caches:
        layer(prompt, Batch([10, 14, 16], [3, 1, 7], [False] * 3), c)
    decoder = stand_in_decoder(layer, caches[1], buckets=[2, 4, 8])
    g = torch.Generator().manual_seed(seed)
    for slots in ([3], [3, 1], [3, 1, 7], [7, 1, 3, 0], [0, 1, 2, 3, 5], [5, 4, 3, 2, 1, 0], [3, 1, 7],
                  list(range(9))):
        x = torch.randn(len(slots), cfg.hidden_size, generator=g)
        want = layer(x, Batch([1] * len(slots), slots, [True] * len(slots)), caches[0])
        got = decoder(x, slots)[0]
        assert got.shape == want.shape and torch.equal(got, want), slots
        size = decoder.graph_size(len(slots))
        assert decoder._graphs[size]["meta"].slots.tolist() == slots + [caches[1].padding_slot] * (size - len(slots))
    assert decoder.captured == [2, 4, 8, 9]
    assert torch.equal(caches[0].ssm[0], caches[1].ssm[0]) and torch.equal(caches[0].conv[0], caches[1].conv[0])
    # the input rows a step of 3 writes into: the bucket-4 graph's first 3 rows, copied from nowhere
    buf = decoder.input_buffer(3)
    assert buf.shape == (3, cfg.hidden_size) and buf.data_ptr() == decoder._graphs[4]["x"].data_ptr()
    assert decoder.input_buffer(3) is buf
    buf.copy_(torch.randn(3, cfg.hidden_size, generator=g))
    want = layer(buf.clone(), Batch([1] * 3, [1, 0, 2], [True] * 3), caches[0])
    buf.copy_ = None                 # the step must not copy into its own buffer
    assert torch.equal(decoder(buf, [1, 0, 2])[0], want)


def test_the_cache_holds_a_padding_slot_past_the_slots_a_batch_can_name():
    cfg = tiny_config(nk=2, nv=4, dk=8, dv=8, H=32, layers=2)
    cache = StateCache(cfg, [0, 1], 3, tp_size=1)
    assert cache.padding_slot == 3
    for pool in (*cache.conv.values(), *cache.ssm.values()):
        assert pool.shape[0] == 3 and pool.is_contiguous()
        assert pool.untyped_storage().nbytes() == 4 * pool[0].numel() * pool.element_size()
    assert cache.nbytes() == sum(4 * t[0].numel() * t.element_size() for d in (cache.conv, cache.ssm)
                                 for t in d.values())
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg, 0), dtype=torch.float32)
    with pytest.raises(ValueError, match="slot 3 is out of range: the cache has 3 slots"):
        layer(torch.randn(2, cfg.hidden_size), Batch([2], [3], [False]), cache)
