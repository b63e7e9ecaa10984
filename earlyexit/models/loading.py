"""Loading a `--model`: an embedded model by name (`tiny`, `smol`: built on first use), the
untrained `tiny-random`, a folder written by `save_pretrained`, or a hub id."""

from __future__ import annotations

from earlyexit.core.backend import Backend
from earlyexit.models import embedded


def load_backend(backend: type[Backend], model: str, device: str | None = None, dtype: str | None = None) -> Backend:
    """`backend` (a registered Backend class) loaded from `model`. An embedded model's name is
    resolved to its built folder (built first if needed); one that runs on another family is a
    ConfigError that names the right `--backend`."""
    return backend.load(embedded.resolve(model, backend.name), device=device, dtype=dtype)
