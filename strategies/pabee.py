"""`pabee`: patience-based early exit (Zhou et al., NeurIPS 2020), adapted to generation.

PABEE attaches an internal classifier to every layer and trains them with the weighted average
Σ_j j·L_j / Σ_j j (deeper classifiers weigh more); at inference a counter rises by one at each
layer whose prediction equals the previous layer's and resets otherwise, and the sample leaves
when the counter reaches the patience t. Here a token's prediction at an exit is the argmax of
that exit's vocabulary classifier, and the counter runs across the exits of one token.

Where the papers are silent we chose: exits at FREE's layers (so with E exits t runs 1..E-1 and
the earliest possible exit is the (t+1)-th); j is the exit's position (1..E) rather than its
layer number, so the loss weighs exits as PABEE weighs layers when every layer is an exit;
each classifier starts as a copy of the shared read-out. The counter lives in the per-token
scratch (`StepContext.token`), so beam reordering between tokens cannot disturb it.
"""

from __future__ import annotations

import dataclasses

from earlyexit import hookimpl
from earlyexit.core.strategy import config_field
from earlyexit.strategies.classifier_exits import (ClassifierExitConfig, ClassifierExitStrategy, PatienceRule,
                                                   check_patience, exit_cross_entropies, weighted_average)


@dataclasses.dataclass
class PabeeConfig(ClassifierExitConfig):
    patience: int = config_field(1, "leave once this many consecutive exits agree with the one before "
                                    "(calibration picks it)")

    def __post_init__(self):
        super().__post_init__()
        check_patience(self.patience)


class PabeeStrategy(PatienceRule, ClassifierExitStrategy):
    name = "pabee"
    description = "PABEE: vocabulary classifiers trained with Σ j·L_j / Σ j; leave when t exits in a row agree"
    Config = PabeeConfig

    def classifier_loss(self, exit_logits, targets, final_logits, held_out=None):
        losses = exit_cross_entropies(exit_logits, targets)
        loss = weighted_average(losses, [j + 1 for j in range(len(losses))])
        return loss, {f"ce{k}": value.item() for k, value in zip(self.exit_layers, losses)}


@hookimpl
def earlyexit_register_strategies():
    return [PabeeStrategy]
