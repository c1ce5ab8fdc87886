"""StateCache: per-slot conv and recurrent states of this rank's heads, for a set of layers."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import GDNConfig
from .parallel import get_world_size


class StateCache:
    """Slot pools, one pair per layer.

    conv[layer]:  [num_slots, K-1, conv_dim/tp] in `dtype` (the activation dtype): the last K-1
                  projected q|k|v inputs of the sequence in each slot, oldest first.
    ssm[layer]:   [num_slots, nv/tp, dk, dv] in `state_dtype` (fp32 unless asked otherwise): the
                  recurrent state S of each local value head.

    Each pool is a view of a buffer one slot longer: slot `padding_slot` (= num_slots), past the
    view's end, is where the padding rows of a CUDA graph's batch-size bucket (graphs.
    GraphedDecoder) read and write their throwaway state, so that the kernels need no check for
    them. No batch can name it (the layer refuses slots >= num_slots).
    """

    def __init__(self, cfg: GDNConfig, layer_ids: Iterable[int], num_slots: int,
                 dtype: torch.dtype = torch.float32, device="cpu",
                 state_dtype: torch.dtype = torch.float32, tp_size: int | None = None):
        tp = get_world_size() if tp_size is None else tp_size
        cfg.check_tp(tp)
        layer_ids = list(layer_ids)
        cfg.check_layer_ids(layer_ids)
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an integer >= 1, got {num_slots!r}")
        self.cfg, self.tp_size, self.num_slots = cfg, tp, num_slots
        self.dtype, self.state_dtype, self.device = dtype, state_dtype, torch.device(device)
        n = num_slots + 1       # the padding slot
        self.conv = {
            i: torch.zeros(n, cfg.conv_kernel - 1, cfg.conv_dim // tp, dtype=dtype, device=device)[:num_slots]
            for i in layer_ids
        }
        self.ssm = {
            i: torch.zeros(n, cfg.num_v_heads // tp, cfg.head_k_dim, cfg.head_v_dim,
                           dtype=state_dtype, device=device)[:num_slots]
            for i in layer_ids
        }

    @property
    def layer_ids(self) -> list[int]:
        return list(self.conv)

    @property
    def padding_slot(self) -> int:
        """The slot past the pools' views (num_slots) that graph padding rows use (class docstring)."""
        return self.num_slots

    def nbytes(self) -> int:
        """Bytes the pools hold, the padding slot's included."""
        return sum(t.untyped_storage().nbytes() for d in (self.conv, self.ssm) for t in d.values())

    def __repr__(self) -> str:
        return (f"StateCache(layers={self.layer_ids}, num_slots={self.num_slots}, tp={self.tp_size}, "
                f"{self.nbytes() / 2**20:.1f} MiB on {self.device})")
