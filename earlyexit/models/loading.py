"""Loading a `--model`: an embedded model by name (`tiny`, `smol`: built on first use), the
untrained `tiny-random`, a folder written by `save_pretrained`, or a hub id.

Every call loads afresh, also a 7B checkpoint a bench's earlier cell used: a cell changes its
backbone beyond the weights (exit training turns gradients off, the engine binds modules to its
caches, a strategy may train layers in place, a family keeps state on the model), and nothing could
prove a kept backbone clean. A run loads its backbone once."""

from __future__ import annotations

from earlyexit.core.backend import Backend
from earlyexit.core.model_folder import loading_onto
from earlyexit.models import embedded


def load_backend(backend: type[Backend], model: str, device: str | None = None, dtype: str | None = None) -> Backend:
    """`backend` (a registered Backend class) loaded from `model`. An embedded model's name is
    resolved to its built folder (built first if needed); one that runs on another family is a
    ConfigError that names the right `--backend`."""
    source = embedded.resolve(model, backend.name)
    with loading_onto(device):  # straight to the device, also for backends that would load on the CPU
        return backend.load(source, device=device, dtype=dtype)
