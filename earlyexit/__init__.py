"""earlyexit: early-exit generation for vision-language models.

The public surface for plugin authors and API users is what this package exports. It stays
import-light on purpose: `earlyexit list` and `--help` must not import torch, and the two
contracts below import none at module level.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("earlyexit")
"""Marker for plugin hook implementations: ``@earlyexit.hookimpl``."""

# hookimpl first: plugin modules imported below take it from this package
from earlyexit.core.backend import Backend  # noqa: E402
from earlyexit.core.strategy import (CONTRACT_VERSION, ExitView, StepContext, Strategy, StrategyConfig, TrainableConfig,
                                     config_field)
from earlyexit.errors import CheckpointError, ConfigError, DataError, EarlyExitError, PluginError  # noqa: E402

__all__ = ["Backend", "CONTRACT_VERSION", "CheckpointError", "ConfigError", "DataError", "EarlyExitError", "ExitView",
           "PluginError", "StepContext", "Strategy", "StrategyConfig", "TrainableConfig", "__version__", "config_field",
           "hookimpl"]
