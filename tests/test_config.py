"""GDNConfig.from_pretrained on the config.json shapes of Qwen3-Next and Qwen3.5."""

import json

import pytest

from tp_gdn import GDNConfig

TEXT = dict(hidden_size=2048, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
            linear_value_head_dim=128, linear_conv_kernel_dim=4, num_hidden_layers=48, rms_norm_eps=1e-6,
            hidden_act="silu")


def write(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_qwen3_next_uses_grouped_layout_and_interval(tmp_path):
    cfg = GDNConfig.from_pretrained(write(tmp_path, dict(model_type="qwen3_next", full_attention_interval=4, **TEXT)))
    assert (cfg.layout, cfg.prefix) == ("grouped", "model.layers.")
    assert len(cfg.linear_layer_ids) == 36 and 3 not in cfg.linear_layer_ids and 47 not in cfg.linear_layer_ids
    assert (cfg.key_dim, cfg.value_dim, cfg.conv_dim, cfg.ratio) == (2048, 4096, 8192, 2)
    assert cfg.tensor_prefix(0) == "model.layers.0.linear_attn."


@pytest.mark.parametrize("model_type,prefix", [
    ("qwen3_5", "model.language_model.layers."), ("qwen3_5_moe", "model.language_model.layers."),
])
def test_qwen3_5_multimodal_reads_text_config(tmp_path, model_type, prefix):
    types = ["linear_attention", "linear_attention", "full_attention"] * 16
    raw = dict(model_type=model_type, text_config=dict(TEXT, linear_num_value_heads=64, layer_types=types),
               vision_config={"depth": 2})
    cfg = GDNConfig.from_pretrained(write(tmp_path, raw))
    assert (cfg.layout, cfg.prefix, cfg.num_v_heads, cfg.ratio) == ("split", prefix, 64, 4)
    assert cfg.linear_layer_ids == [i for i, t in enumerate(types) if t == "linear_attention"]


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "qwen3_5_moe_text"])
def test_qwen3_5_text_reads_top_level_fields(tmp_path, model_type):
    cfg = GDNConfig.from_pretrained(write(tmp_path, dict(model_type=model_type, **TEXT)))
    assert (cfg.layout, cfg.prefix) == ("split", "model.layers.")


def test_unknown_model_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        GDNConfig.from_pretrained(write(tmp_path, dict(model_type="llama", **TEXT)))


def test_missing_field_is_named(tmp_path):
    raw = dict(model_type="qwen3_next", **TEXT)
    del raw["linear_num_key_heads"]
    with pytest.raises(ValueError, match="lacks linear_num_key_heads"):
        GDNConfig.from_pretrained(write(tmp_path, raw))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GDNConfig.from_pretrained(tmp_path)


def test_missing_checkpoint_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint directory"):
        GDNConfig.from_pretrained(tmp_path / "nowhere")


def test_tp_that_does_not_divide_key_heads_is_refused(tmp_path):
    cfg = GDNConfig.from_pretrained(write(tmp_path, dict(model_type="qwen3_next", **TEXT)))
    cfg.check_tp(8)
    with pytest.raises(ValueError, match="tp=3 does not divide linear_num_key_heads=16"):
        cfg.check_tp(3)
    for tp in (0, -2):      # (tp=0 was once refused as a tp that "does not divide" the heads)
        with pytest.raises(ValueError, match=f"tp must be >= 1, got {tp}$"):
            cfg.check_tp(tp)
