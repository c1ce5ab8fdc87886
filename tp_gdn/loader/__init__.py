"""Reading GDN weights from HF safetensors checkpoints and pre-sharded directories."""

from .files import CheckpointError, LoadStats
from .load import load_layers
from .presharded import write_presharded
from .rules import pack, tensor_rules

__all__ = ["load_layers", "LoadStats", "CheckpointError", "write_presharded", "tensor_rules", "pack"]
