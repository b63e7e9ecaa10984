"""Deprecated path: moved to `earlyexit.strategies.classifier_exits` (plugins written against the old layout keep working)."""

import earlyexit.strategies.classifier_exits as _new
from earlyexit.util.moved import forwarding

__getattr__ = forwarding(__name__, _new)
