"""`fixed`: every token leaves at one given layer (optionally only every n-th token).

Not a method for quality: it scripts an exit pattern, to measure what a given depth costs and
to exercise the cache policies deterministically.
"""

from __future__ import annotations

import dataclasses

from earlyexit import hookimpl
from earlyexit.core.strategy import Strategy, StrategyConfig, config_field
from earlyexit.errors import ConfigError


@dataclasses.dataclass
class FixedConfig(StrategyConfig):
    every: int = config_field(1, "exit on tokens 0, n, 2n, ... (1 = every token); the rest run at full depth")

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"every must be a positive integer (got {self.every})")


class FixedStrategy(Strategy):
    name = "fixed"
    description = "always exit at the first exit layer (optionally on every n-th token); for cost measurements"
    Config = FixedConfig
    knob = None  # scripted: nothing to calibrate

    @classmethod
    def default_exit_layers(cls, num_layers):
        return [max(1, num_layers // 2)]

    def __init__(self, backend, exit_layers, config=None):
        super().__init__(backend, exit_layers, config)
        if len(self.exit_layers) != 1:
            raise ConfigError(f"the fixed strategy exits at exactly one layer; got {self.exit_layers} "
                              "(pass e.g. --exit-layers 4)")

    def should_exit(self, exit_index, view, context):
        # decided on the host for every row present: no read-out, and nothing for the engine to read back
        return context.step % self.config.every == 0


@hookimpl
def earlyexit_register_strategies():
    return [FixedStrategy]
