"""Speed-up accounting from the per-token trace. Three numbers, never mixed up:

- `param_speedup` (the paper's definition): backbone decoder parameters divided by the mean
  parameters a generated token used: the layers up to its exit plus the exit modules of every
  exit it passed. Classifier (LM-head) evaluations and catch-up work are not counted.
- `layer_speedup`: the full model's cost per token divided by the cost actually spent, both in
  decoder-layer equivalents, counting everything: backbone layers (catch-up included), exit
  modules, every LM-head read-out (vocab x width / params-per-layer each) and the K/V
  projections `propagate` writes.
- `wall_speedup`: measured with a clock, in `benchmarks/speed.py`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch


@dataclasses.dataclass
class CostModel:
    """Sizes needed to turn a trace into costs, all relative to one mean decoder layer."""

    layer_params: list[int]
    head_cost: float  # one LM-head read-out, in layer equivalents
    kv_fill_cost: float  # one layer's K/V projection (propagate), in layer equivalents
    exit_layers: list[int]
    exit_module_costs: list[float]  # per exit, in layer equivalents (0 when the exit has no module)

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    @property
    def mean_layer_params(self) -> float:
        return sum(self.layer_params) / len(self.layer_params)

    @classmethod
    def for_model(cls, model) -> CostModel:
        backend, strategy = model.backend, model.strategy
        layer_params = backend.layer_param_counts()
        mean = sum(layer_params) / len(layer_params)
        exits = strategy.exit_layers if strategy is not None else []
        return cls(
            layer_params=layer_params,
            head_cost=backend.head_param_count() / mean,
            kv_fill_cost=backend.kv_projection_param_count() / mean,
            exit_layers=list(exits),
            exit_module_costs=[strategy.exit_module_layer_cost(e) for e in range(len(exits))],
        )

    def step_cost(self, record) -> float:
        """Layer equivalents one step spent per row (rows of a batch share one depth)."""
        return (record.layer_evals + record.exit_module_evals + record.head_evals * self.head_cost
                + record.kv_fill_evals * self.kv_fill_cost)

    def full_token_cost(self) -> float:
        return self.num_layers + self.head_cost

    def token_params(self, exit_layer: int) -> float:
        """The paper's parameter count for a token leaving after `exit_layer` layers."""
        modules = sum(cost for k, cost in zip(self.exit_layers, self.exit_module_costs) if k <= exit_layer)
        return sum(self.layer_params[:exit_layer]) + modules * self.mean_layer_params


@dataclasses.dataclass
class Trace:
    """Per returned sequence and generated token: the exit layer (-1 where there is no token:
    after end-of-sequence, or beam padding) and the index of the step that produced it."""

    exit_layers: torch.Tensor  # (sequences, tokens) long
    steps: list  # StepRecord per forward, in order
    num_layers: int

    @classmethod
    def from_generation(cls, steps, new_tokens: torch.Tensor, beam_indices: torch.Tensor | None,
                        eos_token_id, num_layers: int) -> Trace:
        sequences, length = new_tokens.shape
        length = min(length, len(steps))
        exit_layers = torch.full((sequences, length), -1, dtype=torch.long)
        for t in range(length):
            if beam_indices is None:
                rows = torch.arange(sequences)
            else:  # the row (beam) each returned sequence's t-th token came from
                rows = beam_indices[:, t].cpu()
            layer = steps[t].exit_layer.cpu()
            valid = rows >= 0
            exit_layers[valid, t] = layer[rows[valid]]
        exit_layers[_after_end(new_tokens[:, :length].cpu(), eos_token_id)] = -1
        return cls(exit_layers=exit_layers, steps=steps[:length], num_layers=num_layers)

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


def _after_end(tokens: torch.Tensor, eos_token_id) -> torch.Tensor:
    """True for positions after the first end-of-sequence token of each row."""
    if eos_token_id is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    is_end = torch.isin(tokens, eos).long()
    return (is_end.cumsum(-1) - is_end) > 0


def _as_list(traces) -> list[Trace]:
    return [traces] if isinstance(traces, Trace) else list(traces)


def param_speedup(traces: Trace | list[Trace], costs: CostModel) -> float:
    """Over every token of one trace or of several generations (e.g. the batches of an eval)."""
    used = [costs.token_params(k) for trace in _as_list(traces) for _, _, k in trace.tokens()]
    return sum(costs.layer_params) / (sum(used) / len(used))


def layer_speedup(traces: Trace | list[Trace], costs: CostModel) -> float:
    spent = [costs.step_cost(trace.steps[t]) for trace in _as_list(traces) for _, t, _ in trace.tokens()]
    return costs.full_token_cost() * len(spent) / sum(spent)


def summarize(traces: Trace | list[Trace], costs: CostModel) -> dict:
    """Everything a report needs from one or more generations, numbers only."""
    traces = _as_list(traces)
    layers = [k for trace in traces for _, _, k in trace.tokens()]
    steps = [record for trace in traces for record in trace.steps]
    return {
        "tokens": len(layers),
        "mean_exit_layer": sum(layers) / len(layers) if layers else float("nan"),
        "exit_layer_histogram": dict(sorted(Counter(layers).items())),
        "param_speedup": param_speedup(traces, costs) if layers else float("nan"),
        "layer_speedup": layer_speedup(traces, costs) if layers else float("nan"),
        "catchup_evals": sum(r.catchup_evals for r in steps),
        "head_evals": sum(r.head_evals for r in steps),
        "kv_fill_evals": sum(r.kv_fill_evals for r in steps),
    }
