"""The early-exit cache: one K/V slot per decoder layer plus one per exit module that attends.

Slots can hold different numbers of positions (deep layers lag behind under `catchup`, skip
positions under `skip`), so besides the K/V this cache remembers, per slot, which absolute
positions it holds, and, under `catchup`, the hidden state of every position that some layer
still lacks. Everything indexed by row (K/V, pending states, strategy state) follows beam
reordering in `reorder_cache`, which `generate` calls.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class EarlyExitCache(Cache):
    def __init__(self, num_slots: int):
        super().__init__(layers=[DynamicLayer() for _ in range(num_slots)])
        # held[slot]: absolute positions the slot holds, or None while they are exactly 0..len-1
        self.held: list[torch.Tensor | None] = [None] * num_slots
        # pending hidden states (rows, P, width) for positions [total - P, total): under
        # `catchup`, position p is stored at the depth of the deepest layer that holds it
        self.pending: torch.Tensor | None = None
        self.total_length = 0  # positions seen by the first layer (the sequence so far)
        self.strategy_state: dict[str, torch.Tensor] = {}  # per-row strategy state (PABEE, MuE)
        self.position_ids: torch.Tensor | None = None  # (rows, total) absolute positions so far
        self.steps: list[dict] = []  # one record per forward (see engine.StepRecord)

    # -- per-slot bookkeeping ----------------------------------------------------------------
    def slot_length(self, slot: int) -> int:
        return self.layers[slot].get_seq_length()

    def held_positions(self, slot: int) -> torch.Tensor | None:
        """Absolute positions held by `slot`, or None when they are the prefix 0..len-1."""
        return self.held[slot]

    def note_appended(self, slot: int, start: int, end: int, before: int) -> None:
        """Record that positions [start, end) were appended to `slot`, which held `before`
        positions; `held` stays None (no tensor work) while the slot is a contiguous prefix."""
        current = self.held[slot]
        if current is None and start == before:
            return
        if current is None:
            current = torch.arange(before)
        self.held[slot] = torch.cat([current, torch.arange(start, end)])

    def remember_positions(self, new_positions: torch.Tensor) -> torch.Tensor:
        """Append the newest positions' ids; return the ids of the whole sequence."""
        old = self.position_ids
        self.position_ids = new_positions if old is None else torch.cat([old, new_positions], dim=1)
        return self.position_ids

    # -- beam search -------------------------------------------------------------------------
    def _map_rows(self, fn) -> None:
        for name in ("pending", "position_ids"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        for key, value in self.strategy_state.items():
            self.strategy_state[key] = fn(value)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the early-exit cache cannot be cropped (assisted decoding is not supported)")
