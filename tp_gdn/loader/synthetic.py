"""Generated HF-layout GDN checkpoints with random weights: the main job's embedded default.

`write_checkpoint` writes config.json, model.safetensors.index.json and several safetensors
files holding every linear-attention layer's GDN tensors (nothing else: these are GDN-only
checkpoints), in the grouped (Qwen3-Next) or split (Qwen3.5) layout, at any dims. Presets:
  tiny             H 32, nk 4, nv 8, dk = dv 16, 4 layers (3 GDN): seconds on a CPU
  qwen3-next-80b   Qwen3-Next-80B-A3B GDN dims: H 2048, nk 16, nv 32, dk = dv 128, K 4
  qwen3.5          a Qwen3.5-style split layout at H 2048, nk 16, nv 64, dk = dv 128
Weights are scaled like a trained model's (unit-variance activations through the projections)
and A_log, dt_bias and the norm weight are non-default, so every parameter matters.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import GDNConfig
from .files import INDEX, check_new_output
from .rules import tensor_rules

PRESETS = {
    "tiny": dict(model_type="qwen3_next", hidden_size=32, linear_num_key_heads=4, linear_num_value_heads=8,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, num_hidden_layers=4),
    "qwen3-next-80b": dict(model_type="qwen3_next", hidden_size=2048, linear_num_key_heads=16,
                           linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                           linear_conv_kernel_dim=4, num_hidden_layers=48),
    "qwen3.5": dict(model_type="qwen3_5_text", hidden_size=2048, linear_num_key_heads=16,
                    linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128,
                    linear_conv_kernel_dim=4, num_hidden_layers=48),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preset_config(preset: str, gdn_layers: int | None = None, **overrides) -> dict:
    """An HF-style config dict for a preset; `gdn_layers` keeps that many linear-attention layers
    (with every 4th layer full attention, as in the real models)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {sorted(PRESETS)}")
    raw = dict(PRESETS[preset], **overrides)
    if gdn_layers is not None:
        if gdn_layers < 1:
            raise ValueError(f"gdn_layers must be >= 1, got {gdn_layers}")
        raw["num_hidden_layers"] = gdn_layers + gdn_layers // 3
    n = raw["num_hidden_layers"]
    raw["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    raw.update(hidden_act="silu", rms_norm_eps=1e-6, full_attention_interval=4,
               architectures=["Qwen3NextForCausalLM" if raw["model_type"] == "qwen3_next" else "Qwen3_5ForCausalLM"])
    return raw


def gate_parameters(nv: int, gen: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
    """(A_log, dt_bias) [nv] as trained checkpoints hold them: A in [1, 16] (HF's init range) and
    dt_bias = softplus^-1(dt), dt log-spaced over [1e-3, 1e-1] across the heads in random order
    (Mamba's init range). With unit-scale gate inputs a, the weakest head then keeps about half
    of its state over a 64-token chunk and the strongest forgets it within one chunk, so states
    passed between chunks matter. (dt_bias = 0.5 N(0, 1) made every head forget its state within a few
    tokens, which hid how states pass from chunk to chunk.)"""
    A_log = torch.log(torch.rand(nv, generator=gen, dtype=dtype) * 15 + 1)
    dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), nv, dtype=dtype))
    dt = dt[torch.randperm(nv, generator=gen)]
    return A_log, dt + torch.log(-torch.expm1(-dt))


def random_tensors(cfg: GDNConfig, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's checkpoint tensors (names relative to `linear_attn.`)."""
    out = {}
    gates = dict(zip(("A_log", "dt_bias"), gate_parameters(cfg.num_v_heads, gen)))
    for name, (shape, _) in tensor_rules(cfg).items():
        if name in gates:
            t = gates[name]
        elif name == "norm.weight":
            t = 1 + 0.3 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1] if name != "conv1d.weight" else shape[2]
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[name] = t.to(dtype) if t.dim() > 1 else t.float()
    return out


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", gdn_layers: int | None = None,
                     dtype: str = "bfloat16", seed: int = 0, max_file_bytes: int = 1 << 30,
                     progress=None, **overrides) -> Path:
    """Write a GDN-only HF checkpoint to `out_dir` (new, or an empty directory) and return it.

    Layers go to files in order, a new file starting once one holds `max_file_bytes`, so the
    checkpoint spans several files (tiny: one file per layer). A_log, dt_bias and the norm
    weight are stored in float32 as real checkpoints keep them; the matrices in `dtype`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    raw = preset_config(preset, gdn_layers, dtype=dtype, **overrides)
    cfg = GDNConfig.from_dict(raw)
    out_dir = Path(out_dir)
    check_new_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if preset == "tiny":
        max_file_bytes = 1          # one file per layer, so even the tiny one spans several files
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}

    def flush():
        fname = f"gdn-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(current, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in current})
        current.clear()

    size = 0
    layer_ids = cfg.linear_layer_ids
    for n, i in enumerate(layer_ids):
        tensors = {cfg.tensor_prefix(i) + k: v for k, v in random_tensors(cfg, gen, DTYPES[dtype]).items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if current and size + nbytes > max_file_bytes:
            flush()
            size = 0
        current.update(tensors)
        size += nbytes
        if progress:
            progress(n + 1, len(layer_ids))
    flush()
    index = {"metadata": {"total_size": sum(os.path.getsize(out_dir / f) for f in set(weight_map.values()))},
             "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    (out_dir / "config.json").write_text(json.dumps(raw, indent=1) + "\n")
    return out_dir
