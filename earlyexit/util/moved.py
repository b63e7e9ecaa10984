"""Old module paths that moved: each forwards its names to the new module, with a DeprecationWarning."""

from __future__ import annotations

import warnings
from types import ModuleType


def forwarding(old: str, new: ModuleType):
    """A module-level `__getattr__` for `old`, whose names now live in `new`."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(new, name)
        warnings.warn(f"{old} is deprecated: import {name} from {new.__name__} or from earlyexit itself",
                      DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
