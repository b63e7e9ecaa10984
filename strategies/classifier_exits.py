"""Building blocks of the classifier-exit baselines (DeeBERT, PABEE, LeeBERT): one trainable
vocabulary classifier per exit, the rules that read them, and their losses.

A classifier exit is a copy of the backbone's read-out (final norm, projections, LM head),
trained on the frozen backbone's hidden states at its exit layer: the vocabulary classifiers
the FREE paper puts at its exits for DeeBLIP. Starting from the shared head (rather than from
random weights, as DeeBERT's small off-ramps do) is our choice: with a vocabulary-sized
output, a random start wastes most of the training budget on relearning the embedding table.

With `match_statistics`, each classifier starts with a per-channel scale in front of the copy,
set on the first training batch so that the exit's hidden state has, channel by channel, the
root-mean-square the final layer's state has there (a diagonal "tuned lens" translator, trained
with the classifier). On a pretrained Llama (SmolLM2) mid-layer states carry a few channels
far larger than at the last layer; through the copied final norm they swamp every other channel,
the copied head predicts almost the same token everywhere, and its cross-entropy starts far
above a uniform guess's. With the statistics matched (and a higher learning rate) it learns there
(`benchmarks/smol_training_time.py`).

The rules and losses below are pure functions of tensors, so tests check them by hand.
"""

from __future__ import annotations

import dataclasses
import math

from earlyexit.core.strategy import Strategy, TrainableConfig, config_field
from earlyexit.errors import ConfigError


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
def channel_scale(width: int):
    """A trainable per-channel scale (ones until `match` sets it; `matched` is saved with it)."""
    import torch

    class ChannelScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(width))
            self.register_buffer("matched", torch.zeros((), dtype=torch.bool))

        def forward(self, hidden):
            return hidden * self.weight

        @torch.no_grad()
        def match(self, exit_states, final_states) -> None:
            """weight = RMS of `final_states` / RMS of `exit_states`, per channel (rows: positions),
            summed over every process of a multi-process run, so all ranks start alike."""
            if self.weight.numel() != width:
                raise ConfigError("match_statistics cannot set a partitioned parameter (DeepSpeed ZeRO-3); "
                                  "use --zero 2 or lower, or drop the option")
            sums = torch.stack([exit_states.float().pow(2).sum(0), final_states.float().pow(2).sum(0)])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(sums)
            ratio = (sums[1] / sums[0].clamp_min(1e-12)).sqrt()
            self.weight.copy_(ratio.to(self.weight.dtype))
            self.matched.fill_(True)

    return ChannelScale()


@dataclasses.dataclass
class ClassifierExitConfig(TrainableConfig):
    epochs: float | None = config_field(3.0, "passes over the training captions")
    learning_rate: float = config_field(1e-4, "Adam learning rate of the exit classifiers")
    match_statistics: bool = config_field(False, "start each classifier with a per-channel scale that gives its "
                                                 "exit's states the final layer's channel RMS (set on the first "
                                                 "training batch; for pretrained LMs with outlier channels)")


class ClassifierExitStrategy(Strategy):
    """Exits that each own a vocabulary classifier (a trainable copy of the shared read-out).
    Subclasses give the rule (`should_exit`) and may change the loss (`classifier_loss`)."""

    Config = ClassifierExitConfig
    reuses_backbone_features = True

    def __init__(self, backend, exit_layers, config=None):
        import torch

        super().__init__(backend, exit_layers, config)
        if self.config.match_statistics:
            width = backend.text_config.hidden_size
            self.classifiers = torch.nn.ModuleList(torch.nn.Sequential(channel_scale(width), *backend.readout_copy())
                                                   for _ in self.exit_layers)
        else:
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

    def match_statistics_once(self, features, where) -> None:
        """With `match_statistics`: on the first training batch, set every classifier's channel
        scale from that batch's exit states and final-layer states at the target positions."""
        if not self.config.match_statistics or bool(self.classifiers[0][0].matched):
            return
        final = features.hidden[-1][:, :-1][where]
        for classifier, state in zip(self.classifiers, self.teacher_forced_states(features)):
            classifier[0].match(state[:, :-1][where], final)

    def exit_logits_on(self, features, where):
        """Every exit's logits on the target positions of a teacher-forced batch."""
        return [self.exit_logits(e, state[:, :-1][where]) for e, state in
                enumerate(self.teacher_forced_states(features))]

    def training_step(self, batch, engine, held_out=None) -> dict:
        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.training.features import backbone_features

        features = backbone_features(self.backend, batch)
        where = features.targets != -100
        self.match_statistics_once(features, where)
        logits = self.exit_logits_on(features, where)
        loss, parts = self.classifier_loss(logits, features.targets[where], features.final_logits_at(where))
        return {"loss": engine.optimize("classifiers", loss), **parts}


class PatienceRule:
    """Mixin: PABEE's patience rule over the exits' argmax; the knob is the patience t."""

    knob = "patience"
    accepts_gate = False  # the counter must see every exit of every row

    def calibration_grid(self) -> tuple:
        return tuple(range(1, len(self.exit_layers)))

    def can_leave(self, exit_index):
        # a row's counter at exit index e is at most e (the first exit a row reaches only records)
        return exit_index >= self.config.patience

    def should_exit(self, exit_index, view, context):
        predictions = view.logits().argmax(-1)
        return patience_update(context.token, view.rows, predictions, self.config.patience, context.rows)


def check_patience(patience) -> None:
    if not (isinstance(patience, int) and patience >= 1):
        raise ConfigError(f"patience must be a whole number >= 1 (got {patience!r}); e.g. --threshold 2")


def finite(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number (got {value})")
