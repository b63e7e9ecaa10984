"""Training a learned exit gate: each exit's scorer learns, from teacher-forced examples,
whether that exit already predicts the final layer's token."""

from __future__ import annotations

import torch

from earlyexit.core.gates import LearnedGate
from earlyexit.training.features import teacher_forced_features


# -- training the learned gate ------------------------------------------------------------------
@torch.no_grad()
def gate_examples(backend, strategy, dataset, limit: int = 256, batch_size: int = 32):
    """Per exit: hidden states at the exit (positions that predict a caption/answer token) and
    whether the strategy's exit there predicts the same token as the final layer."""
    inputs = [[] for _ in strategy.exit_layers]
    labels = [[] for _ in strategy.exit_layers]
    for features in teacher_forced_features(backend, dataset, limit, batch_size):
        where = features.targets != -100
        final = features.final_logits[:, :-1].argmax(-1)[where]
        for e, state in enumerate(strategy.teacher_forced_states(features)):
            predicted = strategy.exit_logits(e, state[:, :-1][where]).argmax(-1)
            inputs[e].append(features.hidden[strategy.exit_layers[e]][:, :-1][where])
            labels[e].append((predicted == final).float())
    return [torch.cat(x) for x in inputs], [torch.cat(y) for y in labels]


def train_gate(gate: LearnedGate, backend, strategy, dataset, steps: int = 400, learning_rate: float = 3e-3,
               limit: int = 2000, seed: int = 0) -> dict:
    """Fit each exit's scorer with binary cross-entropy on teacher-forced examples; returns the
    final loss and the share of positive examples per exit."""
    inputs, labels = gate_examples(backend, strategy, dataset, limit=limit)
    gate.to(device=backend.device, dtype=torch.float32)  # trained in float32 beside a model of any dtype
    inputs = [x.float() for x in inputs]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(gate.parameters(), lr=learning_rate)
    gate.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = 0.0
        for e, (x, y) in enumerate(zip(inputs, labels)):
            pick = torch.randint(len(x), (min(len(x), 512),), generator=generator).to(x.device)
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(gate.score(e, x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gate.eval()
    gate.requires_grad_(False)
    return {"loss": float(loss.detach()), "positives": [float(y.mean()) for y in labels],
            "examples": [len(y) for y in labels]}
