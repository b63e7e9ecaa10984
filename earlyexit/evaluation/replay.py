"""Replaying a confidence rule offline: what each knob value would do, from one pass over dev.

Calibration used to decode the dev split once per knob value. Under greedy decoding with the
`catchup` policy the early-exit model's state at a position is exactly the full model's as long
as every earlier token agreed with it (the caches hold what one full forward would), so one
teacher-forced pass over the full model's own greedy outputs tells, for every token and exit,
the exit's confidence, whether its argmax is the full model's token and, behind a `filter` gate
(it decides on the hidden state, whatever τ), whether the gate lets the rule see the token. Replaying "leave at the
first exit whose confidence reaches τ" on those numbers then gives, for every τ at once:
- which samples' outputs equal the full model's (exact up to float ties: a sample agrees iff
  every one of its tokens does, and up to its first disagreement the replayed states are the
  real ones), the loss the `risk` rule counts and the proxy the other rules narrow with;
- a layer speed-up (an estimate: token by token, catch-up charged as the deepest later token of
  the same sample, each exit checked charged its module and read-out; batches are ignored).
The placement search (`placement.py`) replays the same rule on the references with the shared
head; this replays the strategy's own exits on the model's own outputs.
"""

from __future__ import annotations

import dataclasses
import time
import types

import numpy as np
import torch

from earlyexit.core.accounting import CostModel
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.core.generation import count_tokens, decode_new_tokens
from earlyexit.data.tasks import task_of
from earlyexit.evaluation.common import add_noise
from earlyexit.training.batching import TrainingBatches, pixel_values
from earlyexit.training.features import backbone_features
from earlyexit.util.ranks import process_group


@dataclasses.dataclass
class Replay:
    """Per generated token (all samples, in order): each exit's confidence and agreement."""

    ids: list  # sample ids, in the data set's order
    predictions: dict  # the full model's greedy text by sample id
    sample: np.ndarray  # [tokens]: index into `ids` of each token's sample
    confidence: np.ndarray  # [tokens, exits]: the exit's max softmax (token 0 of a sample: never checked)
    agrees: np.ndarray  # [tokens, exits]: the exit's argmax is the full model's token
    candidates: np.ndarray  # [tokens, exits]: a filter gate lets the rule see the token there (else all True)
    first: np.ndarray  # [tokens]: the token comes from the prompt pass (exits are not consulted)
    exit_layers: list
    costs: CostModel
    seconds: float

    def predict(self, threshold: float) -> dict:
        """What the rule at `threshold` would do: `agreement` (share of samples whose output is the
        full model's), `disagreements`, `samples`, `param_speedup` (by layers, as an estimate),
        `layer_speedup` and `mean_exit_layer`."""
        tokens, exits = self.confidence.shape
        leaves = (self.confidence >= threshold) & self.candidates & ~self.first[:, None]
        left = leaves.any(1)
        at = np.where(left, leaves.argmax(1), exits)  # first exit whose confidence reaches τ, else none
        token_agrees = np.where(left, self.agrees[np.arange(tokens), np.minimum(at, exits - 1)], True)
        differ = np.bincount(self.sample[~token_agrees], minlength=len(self.ids)) > 0
        n = self.costs.num_layers
        depth = np.where(left, np.asarray(self.exit_layers + [n])[at], n)
        checks = np.where(self.first, 0, np.minimum(at + 1, exits))
        ran = (np.arange(exits) < checks[:, None]) & self.candidates  # where the exit module and read-out ran
        modules = (ran * np.asarray(self.costs.exit_module_costs)).sum(1)  # exit modules count, heads not
        return {"agreement": float(1.0 - differ.mean()), "disagreements": int(differ.sum()),
                "samples": len(self.ids), "param_speedup": float(n / (depth + modules).mean()),
                "layer_speedup": self._speedup(depth, checks, ran, left), "mean_exit_layer": float(depth.mean())}

    def _speedup(self, depth: np.ndarray, checks: np.ndarray, ran: np.ndarray, left: np.ndarray) -> float:
        """Full cost over the estimated cost, in layer equivalents (see the module's docstring)."""
        c = self.costs
        visited = np.arange(len(c.exit_layers)) < checks[:, None]
        exits = (visited * np.asarray(c.gate_costs)).sum(1) + (ran * (np.asarray(c.exit_module_costs)
                                                                      + np.asarray(c.exit_readout_costs))).sum(1)
        layers = np.empty_like(depth, dtype=float)
        bounds = list(np.flatnonzero(self.first)) + [len(depth)]  # each sample's tokens lie together
        for a, b in zip(bounds[:-1], bounds[1:]):  # catch-up: a position runs as deep as the deepest later token
            layers[a:b] = np.maximum.accumulate(depth[a:b][::-1])[::-1]
        cost = layers + exits + c.head_cost * ~left
        return float((c.num_layers + c.head_cost) * len(depth) / cost.sum())


