"""FREE (Bajpai & Hanawal, "Fast and Robust Vision Language Models with Early Exits").

At each exit layer k an *exit transformer* E_k (a decoder layer of the backbone's own kind,
initialised from the backbone layer that follows the exit) refines the hidden state, and the
backbone's frozen final norm + LM head classify it. A token leaves at the first exit whose max
softmax reaches the threshold.

Training keeps the backbone frozen and alternates, on every batch, as in a GAN:
- feature classifier D_k (one hidden layer, LeakyReLU, sigmoid score) learns to tell the final
  layer's features h_N from the exit's E_k(h_k):  L_fc  = -log D_k(h_N) - log(1 - D_k(E_k(h_k)))
- the exit transformer learns to fool it:         L_gen = -log D_k(E_k(h_k))
  plus cross-entropy against the target tokens (supervised: the references; CapFilt: sampled and
  filtered captions; distill: the backbone's own output, so still no label) and/or the KL
  divergence between the exit's and the final layer's token distributions (distillation),
summed over exits. Only the exit transformers are needed at inference (they are the adapter);
the feature classifiers live in training checkpoints.
"""

from __future__ import annotations

import dataclasses

from earlyexit import hookimpl
from earlyexit.core.strategy import Strategy, TrainableConfig, config_field
from earlyexit.data.tasks import task_of
from earlyexit.errors import ConfigError

MODES = ("supervised", "distill", "capfilt")
KD_DIRECTIONS = ("exit_final", "final_exit")


