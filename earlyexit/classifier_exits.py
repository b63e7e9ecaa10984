"""Building blocks of the classifier-exit baselines (DeeBERT, PABEE, LeeBERT): one trainable
vocabulary classifier per exit, the rules that read them, and their losses.

A classifier exit is a copy of the backbone's read-out (final norm, projections, LM head),
trained on the frozen backbone's hidden states at its exit layer: the vocabulary classifiers
the FREE paper puts at its exits for DeeBLIP. Starting from the shared head (rather than from
random weights, as DeeBERT's small off-ramps do) is our choice: with a vocabulary-sized
output, a random start wastes most of the training budget on relearning the embedding table.

The rules and losses below are pure functions of tensors, so tests check them by hand.
"""

from __future__ import annotations

import dataclasses
import math

from .errors import ConfigError
from .strategy import Strategy, TrainableConfig, config_field


# -- rules -----------------------------------------------------------------------------------------
def entropy(logits):
    """Entropy (nats) of each row's softmax: DeeBERT's exit score (low = confident)."""
    import torch

    log_p = torch.log_softmax(logits.float(), -1)
    return -(log_p.exp() * log_p).sum(-1)


def patience_update(token: dict, rows, predictions, patience: int, total: int):
    """PABEE's counter for the rows present at one exit, kept in the per-token scratch `token`
    (indexed by batch row): +1 when the prediction equals this row's prediction at the previous
    exit, else 0. Returns which rows leave (counter reached `patience`). The first exit a row
    reaches only records its prediction (counter 0)."""
    import torch

    previous = token.get("pabee_prediction")
    if previous is None:  # first exit of this forward: allocate per batch row
        previous = token["pabee_prediction"] = torch.full((total,), -1, dtype=torch.long, device=predictions.device)
        token["pabee_count"] = torch.zeros(total, dtype=torch.long, device=predictions.device)
    count = token["pabee_count"]
    same = previous[rows] == predictions
    updated = torch.where(same, count[rows] + 1, torch.zeros_like(count[rows]))
    count[rows] = updated
    previous[rows] = predictions
    return updated >= patience


# -- losses ----------------------------------------------------------------------------------------
def exit_cross_entropies(exit_logits: list, targets):
    """Per-exit mean cross-entropy on the target tokens (logits already restricted to them)."""
    import torch.nn.functional as F

    return [F.cross_entropy(logits.float(), targets) for logits in exit_logits]


def weighted_average(losses: list, weights: list[float]):
    """Σ w_j L_j / Σ w_j: PABEE's loss with w_j = j (deeper exits weigh more)."""
    return sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)


def mutual_distillation(exit_logits: list, teachers: list, temperature: float = 1.0) -> list:
    """For each exit m: the mean over every other member n of KL(p_n || p_m) at `temperature`,
    teachers detached (each member learns from the others; LeeBERT's mutual learning). `teachers`
    extends the members with fixed ones (the frozen final layer)."""
    import torch.nn.functional as F

    members = list(exit_logits) + list(teachers)
    log_probs = [F.log_softmax(m.float() / temperature, -1) for m in members]
    losses = []
    for m in range(len(exit_logits)):
        terms = [F.kl_div(log_probs[m], log_probs[n].detach(), log_target=True, reduction="batchmean")
                 for n in range(len(members)) if n != m]
        losses.append(sum(terms) / len(terms) * temperature ** 2)
    return losses


# -- the base strategy ---------------------------------------------------------------------------
@dataclasses.dataclass
class ClassifierExitConfig(TrainableConfig):
    epochs: float | None = config_field(3.0, "passes over the training captions")
    learning_rate: float = config_field(1e-4, "Adam learning rate of the exit classifiers")


class ClassifierExitStrategy(Strategy):
    """Exits that each own a vocabulary classifier (a trainable copy of the shared read-out).
    Subclasses give the rule (`should_exit`) and may change the loss (`classifier_loss`)."""

    Config = ClassifierExitConfig
    reuses_backbone_features = True

    def __init__(self, backend, exit_layers, config=None):
        import torch

        super().__init__(backend, exit_layers, config)
        self.classifiers = torch.nn.ModuleList(backend.readout_copy() for _ in self.exit_layers)
        self.classifiers.requires_grad_(False)
        self.classifiers.eval()

    def exit_modules(self):
        return self.classifiers

    def exit_readout(self, exit_index):
        return self.classifiers[exit_index]

    def training_modules(self) -> dict:
        return {"classifiers": self.classifiers}

    def classifier_loss(self, exit_logits: list, targets, final_logits, held_out=None):
        """(loss, parts): the sum of per-exit cross-entropies (DeeBERT's off-ramp training)."""
        losses = exit_cross_entropies(exit_logits, targets)
        return sum(losses), {f"ce{k}": loss.item() for k, loss in zip(self.exit_layers, losses)}

    def exit_logits_on(self, features, where):
        """Every exit's logits on the target positions of a teacher-forced batch."""
        return [self.exit_logits(e, state[:, :-1][where]) for e, state in
                enumerate(self.teacher_forced_states(features))]

    def training_step(self, batch, engine, held_out=None) -> dict:
        from .exit_training import backbone_features

        features = backbone_features(self.backend, batch)
        where = features.targets != -100
        logits = self.exit_logits_on(features, where)
        loss, parts = self.classifier_loss(logits, features.targets[where], features.final_logits_at(where))
        return {"loss": engine.optimize("classifiers", loss), **parts}


class PatienceRule:
    """Mixin: PABEE's patience rule over the exits' argmax; the knob is the patience t."""

    knob = "patience"
    accepts_gate = False  # the counter must see every exit of every row

    def calibration_grid(self) -> tuple:
        return tuple(range(1, len(self.exit_layers)))

    def should_exit(self, exit_index, view, context):
        predictions = view.logits().argmax(-1)
        return patience_update(context.token, view.rows, predictions, self.config.patience, context.rows)


def check_patience(patience) -> None:
    if not (isinstance(patience, int) and patience >= 1):
        raise ConfigError(f"patience must be a whole number >= 1 (got {patience!r}); e.g. --threshold 2")


def finite(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number (got {value})")
