"""earlyexit: early-exit generation for vision-language models.

Kept import-light on purpose: `earlyexit list` and `--help` must not import torch.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("earlyexit")
"""Marker for plugin hook implementations: ``@earlyexit.hookimpl``."""
