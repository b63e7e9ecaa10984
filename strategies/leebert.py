"""`leebert`: LeeBERT (Zhu, ACL 2021), learned early exit with cross-level optimisation, adapted
to generation.

LeeBERT's two changes to early-exit training: (1) every exit learns from every other exit
(mutual distillation), not only from the last layer; (2) the weights of the loss terms are
learned, as a bi-level problem: the weights are meta-parameters chosen so that the model trained
with them does well on held-out data, solved by its cross-level optimisation (CLO), which draws
gradients from both the training and the held-out split. Its inference rule is PABEE's patience.

Here: each exit is a vocabulary classifier (a copy of the shared read-out). The training loss is
    Σ_m CE_m + Σ_m w_m · KD_m,   KD_m = mean over the other exits and the frozen final layer n of
    KL(p_n || p_m) at temperature T (teachers detached),   w = E · softmax(β)
The weights β are learned on a held-out share of the exit-training split by one unrolled step
(DARTS-style, second order through autograd): θ' = θ − ξ ∇θ L_train(θ, β), and β follows
∇β L_val(θ'), where L_val is the summed per-exit cross-entropy on the held-out batch. CLO's
cross-level part, as we read it, also lets the training split vote: β's gradient adds `clo_mix` ×
∇β L_val on the training batch under the same unrolled step. Inference: PABEE's patience rule.

Where the paper is silent or does not fit a frozen VLM we chose: the backbone stays frozen, as
the FREE paper trains its baselines on the frozen fine-tuned backbone; `joint=true` fine-tunes
copies of the decoder layers with the exits in one group, as LeeBERT trains all of BERT (the
unrolled step then holds the layers fixed and unrolls the classifiers only); ξ is the exits'
learning rate;
the weights start equal (β = 0); the held-out share is 20 % of the images.
"""

from __future__ import annotations

import dataclasses
import math

from earlyexit import hookimpl
from earlyexit.core.strategy import config_field
from earlyexit.errors import ConfigError
from earlyexit.strategies.classifier_exits import (ClassifierExitConfig, ClassifierExitStrategy, PatienceRule,
                                                   check_patience, exit_cross_entropies, mutual_distillation)


@dataclasses.dataclass
class LeeBertConfig(ClassifierExitConfig):
    patience: int = config_field(1, "PABEE's patience at inference (calibration picks it)")
    temperature: float = config_field(1.0, "distillation temperature T")
    held_out: float = config_field(0.2, "share of the exit-training images kept aside to learn the loss weights")
    weights_learning_rate: float = config_field(1e-2, "Adam learning rate of the loss weights β")
    clo_mix: float = config_field(0.5, "weight of the training split's unrolled gradient in β's update "
                                       "(0: plain bi-level on the held-out split)")
    joint: bool = config_field(False, "also fine-tune copies of the decoder layers with the exits, as LeeBERT "
                                      "trains the whole model (off: the frozen backbone of the FREE paper's baselines)")

    def __post_init__(self):
        super().__post_init__()
        check_patience(self.patience)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be positive (got {self.temperature})")
        if not 0 < self.held_out < 1:
            raise ConfigError(f"held_out is a share of the training images in (0, 1) (got {self.held_out})")
        if not self.weights_learning_rate > 0 or not 0 <= self.clo_mix <= 1:
            raise ConfigError("weights_learning_rate must be positive and clo_mix in [0, 1]")



def _loss_weights_module(count: int):
    import torch

    class LearnedLossWeights(torch.nn.Module):
        """β: one logit per exit; the weights are E · softmax(β) (positive, mean one)."""

        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.zeros(count))

        def forward(self):
            return count * torch.softmax(self.logits, 0)

    return LearnedLossWeights()


