"""Deprecated path: moved to `earlyexit.training.exits` (plugins written against the old layout keep working)."""

import earlyexit.training.exits as _new
from earlyexit.util.moved import forwarding

__getattr__ = forwarding(__name__, _new)