@dataclasses.dataclass
class FreeConfig(TrainableConfig):
    threshold: float = config_field(0.8, "exit when the exit's max softmax is at least this (calibration picks it)")
    mode: str = config_field("supervised", "supervised (reference captions), distill (match the final layer, "
                                           "no labels) or capfilt (labels sampled and filtered from the backbone)")
    adversarial: bool = config_field(True, "train against the feature classifiers (off: the Fig. 4a ablation)")
    ce: bool | None = config_field(None, "cross-entropy on the target tokens: the references, or in distill mode the "
                                         "backbone's own tokens (hard distillation; default: on unless mode=distill)")
    kd: bool | None = config_field(None, "KL to the final layer's distribution (default: on only in distill mode)")
    kd_direction: str = config_field("exit_final", "exit_final = KL(p_exit, p_final) as the paper writes it; "
                                                   "final_exit = KL(p_final, p_exit)")
    epochs: float | None = config_field(None, "passes over the training captions (default: 3, or 5 in distill mode)")
    learning_rate: float = config_field(1e-4, "Adam learning rate of both players")
    classifier_width: float = config_field(1.2, "feature-classifier hidden units per model width "
                                                "(the paper: 3072 for 2560)")
    leaky_slope: float = config_field(0.2, "LeakyReLU slope of the feature classifier")
    adversarial_weight: float = config_field(1.0, "weight of -log D(E(h)) in the exit transformer's loss")
    capfilt_samples: int = config_field(8, "captions sampled per image in CapFilt mode")
    capfilt_keep: int = config_field(2, "best-scored captions kept per image in CapFilt mode")
    capfilt_scorer: str = config_field("backbone", "image-text scorer: clip:FOLDER_OR_HUB_ID (CLIP, the paper's "
                                                   "ViT-L/14) or backbone (offline: the backbone's own likelihood)")

    def __post_init__(self):
        if not 0.0 <= self.threshold:  # NaN fails too
            raise ConfigError(f"threshold must be >= 0 (got {self.threshold}); e.g. --threshold 0.8")
        if self.mode not in MODES:
            raise ConfigError(f"FREE mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.kd_direction not in KD_DIRECTIONS:
            raise ConfigError(f"kd_direction must be one of {', '.join(KD_DIRECTIONS)} (got {self.kd_direction!r})")
        if self.ce is None:
            self.ce = self.mode != "distill"
        if self.kd is None:
            self.kd = self.mode == "distill"
        if not (self.ce or self.kd or self.adversarial):
            raise ConfigError("nothing to train: enable at least one of adversarial, ce, kd")
        if self.epochs is None:
            self.epochs = 5.0 if self.mode == "distill" else 3.0
        super().__post_init__()
        if self.capfilt_keep < 1 or self.capfilt_samples < self.capfilt_keep:
            raise ConfigError("CapFilt needs capfilt_samples >= capfilt_keep >= 1")
        if not self.capfilt_scorer.startswith(("clip:", "backbone")):
            raise ConfigError(f"capfilt_scorer must be clip:FOLDER_OR_HUB_ID or backbone (got {self.capfilt_scorer!r})")


# -- the losses, as pure functions of logits (tested against hand computations) ----------------
def feature_classifier_loss(real_scores, fake_scores):
    """L_fc = -log D(h_N) - log(1 - D(E(h))), averaged over tokens; scores are pre-sigmoid."""
    import torch.nn.functional as F

    real_scores, fake_scores = real_scores.float(), fake_scores.float()  # bf16 rounds this loss coarsely
    return (F.binary_cross_entropy_with_logits(real_scores, real_scores.new_ones(real_scores.shape))
            + F.binary_cross_entropy_with_logits(fake_scores, fake_scores.new_zeros(fake_scores.shape)))


def generator_adversarial_loss(fake_scores):
    """L_gen = -log D(E(h)), averaged over tokens (the non-saturating GAN loss)."""
    import torch.nn.functional as F

    fake_scores = fake_scores.float()
    return F.binary_cross_entropy_with_logits(fake_scores, fake_scores.new_ones(fake_scores.shape))


def distillation_loss(exit_logits, final_logits, direction: str = "exit_final"):
    """KL(p_exit, p_final) (the paper's) or KL(p_final, p_exit), averaged over tokens."""
    import torch.nn.functional as F

    exit_log, final_log = F.log_softmax(exit_logits.float(), -1), F.log_softmax(final_logits.float(), -1)
    p, log_p, log_q = (exit_log.exp(), exit_log, final_log) if direction == "exit_final" else \
        (final_log.exp(), final_log, exit_log)
    return (p * (log_p - log_q)).sum(-1).mean()


class FreeStrategy(Strategy):
    name = "free"
    description = "FREE: exit transformers trained adversarially against feature classifiers (paper's method)"
    Config = FreeConfig
    knob_is_confidence = True
    reuses_backbone_features = True

    def __init__(self, backend, exit_layers, config=None):
        import copy

        import torch

        super().__init__(backend, exit_layers, config)
        layers = backend.decoder_layers()
        width = backend.text_config.hidden_size
        hidden = max(1, round(self.config.classifier_width * width))
        self.exit_transformers = torch.nn.ModuleList(copy.deepcopy(layers[k]) for k in self.exit_layers)
        self.feature_classifiers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.LeakyReLU(self.config.leaky_slope),
                                torch.nn.Linear(hidden, 1))
            for _ in self.exit_layers)
        dtype = next(backend.language_model.parameters()).dtype
        self.feature_classifiers.to(dtype)
        for module in (self.exit_transformers, self.feature_classifiers):
            module.requires_grad_(False)
            module.eval()

    # -- inference -------------------------------------------------------------------------
    def exit_modules(self):
        return self.exit_transformers

    def exit_attention_layer(self, exit_index):
        return self.exit_transformers[exit_index]

    def should_exit(self, exit_index, view, context):
        # the paper's rule needs the exit transformer and the head for every row present; a
        # gate (earlyexit.core.gates) decides from the hidden state instead and runs them for leavers
        return view.logits().float().softmax(-1).amax(-1) >= self.config.threshold

    # -- training ----------------------------------------------------------------------------
    def training_modules(self) -> dict:
        """The players, one optimiser each: exit transformers and feature classifiers."""
        modules = {"generator": self.exit_transformers}
        if self.config.adversarial:
            modules["discriminator"] = self.feature_classifiers
        return modules

    def training_data(self, dataset, progress=True):
        """References (supervised), the backbone's own greedy outputs (distill: no labels, on every
        task: captions, VQA answers, VisDial answers), or CapFilt's sampled captions filtered by an
        image-text scorer."""
        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.training import exits as data

        if self.config.mode == "distill":
            dataset = data.with_own_targets(dataset, data.backbone_captions(self.backend, dataset, progress=progress))
        elif task_of(dataset).outputs == "captions" and self.config.mode == "capfilt":
            config = self.config
            candidates = data.backbone_captions(self.backend, dataset, samples_per_image=config.capfilt_samples,
                                                progress=progress)
            dataset = data.capfilt(dataset, candidates, data.make_scorer(config.capfilt_scorer, self.backend),
                                   config.capfilt_keep)
        return super().training_data(dataset, progress)

    def training_step(self, batch, engine, held_out=None) -> dict:
        """One alternating step: the feature classifiers first, then the exit transformers. Both
        players see states from the same point of the network: the residual stream before the
        final norm, after the last layer (real) and after each exit transformer (fake)."""
        import torch.nn.functional as F

        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.training.features import backbone_features

        features = backbone_features(self.backend, batch)
        where = features.targets != -100  # positions that predict a reference (or sampled) token
        real = features.hidden[-1][:, :-1][where]
        fakes = [out[:, :-1][where] for out in self.teacher_forced_states(features)]
        losses = {}
        if self.config.adversarial:
            loss_fc = sum(feature_classifier_loss(d(real), d(fake.detach()))
                          for d, fake in zip(self.feature_classifiers, fakes))
            losses["fc"] = engine.optimize("discriminator", loss_fc)
        # the generator's loss runs through the classifiers: freeze them so no engine (DeepSpeed
        # hooks included) ever sees gradients for them from this step
        self.feature_classifiers.requires_grad_(False)
        total, parts = 0.0, {"adv": 0.0, "ce": 0.0, "kd": 0.0}
        final_logits = features.final_logits_at(where)
        for d, fake in zip(self.feature_classifiers, fakes):
            logits = self.backend.logits(fake)
            if self.config.adversarial:
                adv = self.config.adversarial_weight * generator_adversarial_loss(d(fake))
                total, parts["adv"] = total + adv, parts["adv"] + adv.item()
            if self.config.ce:
                ce = F.cross_entropy(logits.float(), features.targets[where])
                total, parts["ce"] = total + ce, parts["ce"] + ce.item()
            if self.config.kd:
                kd = distillation_loss(logits, final_logits, self.config.kd_direction)
                total, parts["kd"] = total + kd, parts["kd"] + kd.item()
        losses["gen"] = engine.optimize("generator", total)
        self.feature_classifiers.requires_grad_(self.config.adversarial)
        losses.update({k: v for k, v in parts.items() if v})
        return losses


@hookimpl
def earlyexit_register_strategies():
    return [FreeStrategy]