class LeeBertStrategy(PatienceRule, ClassifierExitStrategy):
    name = "leebert"
    description = "LeeBERT: vocabulary classifiers with mutual distillation, loss weights learned on held-out data"
    Config = LeeBertConfig
    reuses_backbone_features = False  # it trains its own copies of the backbone's layers

    def __init__(self, backend, exit_layers, config=None):
        import copy

        import torch

        super().__init__(backend, exit_layers, config)
        self.loss_weights = _loss_weights_module(len(self.exit_layers))
        self.loss_weights.requires_grad_(False)
        self.layers, self.trained = None, self.classifiers
        if self.config.joint:  # one group: the exits and the layers they read learn from one loss
            self.layers = torch.nn.ModuleList(copy.deepcopy(layer) for layer in backend.decoder_layers())
            self.layers.requires_grad_(False)
            self.layers.eval()
            self.trained = torch.nn.ModuleList([self.classifiers, self.layers])

    @property
    def held_out_fraction(self) -> float:
        return self.config.held_out

    def backbone_layers(self):
        return self.layers

    def training_modules(self) -> dict:
        return {"classifiers": self.trained, "loss_weights": self.loss_weights}

    def objective(self, exit_logits, targets, final_logits, weights):
        """(training loss, per-exit CEs, per-exit KDs) for the given loss weights."""
        ce = exit_cross_entropies(exit_logits, targets)
        kd = mutual_distillation(exit_logits, [final_logits], self.config.temperature)
        return sum(ce) + sum(w * k for w, k in zip(weights, kd)), ce, kd

    def _unrolled_validation(self, parameters, train_inputs, validation_sets):
        """Σ over `validation_sets` of the summed exit CEs after one SGD step of the classifiers
        on the training loss: the bi-level objective of β. Runs on a detached copy of the
        classifiers' parameters, so no gradient reaches the classifiers themselves."""
        import torch
        from torch.func import functional_call

        names = list(parameters)
        copies = {n: parameters[n].detach().requires_grad_(True) for n in names}

        def logits_with(values, states):
            return [functional_call(self.classifiers[e], {k.partition(".")[2]: v for k, v in values.items()
                                                          if k.partition(".")[0] == str(e)}, (state,))
                    for e, state in enumerate(states)]

        states, targets, final = train_inputs
        loss, _, _ = self.objective(logits_with(copies, states), targets, final, self.loss_weights())
        grads = torch.autograd.grad(loss, [copies[n] for n in names], create_graph=True)
        step = self.config.learning_rate
        stepped = {n: copies[n] - step * g for n, g in zip(names, grads)}
        total = 0.0
        for weight, (states, targets) in validation_sets:
            total = total + weight * sum(exit_cross_entropies(logits_with(stepped, states), targets))
        return total

    def training_step(self, batch, engine, held_out=None) -> dict:
        import torch

        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.training.features import backbone_features

        features = backbone_features(self.backend, batch, self.layers)
        where = features.targets != -100
        with torch.no_grad():
            self.match_statistics_once(features, where)
        states = [s[:, :-1][where] for s in self.teacher_forced_states(features)]
        targets, final = features.targets[where], features.final_logits[:, :-1][where].detach()
        losses = {}
        if held_out is not None:  # the upper level first: β from the unrolled step (the layers held fixed)
            with torch.no_grad():
                held = backbone_features(self.backend, held_out, self.layers)
            held_where = held.targets != -100
            held_states = [s[:, :-1][held_where] for s in self.teacher_forced_states(held)]
            fixed = [s.detach() for s in states]
            sets = [(1.0 - self.config.clo_mix, (held_states, held.targets[held_where]))]
            if self.config.clo_mix:
                sets.append((self.config.clo_mix, (fixed, targets)))
            parameters = dict(self.classifiers.named_parameters())
            self.trained.requires_grad_(False)  # no engine may see classifier (or layer) gradients here
            meta = self._unrolled_validation(parameters, (fixed, targets, final), sets)
            losses["meta"] = engine.optimize("loss_weights", meta)
            self.trained.requires_grad_(True)
        self.loss_weights.requires_grad_(False)
        with torch.no_grad():
            weights = self.loss_weights().tolist()
        logits = [self.classifiers[e](state) for e, state in enumerate(states)]
        loss, ce, kd = self.objective(logits, targets, final, weights)
        losses["loss"] = engine.optimize("classifiers", loss)
        self.loss_weights.requires_grad_(True)
        losses.update({f"ce{k}": c.item() for k, c in zip(self.exit_layers, ce)})
        losses.update({f"kd{k}": d.item() for k, d in zip(self.exit_layers, kd)})
        losses.update({f"w{k}": w for k, w in zip(self.exit_layers, weights)})
        return losses


@hookimpl
def earlyexit_register_strategies():
    return [LeeBertStrategy]
