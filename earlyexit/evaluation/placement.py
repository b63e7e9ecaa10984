"""Exit placement under a budget of exit modules (the paper fixes its exits and leaves this open).

Given k exits, which layers? Training exits for every candidate set is out of reach (C(N-1, k)
trainings), so the search runs on a cheap proxy and only its answer is confirmed by a real run:

1. one teacher-forced pass over the dev references gives, for every target token and every layer,
   the shared head's confidence (max softmax) and whether its argmax agrees with the final layer's;
2. a candidate set S is scored by replaying the confidence rule on those statistics: a token leaves
   at the first layer of S whose confidence reaches τ; quality = share of tokens whose prediction
   agrees with the final layer's; cost = the layers run + one head per exit checked (layer
   equivalents, the accounting's `head_cost`); the score of S is its best layer speed-up over the
   τ grid with agreement >= 1 - `budget`;
3. greedy forward selection: k rounds, each adding the layer that maximises the score
   (k x N candidate sets instead of C(N-1, k)), then the chosen set is confirmed by
   `earlyexit run --exit-layers S` on dev/test.
The proxy is the untrained read-out (what `confidence` exits see); trained exits are usually
better at every layer, so the proxy ranks layers rather than predicting the final speed-up.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from earlyexit.errors import ConfigError
from earlyexit.evaluation.calibrate import PAPER_GRID
from earlyexit.training.features import teacher_forced_features


@dataclasses.dataclass
class LayerStatistics:
    confidence: np.ndarray  # [tokens, layers]: max softmax of the shared head at each layer
    agrees: np.ndarray  # [tokens, layers]: its argmax equals the final layer's
    head_cost: float  # one read-out in layer equivalents
    seconds: float


@torch.no_grad()
def layer_statistics(backend, dataset, limit: int | None = 200, batch_size: int = 32) -> LayerStatistics:
    began = time.perf_counter()
    confidence, agrees = [], []
    for features in teacher_forced_features(backend, dataset, limit, batch_size):
        where = features.targets != -100
        final = features.final_logits[:, :-1].argmax(-1)[where]
        per_layer_confidence, per_layer_agree = [], []
        for hidden in features.hidden[1:]:
            probabilities = backend.logits(hidden[:, :-1]).float().softmax(-1)[where]
            top, argmax = probabilities.max(-1)
            per_layer_confidence.append(top)
            per_layer_agree.append(argmax == final)
        confidence.append(torch.stack(per_layer_confidence, 1))
        agrees.append(torch.stack(per_layer_agree, 1))
    layers = backend.layer_param_counts()
    head_cost = backend.head_param_count() / (sum(layers) / len(layers))
    return LayerStatistics(torch.cat(confidence).cpu().numpy(), torch.cat(agrees).cpu().numpy(), head_cost,
                           time.perf_counter() - began)


def score(stats: LayerStatistics, exits: list[int], threshold: float) -> tuple[float, float]:
    """(agreement with the final layer, layer speed-up) of the confidence rule at `threshold`
    with exits at `exits` (1-based layers), replayed on the statistics."""
    tokens, n = stats.confidence.shape
    exits = sorted(exits)
    depth = np.full(tokens, n, dtype=float)
    checks = np.zeros(tokens)
    agree = np.ones(tokens, dtype=bool)  # tokens that go all the way are the final layer's
    going = np.ones(tokens, dtype=bool)
    for k in exits:
        checks[going] += 1
        leave = going & (stats.confidence[:, k - 1] >= threshold)
        depth[leave] = k
        agree[leave] = stats.agrees[leave, k - 1]
        going &= ~leave
    cost = depth + stats.head_cost * (checks + going)  # heads checked, plus the final head for the rest
    return float(agree.mean()), float((n + stats.head_cost) / cost.mean())


def best_speedup(stats: LayerStatistics, exits: list[int], budget: float, grid=PAPER_GRID) -> tuple[float, float]:
    """(best speed-up within the budget, its threshold); (1.0, nan) when no threshold qualifies."""
    best = (1.0, float("nan"))
    for threshold in grid:
        agreement, speedup = score(stats, exits, threshold)
        if agreement >= 1 - budget and speedup > best[0]:
            best = (speedup, threshold)
    return best


def greedy_placement(stats: LayerStatistics, k: int, budget: float = 0.01, grid=PAPER_GRID) -> dict:
    """Greedy forward selection of `k` exit layers among 1..N-1; every round and its cost recorded."""
    n = stats.confidence.shape[1]
    if not 1 <= k < n:
        raise ConfigError(f"an exit budget of {k} must be between 1 and {n - 1} (the model has {n} layers)")
    began = time.perf_counter()
    chosen, rounds, evaluated = [], [], 0
    for _ in range(k):
        options = {}
        for layer in range(1, n):
            if layer not in chosen:
                options[layer] = best_speedup(stats, chosen + [layer], budget, grid)
                evaluated += 1
        layer = max(options, key=lambda c: (options[c][0], -c))
        chosen.append(layer)
        rounds.append({"added": layer, "exits": sorted(chosen), "speedup": options[layer][0],
                       "threshold": options[layer][1]})
    return {"exits": sorted(chosen), "rounds": rounds, "budget": budget, "sets_evaluated": evaluated,
            "search_seconds": time.perf_counter() - began, "statistics_seconds": stats.seconds,
            "tokens": int(stats.confidence.shape[0])}
