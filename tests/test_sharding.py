"""The sharding table: the loader's per-rank pieces equal the layer's shard of the full layer."""

import pytest
import torch

from helpers import tiny_config
from tp_gdn.layer import GDNLayer
from tp_gdn.loader.rules import pack, tensor_rules
from tp_gdn.parallel import Replicate, Split, gather_full


def test_split_takes_block_p_of_every_segment():
    rule = Split(0, (4, 4, 8))
    full = torch.arange(16)
    assert rule.ranges(1, 2) == [(2, 4), (6, 8), (12, 16)]
    assert rule.take(full, 1, 2).tolist() == [2, 3, 6, 7, 12, 13, 14, 15]
    assert rule.local_shape((16,), 4) == (4,)
    with pytest.raises(ValueError, match="do not split into 3"):
        rule.ranges(0, 3)


def test_join_is_the_inverse_of_take():
    rule = Split(1, (6, 2, 4))
    full = torch.randn(3, 12)
    for world in (1, 2):
        assert torch.equal(rule.join([rule.take(full, r, world) for r in range(world)]), full)
    assert torch.equal(Replicate().join([full, full]), full)


@pytest.mark.parametrize("tp", [2, 4])
def test_gather_full_rebuilds_the_unsharded_layer(tp):
    cfg = tiny_config(nk=4, nv=8, dk=6, dv=5)
    full = {n: p.detach().clone().normal_() for n, p in GDNLayer(cfg, 0).named_parameters()}
    got = gather_full([GDNLayer.from_full(cfg, 0, full, r, tp) for r in range(tp)])
    assert got.keys() == full.keys()
    for name in full:
        assert torch.equal(got[name], full[name]), name


def random_checkpoint_tensors(cfg):
    return {name: torch.randn(shape) for name, (shape, _) in tensor_rules(cfg).items()}


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_text"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_loader_pieces_pack_into_the_layers_own_shard(model_type, tp):
    cfg = tiny_config(model_type, nk=4, nv=8, dk=6, dv=5)
    ckpt = random_checkpoint_tensors(cfg)
    full_layer = pack(cfg, 1, ckpt)
    rules = tensor_rules(cfg)
    for rank in range(tp):
        pieces = {n: rule.take(ckpt[n], rank, tp) for n, (_, rule) in rules.items()}
        local = pack(cfg, tp, pieces)
        layer = GDNLayer.from_full(cfg, 0, full_layer, rank, tp)
        for name, p in layer.named_parameters():
            assert torch.equal(p, local[name]), (name, rank)


def test_grouped_layout_packs_q_k_v_z_b_a_per_key_head():
    """Row g*(2dk+2r dv)+j of in_proj_qkvz belongs to key head g; check one row of each part."""
    cfg = tiny_config("qwen3_next", nk=2, nv=4, dk=3, dv=2)   # r = 2
    ckpt = random_checkpoint_tensors(cfg)
    full = pack(cfg, 1, ckpt)["in_proj.weight"]
    qkvz, ba = ckpt["in_proj_qkvz.weight"], ckpt["in_proj_ba.weight"]
    group = 2 * 3 + 2 * 2 * 2
    kd, vd, nv = 6, 8, 4
    assert torch.equal(full[3 + 1], qkvz[group + 1])                    # q of key head 1, dim 1
    assert torch.equal(full[kd + 3 + 2], qkvz[group + 3 + 2])           # k of key head 1, dim 2
    assert torch.equal(full[2 * kd + 2 * 2 + 1], qkvz[group + 6 + 1])   # v of value head 2 (key head 1)
    assert torch.equal(full[2 * kd + vd + 3 * 2], qkvz[group + 6 + 4 + 2])  # z of value head 3, dim 0
    assert torch.equal(full[2 * kd + 2 * vd + 3], ba[4 + 1])            # b of value head 3
    assert torch.equal(full[2 * kd + 2 * vd + nv + 2], ba[4 + 2])       # a of value head 2


def test_norm_weight_is_replicated_and_out_proj_split_by_columns():
    rules = tensor_rules(tiny_config())
    assert isinstance(rules["norm.weight"][1], Replicate)
    assert rules["out_proj.weight"][1] == Split(1, (128,))
