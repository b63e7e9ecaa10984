"""Deprecated path: moved to `earlyexit.core.backend` (plugins written against the old layout keep working)."""

import earlyexit.core.backend as _new
from earlyexit.util.moved import forwarding

__getattr__ = forwarding(__name__, _new)