def replay_confidence_rule(backend, strategy, dataset, settings, gate=None) -> Replay:
    """Greedy-decode `dataset` with the full model (batches and image noise as `evaluate` makes
    them), then teacher-force those outputs through the strategy's exits (behind `gate`, a filter
    gate, if given). Each process replays its share; every process returns the whole data set's."""
    began = time.perf_counter()
    costs = CostModel.for_model(EarlyExitForCausalLM(backend, strategy, gate=gate))  # also puts the gate in place
    rank, world = process_group()
    part = dataset.samples[rank::world]
    records = []
    for start in range(0, len(part), settings.batch_size):
        records += replay_batch(backend, strategy, gate, dataset, part[start:start + settings.batch_size], start,
                                settings)
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, records)
        records = [r for share in shares for r in share]
    order = {s.id: k for k, s in enumerate(dataset.samples)}
    records.sort(key=lambda r: order[r["id"]])
    exits = len(strategy.exit_layers)
    empty = np.zeros((0, exits))
    return Replay(ids=[r["id"] for r in records], predictions={r["id"]: r["text"] for r in records},
                  sample=np.concatenate([np.full(len(r["confidence"]), k) for k, r in enumerate(records)]).astype(int),
                  confidence=np.concatenate([r["confidence"] for r in records] or [empty]),
                  agrees=np.concatenate([r["agrees"] for r in records] or [empty]).astype(bool),
                  candidates=np.concatenate([r["candidates"] for r in records] or [empty]).astype(bool),
                  first=np.concatenate([np.arange(len(r["confidence"])) == 0 for r in records]),
                  exit_layers=list(strategy.exit_layers),
                  costs=costs,
                  seconds=time.perf_counter() - began)


@torch.no_grad()
def replay_batch(backend, strategy, gate, dataset, samples: list, start: int, settings) -> list[dict]:
    """One batch: the full model's greedy tokens, then every exit's confidence and agreement on them."""
    task = task_of(dataset)
    images = [add_noise(s.load_image(), settings.noise, settings.seed * 1_000_003 + start + i)
              for i, s in enumerate(samples)]
    prompts = [task.prompt(s) for s in samples]
    inputs = backend.prepare_inputs(images, prompts)
    length = inputs["input_ids"].shape[1]
    sequences = backend.plain_generate(**inputs, max_new_tokens=settings.max_new_tokens, num_beams=1,
                                       do_sample=False)
    eos = backend.language_model.generation_config.eos_token_id
    generated = [sequences[i, length:length + count_tokens(sequences[i:i + 1], length, eos)].tolist()
                 for i in range(len(samples))]
    # the prompt as `prepare_inputs` gives each row, then its generated tokens, teacher forced
    rows = [(backend.prompt_ids(p) + g, [-100] * len(backend.prompt_ids(p)) + g) for p, g in zip(prompts, generated)]
    batches = TrainingBatches(backend, [dataclasses.replace(dataset, samples=samples)], batch_size=len(samples))
    features = backbone_features(backend, batches.collate(rows, pixel_values(backend, images), prompts),
                                 strategy.backbone_layers())
    where = features.targets != -100
    states = strategy.teacher_forced_states(features)
    confidence, agrees, candidates = [], [], []
    for e, (layer, state) in enumerate(zip(strategy.exit_layers, states)):
        logits = strategy.exit_logits(e, state[:, :-1][where]).float()
        top, argmax = logits.softmax(-1).max(-1)
        confidence.append(top)
        agrees.append(argmax == features.targets[where])
        candidates.append(gate_candidates(gate, e, layer, features, where))
    confidence, agrees, candidates = (torch.stack(c, 1).cpu().numpy() for c in (confidence, agrees, candidates))
    texts = decode_new_tokens(backend, sequences, length)
    ends = np.cumsum([0] + [len(g) for g in generated])
    return [{"id": s.id, "text": texts[i], "confidence": confidence[ends[i]:ends[i + 1]],
             "agrees": agrees[ends[i]:ends[i + 1]], "candidates": candidates[ends[i]:ends[i + 1]]}
            for i, s in enumerate(samples)]


def gate_candidates(gate, exit_index: int, layer: int, features, where) -> torch.Tensor:
    """Which target positions a filter gate offers the rule at this exit (all without a gate): it
    decides on the exit's hidden state and the one a layer earlier, as the engine shows them."""
    hidden = features.hidden[layer][:, :-1][where]
    if gate is None:
        return torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    view = types.SimpleNamespace(index=exit_index, layer=layer, hidden=hidden,
                                 previous=features.hidden[layer - 1][:, :-1][where],
                                 rows=torch.arange(hidden.shape[0], device=hidden.device))
    passed = gate.decide(exit_index, view)
    return torch.as_tensor(passed, device=hidden.device).expand(hidden.shape[0]).clone()
