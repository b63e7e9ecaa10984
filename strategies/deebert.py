"""`deebert`: DeeBERT's off-ramps and entropy rule, as the FREE paper adapts them ("DeeBLIP").

DeeBERT (Xin et al., ACL 2020) puts an off-ramp classifier after every transformer layer, trains
the backbone and final classifier first, then freezes them and trains the off-ramps with the sum
of their cross-entropies; at inference a sample leaves at the first off-ramp whose prediction's
entropy is below a threshold S. The FREE paper adapts it to generation as vocabulary
classifiers at its exit layers on the frozen, fine-tuned backbone, trained with the sum of
per-exit cross-entropies; a token leaves when its exit's entropy is at most S.

Where the papers are silent we chose: exits at FREE's layers; each classifier starts as a copy
of the shared read-out (`earlyexit.strategies.classifier_exits`); S is swept on dev over a grid in nats
spanning confident (0.05) to loose (3.0) exits, since a vocabulary-sized distribution's entropy
scale differs from DeeBERT's two- or three-class tasks.
"""

from __future__ import annotations

import dataclasses
import math

from earlyexit import hookimpl
from earlyexit.core.strategy import config_field
from earlyexit.errors import ConfigError
from earlyexit.strategies.classifier_exits import ClassifierExitConfig, ClassifierExitStrategy, entropy


@dataclasses.dataclass
class DeeBertConfig(ClassifierExitConfig):
    entropy: float = config_field(0.5, "leave when the exit's entropy (nats) is at most this (calibration picks it)")

    def __post_init__(self):
        super().__post_init__()
        if not (self.entropy >= 0 and math.isfinite(self.entropy)):
            raise ConfigError(f"entropy must be a number >= 0 (got {self.entropy}); e.g. --threshold 0.5")


class DeeBertStrategy(ClassifierExitStrategy):
    name = "deebert"
    description = "DeeBERT/DeeBLIP: a vocabulary classifier per exit (sum of CEs); leave when its entropy <= S"
    Config = DeeBertConfig
    knob = "entropy"
    knob_safer = "lower"  # a lower entropy bound lets fewer tokens leave
    knob_grid = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0)

    def should_exit(self, exit_index, view, context):
        return entropy(view.logits()) <= self.config.entropy


@hookimpl
def earlyexit_register_strategies():
    return [DeeBertStrategy]
