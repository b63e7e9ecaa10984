"""`confidence`: the untrained ("vanilla") exit of the paper.

At every exit layer the backbone's own final norm and LM head read the hidden state; a row
leaves when its top softmax probability reaches `threshold`. Nothing is trained, so this is the
baseline that shows how good intermediate layers are with the shared head alone.
"""

from __future__ import annotations

import dataclasses

from earlyexit import hookimpl
from earlyexit.core.strategy import Strategy, StrategyConfig, config_field
from earlyexit.errors import ConfigError


@dataclasses.dataclass
class ConfidenceConfig(StrategyConfig):
    threshold: float = config_field(0.9, "exit when the top softmax probability is at least this (0-1; "
                                         "above 1 never exits)")

    def __post_init__(self):
        if not 0.0 <= self.threshold:
            raise ConfigError(f"threshold must be >= 0 (got {self.threshold}); e.g. --threshold 0.9")


class ConfidenceStrategy(Strategy):
    name = "confidence"
    description = "untrained exits: the frozen final norm + LM head at each exit, leave when max softmax >= threshold"
    Config = ConfidenceConfig
    knob_is_confidence = True

    def should_exit(self, exit_index, view, context):
        return view.logits().float().softmax(-1).amax(-1) >= self.config.threshold


@hookimpl
def earlyexit_register_strategies():
    return [ConfidenceStrategy]
