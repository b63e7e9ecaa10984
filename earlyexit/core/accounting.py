"""Speed-up accounting from the per-token trace. Three numbers, never mixed up:

- `param_speedup` (the paper's definition): backbone decoder parameters divided by the mean
  parameters a generated token used: the layers it ran plus every exit module that ran for it
  (an exit transformer counts as one layer). LM-head / classifier read-outs and catch-up work
  are not counted. The first token comes from the full-depth prompt pass and counts all layers.
- `layer_speedup`: the full model's cost divided by the cost actually spent, both in
  decoder-layer equivalents, counting everything: backbone layers on every position they
  processed (the prompt's and catch-up included), exit modules on every position they
  processed, every LM-head or exit read-out (vocab x width / params-per-layer each), gates, and
  K/V projections (exit slots, `propagate`). End to end over the language model (prompt pass
  plus decode) and, as `decode_layer_speedup`, the decode phase alone.
- `wall_speedup`: measured with a clock (`evaluate`, `benchmarks/speed.py`).

Costs come from module shapes (parameter counts), never from what a strategy says about
itself. A step's cost for a row depends only on how deep the row went, so the engine records
the step's shape (block widths, exit visits) and costs are computed here, off the hot path.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch


@dataclasses.dataclass
class ExitVisit:
    """One exit point the step passed, for the rows present there."""

    index: int  # exit index
    layer: int  # exit layer k (after k decoder layers)
    kv_positions: int = 0  # positions whose K/V were projected into the exit module's own slot
    # rows that leave here always pay the exit's module and read-out; of the rows that go on,
    # this share paid them too because the rule (or a gate's candidates) needed them
    module_rest: float = 0.0
    read_rest: float = 0.0
    gate: bool = False  # a gate scored every row present


@dataclasses.dataclass
class StepRecord:
    """What one forward did. `exit_layer` per row: the layer whose read-out it emitted (the
    model's depth for the final layer), -1 for a finished row (EOS or padding), which costs
    nothing and counts as no token."""

    exit_layer: torch.Tensor  # (rows,) long
    new_positions: int  # positions fed (the prompt's length for the prompt pass, else 1)
    widths: list[int]  # block width (positions) of every backbone layer run, in order
    exits: list[ExitVisit]
    kv_policy: str
    prefill: bool
    final_readouts: int = 1  # positions the final head read (self-speculative verification: several)

    @property
    def depth(self) -> int:
        """Backbone layers the deepest row ran."""
        return len(self.widths)

    @property
    def catchup_positions(self) -> int:
        return sum(w - self.new_positions for w in self.widths)


@dataclasses.dataclass
class CostModel:
    """Sizes needed to turn a trace into costs, all relative to one mean decoder layer."""

    layer_params: list[int]
    head_cost: float  # one LM-head read-out (final norm, projections, head), in layer equivalents
    kv_fill_cost: float  # one backbone layer's K/V projection, in layer equivalents
    exit_layers: list[int]
    exit_module_costs: list[float]  # per exit: its own module (0 when none), in layer equivalents
    exit_kv_costs: list[float] = dataclasses.field(default_factory=list)  # K/V projection of that module
    exit_readout_costs: list[float] = dataclasses.field(default_factory=list)  # read-out at that exit
    gate_costs: list[float] = dataclasses.field(default_factory=list)  # the gate at that exit

    def __post_init__(self):
        n = len(self.exit_layers)
        self.exit_kv_costs = self.exit_kv_costs or [0.0] * n
        self.exit_readout_costs = self.exit_readout_costs or [self.head_cost] * n
        self.gate_costs = self.gate_costs or [0.0] * n

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    @property
    def mean_layer_params(self) -> float:
        return sum(self.layer_params) / len(self.layer_params)

    @classmethod
    def for_model(cls, model) -> CostModel:
        backend, strategy, gate = model.backend, model.strategy, getattr(model, "gate", None)
        layer_params = backend.layer_param_counts()
        mean = sum(layer_params) / len(layer_params)
        exits = list(strategy.exit_layers) if strategy is not None else []
        modules, kv, readout, gates = [], [], [], []
        for e in range(len(exits)):
            attention = strategy.exit_attention_layer(e)
            transform = strategy.exit_transform(e)
            own = [m for m in (attention, transform) if m is not None]
            modules.append(sum(_params(m) for m in own) / mean)
            kv.append(backend.kv_projection_param_count(attention) / mean if attention is not None else 0.0)
            head = strategy.exit_readout(e)
            # a decoding run either drafts (its model then holds the draft vocabulary, if any) or
            # exits (over the exit vocabulary, if any): what the exits read is charged by its size
            vocabulary = model.readout_vocabulary(e, drafting=True)
            if vocabulary is not None:
                readout.append(backend.head_param_count(len(vocabulary)) / mean)
            else:
                readout.append((_params(head) if head is not None else backend.head_param_count()) / mean)
            gates.append(gate.param_count(e) / mean if gate is not None else 0.0)
        return cls(layer_params=layer_params, head_cost=backend.head_param_count() / mean,
                   kv_fill_cost=backend.kv_projection_param_count() / mean, exit_layers=exits,
                   exit_module_costs=modules, exit_kv_costs=kv, exit_readout_costs=readout, gate_costs=gates)

    # -- per step -----------------------------------------------------------------------------
    def breakdown(self, record: StepRecord, depth: int) -> dict[str, float]:
        """Layer equivalents one row spent in `record` when it went `depth` layers deep."""
        n = self.num_layers
        parts = {"layers": float(sum(record.widths[:depth])),
                 "catchup": float(sum(w - record.new_positions for w in record.widths[:depth])),
                 "exit_modules": 0.0, "heads": 0.0, "kv": 0.0, "gates": 0.0, "params": 0.0}
        parts["params"] = float(sum(self.layer_params[:depth])) / self.mean_layer_params
        for visit in record.exits:
            if visit.layer > depth:
                break
            e = visit.index
            parts["kv"] += visit.kv_positions * self.exit_kv_costs[e]
            parts["gates"] += self.gate_costs[e] if visit.gate else 0.0
            left = visit.layer == depth
            module = 1.0 if left else max(visit.module_rest, visit.read_rest)
            parts["exit_modules"] += module * self.exit_module_costs[e]
            parts["params"] += module * self.exit_module_costs[e]
            parts["heads"] += (1.0 if left else visit.read_rest) * self.exit_readout_costs[e]
        if depth == n:
            parts["heads"] += self.head_cost * record.final_readouts
        elif record.kv_policy == "propagate":
            parts["kv"] += record.new_positions * ((n - depth) * self.kv_fill_cost + sum(
                c for k, c in zip(self.exit_layers, self.exit_kv_costs) if k > depth))
        parts["total"] = parts["layers"] + parts["exit_modules"] + parts["heads"] + parts["kv"] + parts["gates"]
        return parts

    def full_cost(self, record: StepRecord) -> float:
        """What the full model spends on the same step for one row."""
        return record.new_positions * self.num_layers + self.head_cost

    def token_params(self, exit_layer: int) -> float:
        """The paper's parameter count (in parameters) of a token leaving after `exit_layer`
        layers whose exit module ran at every exit it passed."""
        modules = sum(cost for k, cost in zip(self.exit_layers, self.exit_module_costs) if k <= exit_layer)
        return sum(self.layer_params[:exit_layer]) + modules * self.mean_layer_params


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclasses.dataclass
class Trace:
    """Per returned sequence and generated token: the exit layer (-1 where there is no token:
    after end-of-sequence, or beam padding); token t came from step t."""

    exit_layers: torch.Tensor  # (sequences, tokens) long
    steps: list  # StepRecord per forward, in order
    num_layers: int
    vision_layers: torch.Tensor | None = None  # per image, when the vision tower stopped early (MuE)

    @classmethod
    def from_generation(cls, steps, new_tokens: torch.Tensor, beam_indices: torch.Tensor | None,
                        eos_token_id, num_layers: int) -> Trace:
        """Gathered on the device, copied to the host once (the steps' exit layers stay where
        they are: reading them step by step would make the device wait once per step)."""
        sequences, length = new_tokens.shape
        length = min(length, len(steps))
        if not length:
            return cls(exit_layers=torch.full((sequences, 0), -1, dtype=torch.long), steps=[], num_layers=num_layers)
        layers = torch.stack([step.exit_layer for step in steps[:length]], 1)  # (rows, tokens)
        if beam_indices is None:
            rows = torch.arange(sequences, device=layers.device)[:, None].expand(sequences, length)
        else:  # the row (beam) each returned sequence's t-th token came from; -1: beam padding
            rows = beam_indices[:, :length].to(layers.device)
        exit_layers = layers.gather(0, rows.clamp(min=0))
        ended = after_end(new_tokens[:, :length].to(layers.device), eos_token_id)
        exit_layers = exit_layers.masked_fill((rows < 0) | ended, -1)
        return cls(exit_layers=exit_layers.cpu(), steps=steps[:length], num_layers=num_layers)

    def tokens(self):
        """(sequence, token index, exit layer) of every generated token."""
        for s, row in enumerate(self.exit_layers.tolist()):
            for t, layer in enumerate(row):
                if layer >= 0:
                    yield s, t, layer

    def per_sequence(self) -> list[list[int]]:
        return [[k for k in row if k >= 0] for row in self.exit_layers.tolist()]

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(k for _, _, k in self.tokens()).items()))


def after_end(tokens: torch.Tensor, eos_token_id) -> torch.Tensor:
    """True for positions after the first end-of-sequence token of each row."""
    if eos_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
                       device=tokens.device)
    is_end = torch.isin(tokens, eos).long()
    return (is_end.cumsum(-1) - is_end) > 0


def _as_list(traces) -> list[Trace]:
    return [traces] if isinstance(traces, Trace) else list(traces)


def _token_costs(traces, costs: CostModel, decode_only: bool = False):
    memo = {}  # (record, depth) -> breakdown; the records stay alive while we iterate
    for trace in _as_list(traces):
        for _, t, k in trace.tokens():
            record = trace.steps[t]
            if decode_only and record.prefill:
                continue
            key = (id(record), k)
            if key not in memo:
                memo[key] = costs.breakdown(record, k)
            yield record, k, memo[key]


def param_speedup(traces: Trace | list[Trace], costs: CostModel) -> float:
    """Over every token of one trace or of several generations (e.g. the batches of an eval)."""
    used = [parts["params"] for _, _, parts in _token_costs(traces, costs)]
    return costs.num_layers / (sum(used) / len(used))


def layer_speedup(traces: Trace | list[Trace], costs: CostModel, decode_only: bool = False) -> float:
    spent = full = 0.0
    for record, _, parts in _token_costs(traces, costs, decode_only):
        spent += parts["total"]
        full += costs.full_cost(record)
    return full / spent if spent else float("nan")


def summarize(traces: Trace | list[Trace], costs: CostModel) -> dict:
    """Everything a report needs from one or more generations, numbers only."""
    traces = _as_list(traces)
    layers = [k for trace in traces for _, _, k in trace.tokens()]
    totals = Counter()
    for _, _, parts in _token_costs(traces, costs):
        totals.update(parts)
    return {
        "tokens": len(layers),
        "mean_exit_layer": sum(layers) / len(layers) if layers else float("nan"),
        "exit_layer_histogram": dict(sorted(Counter(layers).items())),
        "param_speedup": param_speedup(traces, costs) if layers else float("nan"),
        "layer_speedup": layer_speedup(traces, costs) if layers else float("nan"),
        "decode_layer_speedup": layer_speedup(traces, costs, decode_only=True) if layers else float("nan"),
        "cost_per_token": {k: v / len(layers) for k, v in sorted(totals.items()) if k != "params"} if layers else {},
    }
