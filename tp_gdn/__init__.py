"""tp_gdn: a tensor-parallel runtime for the Gated DeltaNet layers of Qwen3-Next and Qwen3.5."""

from .batch import Batch
from .cache import StateCache
from .config import GDNConfig
from .layer import GDNLayer
from .loader import CheckpointError, LoadStats, load_layers

__all__ = ["GDNConfig", "Batch", "StateCache", "GDNLayer", "load_layers", "LoadStats", "CheckpointError"]
__version__ = "0.1.0"
