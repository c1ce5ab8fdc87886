"""Invalid input raises an error that says what is wrong, and leaves the cache as it was."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import copy_checkpoint, random_full_weights, tiny_config
from tp_gdn import Batch, CheckpointError, GDNLayer, LoadStats, StateCache, load_layers


@pytest.fixture
def filled():
    """A layer and a cache whose slots 0..2 hold state from an earlier call."""
    cfg = tiny_config()
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg))
    cache = StateCache(cfg, [0, 1], num_slots=4, tp_size=1)
    layer(torch.randn(70, 32), Batch([60, 7, 3], [0, 1, 2], [False] * 3), cache)
    return layer, cache


def snapshot(cache):
    return [t.clone() for d in (cache.conv, cache.ssm) for t in d.values()]


def assert_unchanged(cache, snap):
    for now, before in zip([t for d in (cache.conv, cache.ssm) for t in d.values()], snap):
        assert torch.equal(now, before)


@pytest.mark.parametrize("make_x,batch,message", [
    (lambda: torch.randn(5, 31), ([5], [0], [True]), "x has width 31, but hidden_size is 32"),
    (lambda: torch.randn(6, 32), ([5], [0], [True]), "x has 6 rows, but the batch's seq_lens"),
    (lambda: torch.randn(5, 32), ([5], [4], [True]), "slot 4 is out of range: the cache has 4 slots"),
    (lambda: torch.randn(5, 32, dtype=torch.float64), ([5], [0], [True]), "x is torch.float64"),
    (lambda: torch.randn(1, 5, 32), ([5], [0], [True]), r"x must be a \[tokens, hidden_size=32\] tensor"),
])
def test_bad_call_raises_and_leaves_cache_unchanged(filled, make_x, batch, message):
    layer, cache = filled
    snap = snapshot(cache)
    with pytest.raises(ValueError, match=message):
        layer(make_x(), Batch(*batch), cache)
    assert_unchanged(cache, snap)


@pytest.mark.parametrize("args,message", [
    (([2, 3], [1, 1], [True, False]), "slot 1 is used twice in one batch"),
    (([2, 0], [0, 1], [True, False]), r"seq_lens\[1\] = 0: each sequence needs a length >= 1"),
    (([-3], [0], [False]), r"seq_lens\[0\] = -3"),
    (([2], [-1], [False]), r"slots\[0\] = -1"),
    (([2, 2], [0], [False]), "one entry per sequence"),
    (([], [], []), "at least one sequence"),
    (([2.5], [0], [False]), "expected an integer"),
    (([2], [0], ["yes"]), "must be True or False"),
])
def test_invalid_batch_is_refused_before_any_state_is_touched(filled, args, message):
    layer, cache = filled
    snap = snapshot(cache)
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(5, 32), Batch(*args), cache)
    assert_unchanged(cache, snap)


def test_cache_without_the_layer_is_refused(filled):
    layer, _ = filled
    other = StateCache(layer.cfg, [1], num_slots=4, tp_size=1)
    with pytest.raises(ValueError, match="holds no state for layer 0"):
        layer(torch.randn(2, 32), Batch([2], [0], [False]), other)


def test_cache_for_another_tp_is_refused(filled):
    layer, _ = filled
    other = StateCache(layer.cfg, [0], num_slots=4, tp_size=2)
    with pytest.raises(ValueError, match="cache was built for tp=2"):
        layer(torch.randn(2, 32), Batch([2], [0], [False]), other)


@pytest.mark.parametrize("build", [
    lambda cfg: GDNLayer(cfg, 0, 0, 3),
    lambda cfg: StateCache(cfg, [0], 4, tp_size=3),
])
def test_tp_that_does_not_divide_the_heads_is_refused(build):
    with pytest.raises(ValueError, match="tp=3 does not divide linear_num_key_heads=4"):
        build(tiny_config())


def test_load_with_tp_that_does_not_divide_the_heads_is_refused(hf_next):
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        load_layers(hf_next[0], tp_rank=0, tp_size=3)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.complex64])
def test_a_dtype_the_backend_does_not_compute_in_is_refused(dtype):
    with pytest.raises(ValueError, match=f"dtype {dtype} is not one the 'torch' backend computes in"):
        GDNLayer(tiny_config(), 0, dtype=dtype)


def test_load_refuses_an_integer_dtype_before_reading_any_tensor(hf_next):
    """It once cast the float weights to int8 and returned the layers."""
    stats = LoadStats()
    with pytest.raises(ValueError, match="dtype torch.int8 is not one the 'torch' backend computes in"):
        load_layers(hf_next[0], dtype=torch.int8, tp_rank=0, tp_size=1, stats=stats)
    assert stats.bytes_read == 0 and stats.files_opened == []


def edit_tensor(ckpt, name, fn):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    fname = index["weight_map"][name]
    tensors = load_file(ckpt / fname)
    new = fn(tensors.pop(name))
    if new is not None:
        tensors[name] = new
    else:
        del index["weight_map"][name]
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(tensors, ckpt / fname, metadata={"format": "pt"})


def test_checkpoint_missing_a_tensor_is_named(hf_next, tmp_path):
    ckpt = copy_checkpoint(hf_next[0], tmp_path / "ckpt")
    edit_tensor(ckpt, "model.layers.1.linear_attn.dt_bias", lambda t: None)
    with pytest.raises(CheckpointError, match="model.layers.1.linear_attn.dt_bias is missing"):
        load_layers(ckpt, tp_rank=0, tp_size=1)


def test_checkpoint_with_misshapen_tensor_is_named(hf_next, tmp_path):
    ckpt = copy_checkpoint(hf_next[0], tmp_path / "ckpt")
    edit_tensor(ckpt, "model.layers.2.linear_attn.out_proj.weight", lambda t: t[:, :-1].contiguous())
    with pytest.raises(CheckpointError, match=r"out_proj.weight has shape \[32, 127\].*implies \[32, 128\]"):
        load_layers(ckpt, tp_rank=0, tp_size=1)


def test_graphed_decoder_refuses_cpu_layers():
    from helpers import random_full_weights, tiny_config
    from tp_gdn import GDNLayer, StateCache
    from tp_gdn.graphs import GraphedDecoder

    cfg = tiny_config(layers=2)
    layer = GDNLayer.from_full(cfg, 0, random_full_weights(cfg))
    with pytest.raises(ValueError, match="CUDA graphs need CUDA layers"):
        GraphedDecoder({0: layer}, StateCache(cfg, [0], 4, tp_size=1))
    with pytest.raises(ValueError, match="at least one layer"):
        GraphedDecoder({}, StateCache(cfg, [0], 4, tp_size=1))


def test_a_call_records_no_autograd_and_restores_the_grad_mode(filled):
    """forward runs as under torch.no_grad (its own grad-mode switch, cheaper on the host than the
    decorator), also when x requires grad, and gives the grad mode back as it found it, after an
    error too."""
    layer, cache = filled
    x = torch.randn(5, 32, requires_grad=True)
    y = layer(x, Batch([5], [3], [False]), cache)
    assert not y.requires_grad and y.grad_fn is None and torch.is_grad_enabled()
    with torch.no_grad():
        y2 = layer(x.detach(), Batch([5], [3], [False]), cache)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and torch.equal(y, y2)
    with pytest.raises(ValueError, match="slot 4 is out of range"):
        layer(x, Batch([5], [4], [True]), cache)
    assert torch.is_grad_enabled()


def test_in_proj_is_the_first_product_of_a_call_and_a_refused_cache_changes_nothing(filled, monkeypatch):
    """in_proj's product is queued before x's and the cache's checks (a single call's idle GPU
    waits for it), so a call that those checks refuse has run in_proj alone, and no state has
    changed; where the product itself fails on x, the error is x's check's, not the product's."""
    layer, cache = filled
    seen = []
    real = layer.in_proj.forward
    monkeypatch.setattr(layer.in_proj, "forward", lambda x: seen.append("in_proj") or real(x))
    snap = snapshot(cache)
    with pytest.raises(TypeError, match="cache must be a tp_gdn.StateCache"):
        layer(torch.randn(5, 32), Batch([5], [0], [True]), "not a cache")
    with pytest.raises(ValueError, match="slot 4 is out of range"):
        layer(torch.randn(5, 32), Batch([5], [4], [True]), cache)
    assert seen == ["in_proj", "in_proj"]
    assert_unchanged(cache, snap)
    with pytest.raises(ValueError, match="x has width 31") as caught:    # the product failed on x
        layer(torch.randn(5, 31), Batch([5], [0], [True]), cache)
    assert caught.value.__context__ is None       # x's error alone, not chained to the product's
    with pytest.raises(ValueError, match="x has 6 rows"):                 # the product ran; x's check refused
        layer(torch.randn(6, 32), Batch([5], [0], [True]), cache)
    with pytest.raises(TypeError, match="batch must be a tp_gdn.Batch"):  # no meta: refused before the product
        layer(torch.randn(5, 32), [5], cache)
    assert seen == ["in_proj"] * 4
    assert_unchanged(cache, snap)
