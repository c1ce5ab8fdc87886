"""GDNConfig: the Gated DeltaNet dimensions of a Qwen3-Next or Qwen3.5 checkpoint.

Reads HF `config.json` (fields at top level or under `text_config`) and knows which layers are
linear attention, which checkpoint layout the weights use, and the tensor-name prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# model_type -> (checkpoint layout, tensor-name prefix of the decoder layers)
#   "grouped": in_proj_qkvz / in_proj_ba, rows grouped per key head (Qwen3-Next)
#   "split":   in_proj_qkv / in_proj_z / in_proj_b / in_proj_a (Qwen3.5)
MODEL_TYPES = {
    "qwen3_next": ("grouped", "model.layers."),
    "qwen3_5_text": ("split", "model.layers."),
    "qwen3_5_moe_text": ("split", "model.layers."),
    "qwen3_5": ("split", "model.language_model.layers."),
    "qwen3_5_moe": ("split", "model.language_model.layers."),
}


@dataclass(frozen=True)
class GDNConfig:
    model_type: str
    hidden_size: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    rms_norm_eps: float
    layer_types: tuple[str, ...]
    layout: str = field(default="")
    prefix: str = field(default="")
    hidden_act: str = "silu"
    torch_dtype: str | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"unknown model_type {self.model_type!r}: tp_gdn reads {sorted(MODEL_TYPES)}"
            )
        layout, prefix = MODEL_TYPES[self.model_type]
        if not self.layout:
            object.__setattr__(self, "layout", layout)
        if not self.prefix:
            object.__setattr__(self, "prefix", prefix)
        if self.layout not in ("grouped", "split"):
            raise ValueError(f"layout must be 'grouped' or 'split', got {self.layout!r}")
        for name in ("hidden_size", "num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.conv_kernel < 2:
            raise ValueError(f"linear_conv_kernel_dim must be >= 2, got {self.conv_kernel}")
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(
                f"linear_num_value_heads ({self.num_v_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.num_k_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"the GDN conv activation must be silu, config says {self.hidden_act!r}")
        if not self.linear_layer_ids:
            raise ValueError("the config has no linear_attention layer")

    # -- derived sizes --------------------------------------------------------------------------
    @property
    def ratio(self) -> int:
        """Value heads per key head (GVA ratio r); value head j reads key head j // r."""
        return self.num_v_heads // self.num_k_heads

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def linear_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    def check_layer_ids(self, layer_ids, source=None) -> None:
        """Refuse layer indices that are not linear-attention layers, or that repeat one;
        `source` (a checkpoint) is named in the message."""
        layer_ids = list(layer_ids)
        bad = [i for i in layer_ids if i not in self.linear_layer_ids]
        if bad:
            of = f" of {source}" if source is not None else ""
            raise ValueError(f"layers {bad} are not linear-attention layers{of} (those are {self.linear_layer_ids})")
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"layers {layer_ids}: a layer is listed twice")

    def check_tp(self, tp_size: int) -> None:
        """Refuse a tensor-parallel size below 1 or one that does not split the heads evenly."""
        if tp_size < 1:
            raise ValueError(f"tp must be >= 1, got {tp_size}")
        if self.num_k_heads % tp_size:
            raise ValueError(
                f"tp={tp_size} does not divide linear_num_key_heads={self.num_k_heads} "
                f"(and linear_num_value_heads={self.num_v_heads}); use a tp that divides "
                f"{self.num_k_heads}"
            )

    def tensor_prefix(self, layer_id: int) -> str:
        return f"{self.prefix}{layer_id}.linear_attn."

    # -- reading HF configs ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "GDNConfig":
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"unknown model_type {model_type!r}: tp_gdn reads {sorted(MODEL_TYPES)}"
            )
        text = raw.get("text_config") or raw
        required = [
            "hidden_size", "linear_num_key_heads", "linear_num_value_heads",
            "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
            "num_hidden_layers",
        ]
        missing = [k for k in required if k not in text]
        if missing:
            raise ValueError(f"config ({model_type}) lacks {', '.join(missing)}")
        n_layers = int(text["num_hidden_layers"])
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = int(text.get("full_attention_interval", 4))
            layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(n_layers)
            ]
        if len(layer_types) != n_layers:
            raise ValueError(
                f"config has {len(layer_types)} layer_types for num_hidden_layers={n_layers}"
            )
        return cls(
            model_type=model_type,
            hidden_size=int(text["hidden_size"]),
            num_k_heads=int(text["linear_num_key_heads"]),
            num_v_heads=int(text["linear_num_value_heads"]),
            head_k_dim=int(text["linear_key_head_dim"]),
            head_v_dim=int(text["linear_value_head_dim"]),
            conv_kernel=int(text["linear_conv_kernel_dim"]),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            layer_types=tuple(layer_types),
            hidden_act=text.get("hidden_act", "silu"),
            torch_dtype=text.get("dtype") or text.get("torch_dtype") or raw.get("dtype")
            or raw.get("torch_dtype"),
        )

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path) -> "GDNConfig":
        path = Path(ckpt_dir) / "config.json"
        if not Path(ckpt_dir).is_dir():
            raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint directory")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
