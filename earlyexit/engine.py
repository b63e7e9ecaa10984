"""Deprecated path: moved to `earlyexit.core.engine` (plugins written against the old layout keep working)."""

import earlyexit.core.engine as _new
from earlyexit.util.moved import forwarding

__getattr__ = forwarding(__name__, _new)
