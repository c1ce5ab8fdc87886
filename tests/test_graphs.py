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


def stand_in_decoder(layer, cache):
    decoder = GraphedDecoder.__new__(GraphedDecoder)
    decoder.layers, decoder.cache = {0: layer}, cache
    decoder.device, decoder.dtype, decoder.H = layer.device, layer.dtype, layer.cfg.hidden_size
    decoder._graphs = {}
    decoder.progress = Progress("the stand-in's all-reduce", pinned=False)

    def capture(B):
        x = torch.zeros(B, decoder.H, dtype=decoder.dtype)
        index = torch.arange(B)             # the graph's slot buffer, as captured
        ys = {0: torch.zeros(B, decoder.H, dtype=decoder.dtype)}

        def replay():
            slots = index.tolist()
            ys[0].copy_(layer(x, Batch([1] * B, slots, [True] * B), cache))

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
