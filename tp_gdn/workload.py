"""Deterministic serving workloads: steps of packed prefills, continued prefills and decodes.

Each step is a Batch plus its input rows. Every batch entry carries a sequence id (a new id when
a slot starts afresh), so the full input history of each sequence can be rebuilt and handed to a
whole-sequence oracle (an unsharded layer, or HF transformers): its output on the history, cut at
the right offsets, is what every step must return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .batch import Batch


@dataclass
class Step:
    batch: Batch
    x: torch.Tensor          # [batch.num_tokens, H]
    seq_ids: list[int]       # sequence identity of each batch entry


class WorkloadBuilder:
    """Builds steps while tracking which sequence lives in which slot."""

    def __init__(self, hidden_size: int, seed: int = 0, dtype=torch.float32, scale: float = 1.0):
        self.H, self.dtype, self.scale = hidden_size, dtype, scale
        self.gen = torch.Generator().manual_seed(seed)
        self.steps: list[Step] = []
        self._slot_seq: dict[int, int] = {}
        self._next_id = 0

    def step(self, entries: list[tuple[int, int, bool]]) -> Step:
        """entries: (slot, length, continue_from_slot) per sequence of the batch."""
        seq_ids = []
        for slot, _, cont in entries:
            if cont:
                if slot not in self._slot_seq:
                    raise ValueError(f"slot {slot} continues, but no sequence lives there yet")
            else:
                self._slot_seq[slot] = self._next_id
                self._next_id += 1
            seq_ids.append(self._slot_seq[slot])
        batch = Batch([n for _, n, _ in entries], [s for s, _, _ in entries], [c for _, _, c in entries])
        x = torch.randn(batch.num_tokens, self.H, generator=self.gen) * self.scale
        step = Step(batch, x.to(self.dtype), seq_ids)
        self.steps.append(step)
        return step


def histories(steps: list[Step]) -> dict[int, torch.Tensor]:
    """The full input history [L, H] of every sequence id, in order."""
    parts: dict[int, list[torch.Tensor]] = {}
    for st in steps:
        for sid, a, n in zip(st.seq_ids, st.batch.cu_seqlens, st.batch.seq_lens):
            parts.setdefault(sid, []).append(st.x[a: a + n])
    return {sid: torch.cat(p) for sid, p in parts.items()}


def expected_outputs(steps: list[Step], oracle: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """What each step must return, from `oracle(history [L, H]) -> [L, H]` run once per sequence."""
    full = {sid: oracle(h) for sid, h in histories(steps).items()}
    seen: dict[int, int] = {}
    out = []
    for st in steps:
        rows = []
        for sid, n in zip(st.seq_ids, st.batch.seq_lens):
            off = seen.get(sid, 0)
            rows.append(full[sid][off: off + n])
            seen[sid] = off + n
        out.append(torch.cat(rows))
    return out


def mixed_workload(hidden_size: int, seed: int = 0, dtype=torch.float32) -> list[Step]:
    """A small workload that crosses chunk boundaries and mixes every kind of sequence.

    Uses slots 0..7: fresh prefills of lengths 1, 63, 64, 65, 130; three decode steps; then a
    batch mixing a continued prefill, decodes, a fresh prefill and a restarted slot; then decodes.
    """
    w = WorkloadBuilder(hidden_size, seed, dtype)
    w.step([(0, 1, False), (1, 63, False), (2, 64, False), (3, 65, False), (4, 130, False)])
    for _ in range(3):
        w.step([(s, 1, True) for s in range(5)])
    w.step([(1, 17, True), (0, 1, True), (5, 40, False), (2, 3, False), (4, 1, True), (3, 66, True)])
    w.step([(s, 1, True) for s in (5, 4, 3, 2, 1, 0)])
    w.step([(7, 2, False), (6, 129, False), (0, 70, True), (5, 1, True)])
    return w.steps


def serving_workload(hidden_size: int, num_seqs: int, prompt_len: int, decode_steps: int, seed: int = 0,
                     dtype=torch.float32) -> list[Step]:
    """`num_seqs` prompts of about `prompt_len` tokens (lengths spread +-50%) in one packed
    prefill, then `decode_steps` steps that decode every sequence once."""
    gen = torch.Generator().manual_seed(seed + 1)
    lens = [max(1, int(prompt_len * (0.5 + torch.rand((), generator=gen).item()))) for _ in range(num_seqs)]
    w = WorkloadBuilder(hidden_size, seed, dtype)
    w.step([(s, n, False) for s, n in enumerate(lens)])
    for _ in range(decode_steps):
        w.step([(s, 1, True) for s in range(num_seqs)])
    return w.steps


def run_steps(layers: dict, cache, steps: list[Step], device=None) -> dict[int, list[torch.Tensor]]:
    """Feed every step's input to every layer (each layer sees the same x); outputs per layer."""
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for st in steps:
        for i, layer in layers.items():
            x = st.x.to(device=layer.device if device is None else device, dtype=layer.dtype)
            out[i].append(layer(x, st.batch, cache))
    return out
