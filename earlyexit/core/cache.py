"""The early-exit cache: one K/V slot per decoder layer plus one per exit module that attends.

Every slot is a preallocated buffer (rows, heads, capacity + 1, head_dim) indexed by absolute
position, so rows can hold different positions per slot: under `catchup` a row's deep layers
lag behind by the positions it left early with, under `skip` they never get them. The last
column is scratch: the padded entries of a ragged block are written there and never read.

Per row the cache remembers
- `held[r, j]`: how many positions layer j holds (under `catchup` always a prefix, because a
  row that goes deep first catches up every position it skipped);
- `pending[r, p]`: under `catchup`, the hidden state of position p at the depth where it left;
- `reached[r, p]`: under `skip`, the depth position p went to (deeper slots lack it);
- `positions[r, p]`: the position id the family's embedding/rotary uses;
- `encoder`: for encoder–decoder families, what the backend keeps of the encoder per row (its
  output, its padding, each slot's cross-attention K/V: static for the whole generation), every
  tensor rows first; `encoder_meta` holds what is not per row.

The engine sets `plan` (which rows, which columns) before it runs a layer; a slot's `update`
writes there and returns the K/V the block attends over. Everything indexed by row follows beam
reordering, and `crop` takes positions back (self-speculative decoding).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclasses.dataclass
class WritePlan:
    """Where a layer call writes: `rows` (None = every row, in order), and either a contiguous
    `start` column shared by all rows or a (rows, block) tensor `columns` (scratch for padding);
    the call attends over columns [0, `length`)."""

    rows: torch.Tensor | None
    start: int | None
    columns: torch.Tensor | None
    length: int


class SlotLayer(CacheLayerMixin):
    """One slot's K/V: a view into the cache's single (slots, rows, heads, capacity + 1, dim)
    buffer, so work on many slots at once (state propagation, beam reordering) is one op."""

    is_croppable = True

    def __init__(self, cache: EarlyExitCache, index: int):
        # no super().__init__(): keys, values and is_initialized derive from the shared buffer.
        # A weak reference back: the cache owns its slots, and without a cycle its buffers are
        # freed as soon as the last reference to the cache goes, not at the next gc pass
        self._cache, self.index = weakref.ref(cache), index

    @property
    def cache(self) -> EarlyExitCache:
        return self._cache()

    def __deepcopy__(self, memo):  # a copied cache's slots view the copy's buffers
        cache = self._cache()
        return SlotLayer(memo.get(id(cache), cache), self.index)

    def __reduce__(self):  # pickled with its cache (pickle's memo resolves the loop)
        return SlotLayer, (self._cache(), self.index)

    @property
    def is_initialized(self) -> bool:
        return self.cache.keys is not None

    @property
    def keys(self):
        return self.cache.keys[self.index] if self.cache.keys is not None else None

    @property
    def values(self):
        return self.cache.values[self.index] if self.cache.values is not None else None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.cache.allocate(key_states, value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.cache.plan
        keys, values = self.keys, self.values
        if plan.columns is None:
            end = plan.start + key_states.shape[2]
            if plan.rows is None:
                keys[:, :, plan.start:end] = key_states
                values[:, :, plan.start:end] = value_states
                return keys[:, :, :plan.length], values[:, :, :plan.length]
            keys[plan.rows, :, plan.start:end] = key_states
            values[plan.rows, :, plan.start:end] = value_states
        else:  # ragged: (rows, block) columns, padding sent to the scratch column
            rows = plan.rows if plan.rows is not None else torch.arange(keys.shape[0], device=keys.device)
            keys[rows[:, None], :, plan.columns] = key_states.transpose(1, 2)
            values[rows[:, None], :, plan.columns] = value_states.transpose(1, 2)
            if plan.rows is None:
                return keys[:, :, :plan.length], values[:, :, :plan.length]
        return keys[plan.rows, :, :plan.length], values[plan.rows, :, :plan.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.total_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.total_length

    def get_max_length(self) -> int:
        return -1


class EarlyExitCache(Cache):
    def __init__(self, num_slots: int, num_layers: int | None = None):
        self.rows = 0
        self.capacity = 0
        self.keys: torch.Tensor | None = None  # (slots, rows, heads, capacity + 1, head_dim)
        self.values: torch.Tensor | None = None
        super().__init__(layers=[SlotLayer(self, slot) for slot in range(num_slots)])
        self.num_layers = num_layers if num_layers is not None else num_slots
        self.plan: WritePlan | None = None
        self.total_length = 0  # positions fed so far (every row's layer 0 holds them)
        self.held: torch.Tensor | None = None  # (rows, layers) long, under catchup
        self.pending: torch.Tensor | None = None  # (rows, capacity + 1, width), under catchup
        self.reached: torch.Tensor | None = None  # (rows, capacity + 1) long, under skip
        self.positions: torch.Tensor | None = None  # (rows, capacity + 1) position ids
        self.strategy_state: dict[str, torch.Tensor] = {}  # per-row strategy state (follows beams)
        self.encoder: dict[str, torch.Tensor] = {}  # encoder–decoder: per-row encoder side (follows beams)
        self.encoder_meta: dict = {}
        self.steps: list = []  # one StepRecord per forward (see accounting.StepRecord)
        self.no_padding: bool | None = None  # no padding in the prompt's mask (read once, at the prompt pass)
        self.held_host: list[int] | None = None  # `held` of a lone row, followed on the host (None: not followed)

    # -- sizes -------------------------------------------------------------------------------
    def allocate(self, key_states, value_states) -> None:
        _, heads, _, dim = key_states.shape
        shape = (len(self.layers), self.rows, heads, self.capacity + 1, dim)
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape[:4] + value_states.shape[3:])

    @property
    def scratch(self) -> int:
        return self.capacity

    def reserve(self, rows: int, length: int, device, width: int, dtype) -> None:
        """Make room for `length` positions of `rows` rows (doubling, so growth is rare)."""
        if self.positions is None:
            self.rows, self.capacity = rows, max(length, 16)
            self.positions = torch.zeros(rows, self.capacity + 1, dtype=torch.long, device=device)
            self.held = torch.zeros(rows, self.num_layers, dtype=torch.long, device=device)
            self.pending = torch.zeros(rows, self.capacity + 1, width, dtype=dtype, device=device)
            self.reached = torch.zeros(rows, self.capacity + 1, dtype=torch.long, device=device)
            return
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        extra = capacity - self.capacity

        def widen(t):
            scratch = t[:, -1:]
            return torch.cat([t[:, :-1], t.new_zeros((t.shape[0], extra) + t.shape[2:]), scratch], 1)

        for name in ("positions", "pending", "reached"):
            setattr(self, name, widen(getattr(self, name)))
        self.capacity = capacity
        if self.keys is not None:  # (slots, rows, heads, columns, dim): widen the columns, scratch last
            self.keys = widen(self.keys.movedim(3, 1)).movedim(1, 3).contiguous()
            self.values = widen(self.values.movedim(3, 1)).movedim(1, 3).contiguous()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.total_length

    def follow_held(self, depth: int | None, total: int, prefill: bool) -> None:
        """Mirror on the host what a forward wrote to `held` for a lone row that went `depth`
        layers deep (the engine then needs no read of it); None stops following (several rows)."""
        if depth is None or (self.held_host is None and not prefill):
            self.held_host = None
            return
        base = [0] * self.num_layers if prefill else self.held_host
        self.held_host = [total if j < depth else held for j, held in enumerate(base)]

    # -- beam search and speculative decoding --------------------------------------------------
    def _map_rows(self, fn) -> None:
        """Apply `fn(tensor, dim)` (a selection along dimension `dim`, the rows) to everything
        indexed by row: one new buffer each, K/V included (their rows are dimension 1)."""
        for name in ("held", "pending", "reached", "positions"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value, 0))
        if self.keys is not None:
            self.keys, self.values = fn(self.keys, 1), fn(self.values, 1)
        for key, value in self.strategy_state.items():
            self.strategy_state[key] = fn(value, 0)
        for key, value in self.encoder.items():
            self.encoder[key] = fn(value, 0)
        if self.positions is not None:
            self.rows = self.positions.shape[0]
        self.held_host = None  # rows moved on the device: read `held` again

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t, dim: t.index_select(dim, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t, dim: t.repeat_interleave(repeats, dim=dim))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t, dim: t[(slice(None),) * dim + (indices,)])

    @property
    def is_croppable(self) -> bool:
        return True

    def crop(self, max_length: int) -> None:
        """Forget positions from `max_length` on (negative: that many from the end)."""
        if max_length < 0:
            max_length = self.total_length + max_length
        self.total_length = min(self.total_length, max_length)
        if self.held is not None:
            self.held.clamp_(max=self.total_length)
        if self.held_host is not None:
            self.held_host = [min(held, self.total_length) for held in self.held_host]
