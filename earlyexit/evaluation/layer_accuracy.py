"""How good is each layer's read-out? Teacher-forced next-token accuracy per decoder layer.

For every reference caption (or answer) of a data set, the backbone runs once with the text as
input; at each layer k the shared head reads the hidden states (`backend.logits`, the untrained
`confidence` exit) and we count how often its argmax is the true next token, and how often it
agrees with the final layer. This is the paper's "mid-crisis" view (Fig. 3) for untrained exits;
a strategy with trained exit modules can pass `exit_logits` to measure its own exits.
"""

from __future__ import annotations

from typing import Callable

import torch

from earlyexit.data import Dataset
from earlyexit.training.features import teacher_forced_features


@torch.no_grad()
def per_layer_accuracy(backend, dataset: Dataset, limit: int | None = 200, batch_size: int = 32,
                       exit_logits: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
    """One row per depth 1..N: `accuracy` (vs the reference token) and `agreement` (vs the final
    layer's prediction), over the target tokens (captions: every word and the end token)."""
    read_out = exit_logits or (lambda depth, hidden: backend.logits(hidden))
    n = backend.num_layers
    correct, agree, total = [0] * (n + 1), [0] * (n + 1), 0
    # layer by layer through the backend, so every family (encoder-decoder too) is read alike
    for features in teacher_forced_features(backend, dataset, limit, batch_size):
        targets = features.targets
        where = targets != -100
        total += int(where.sum())
        final = features.final_logits[:, :-1].argmax(-1)
        for depth in range(1, n + 1):
            hidden = features.hidden[depth][:, :-1]
            predicted = final if depth == n else read_out(depth, hidden).argmax(-1)
            correct[depth] += int((predicted == targets)[where].sum())
            agree[depth] += int((predicted == final)[where].sum())
    return [{"layer": depth, "accuracy": correct[depth] / total, "agreement": agree[depth] / total}
            for depth in range(1, n + 1)]


@torch.no_grad()
def exit_accuracy(backend, strategy, dataset: Dataset, limit: int | None = 200, batch_size: int = 32) -> dict:
    """{exit layer: teacher-forced next-token accuracy} of a strategy's own exits."""
    correct, total = [0] * len(strategy.exit_layers), 0
    for features in teacher_forced_features(backend, dataset, limit, batch_size, strategy.backbone_layers()):
        where = features.targets != -100
        total += int(where.sum())
        for e, out in enumerate(strategy.teacher_forced_states(features)):
            predicted = strategy.exit_logits(e, out[:, :-1]).argmax(-1)
            correct[e] += int((predicted == features.targets)[where].sum())
    return {k: c / total for k, c in zip(strategy.exit_layers, correct)}
