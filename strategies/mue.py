"""`mue`: MuE (Tang et al., CVPR 2023, "You Need Multiple Exiting"), adapted to BLIP-2-style
decoding.

MuE exits where the hidden states saturate: a token leaves the decoder at the first layer whose
output is nearly the same as its input, measured by the cosine similarity of consecutive layers'
hidden states reaching γ; the image side likewise stops its encoder at the layer where the
image features saturate. No exit module is added (zero parameters at inference: the shared head
reads the state). To make intermediate layers readable by that head, MuE fine-tunes the model
with a layer-wise loss: the task loss of the shared head applied after every layer.

Here: exits at every decoder layer (the rule costs one cosine per row, no read-out); training
(`layerwise`, on by default) fine-tunes copies of the decoder layers with the mean over layers
k = 1..N of the cross-entropy of the frozen final norm + LM head on h_k (the last layer
included, so the full depth stays good). The copies are the strategy's adapter; the loaded
backbone stays untouched, so the `full` reference keeps its quality. On the encoder side,
`vision_gamma` stops the vision tower per image at the first layer whose patch features have a
mean cosine similarity of at least γ_v with the layer before (where the backend supports it;
the Q-Former always runs in full).

Where the paper is silent we chose: the layer-wise loss is the plain mean over layers (no
per-layer weights); the fine-tuning learning rate is 5e-5 for 2 epochs; the γ grid spans
0.90–0.999.
"""

from __future__ import annotations

import dataclasses
import math

from earlyexit import hookimpl
from earlyexit.core.strategy import Strategy, TrainableConfig, config_field
from earlyexit.errors import ConfigError


def consecutive_cosine(hidden, previous):
    """Cosine similarity of each row's state with the same position one layer earlier."""
    import torch.nn.functional as F

    return F.cosine_similarity(hidden.float(), previous.float(), dim=-1)


@dataclasses.dataclass
class MueConfig(TrainableConfig):
    gamma: float = config_field(0.99, "leave when the cosine of consecutive layers' states is at least this",
                                 low=-1)
    layerwise: bool = config_field(True, "fine-tune copies of the decoder layers with MuE's layer-wise loss "
                                         "(off: the zero-parameter rule on the backbone as it is)")
    vision_gamma: float | None = config_field(None, "stop the vision tower per image when its features' "
                                                    "layer-to-layer cosine reaches this (None: run it in full)",
                                        low=-1)
    epochs: float | None = config_field(2.0, "passes over the training captions")
    learning_rate: float = config_field(5e-5, "Adam learning rate of the decoder-layer copies")

    def __post_init__(self):
        super().__post_init__()
        for name in ("gamma", "vision_gamma"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and -1 <= value <= 1.5):
                raise ConfigError(f"{name} is a cosine similarity in [-1, 1] (got {value}); e.g. 0.99")


class MueStrategy(Strategy):
    name = "mue"
    description = "MuE: leave when consecutive layers' states saturate (cosine >= γ); layer-wise fine-tuning"
    Config = MueConfig
    knob = "gamma"
    knob_grid = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
    accepts_gate = False  # the rule is already free of read-outs

    def __init__(self, backend, exit_layers, config=None):
        import copy

        import torch

        super().__init__(backend, exit_layers, config)
        self.layers = None
        if self.config.layerwise:
            self.layers = torch.nn.ModuleList(copy.deepcopy(layer) for layer in backend.decoder_layers())
            self.layers.requires_grad_(False)
            self.layers.eval()

    @classmethod
    def default_exit_layers(cls, num_layers):
        return list(range(1, num_layers))

    def backbone_layers(self):
        return self.layers

    def training_modules(self) -> dict:
        return {"layers": self.layers} if self.layers is not None else {}

    def should_exit(self, exit_index, view, context):
        return consecutive_cosine(view.hidden, view.previous) >= self.config.gamma

    def vision_saturation(self):
        return self.config.vision_gamma

    def training_step(self, batch, engine, held_out=None) -> dict:
        import torch.nn.functional as F

        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.training.features import backbone_features

        features = backbone_features(self.backend, batch, layers=self.layers)
        where = features.targets != -100
        targets = features.targets[where]
        losses = [F.cross_entropy(self.backend.logits(h[:, :-1][where]).float(), targets)
                  for h in features.hidden[1:]]
        loss = sum(losses) / len(losses)
        return {"loss": engine.optimize("layers", loss), "ce_final": losses[-1].item(),
                **{f"ce{k}": losses[k - 1].item() for k in self.exit_layers[::max(1, len(self.exit_layers) // 3)]}}


@hookimpl
def earlyexit_register_strategies():
    return [MueStrategy]
