"""Loading a `--model`: an embedded model by name (`tiny`, `smol`: built on first use), the
untrained `tiny-random`, a folder written by `save_pretrained`, or a hub id.

A real checkpoint (REUSE_BYTES of weights or more) is loaded once per process: a bench runs
many cells on one model, and reloading 7B parameters per cell costs minutes. The last such
backend is kept and handed out again while its weights are untouched (every tensor's version
counter unchanged, same device and dtype); small models load in milliseconds and are always
loaded afresh, so no caller's changes (tokenizer settings, hooks) reach another."""

from __future__ import annotations

import os

from earlyexit.core.backend import Backend
from earlyexit.core.model_folder import loading_onto
from earlyexit.models import embedded

REUSE_BYTES = 2**30
_KEPT: dict = {}  # at most one entry, (backend, source, device, dtype) -> (Backend, weight state)


def load_backend(backend: type[Backend], model: str, device: str | None = None, dtype: str | None = None) -> Backend:
    """`backend` (a registered Backend class) loaded from `model`. An embedded model's name is
    resolved to its built folder (built first if needed); one that runs on another family is a
    ConfigError that names the right `--backend`."""
    source = embedded.resolve(model, backend.name)
    key = (backend.name, os.path.abspath(source) if os.path.isdir(source) else source, device, dtype)
    kept = _KEPT.get(key)
    if kept is not None and kept[1] == weight_state(kept[0].model):
        return kept[0]
    _KEPT.clear()  # before loading: two 7B models do not fit one GPU
    with loading_onto(device):  # straight to the device, also for backends that would load on the CPU
        loaded = backend.load(source, device=device, dtype=dtype)
    if sum(p.numel() * p.element_size() for p in loaded.model.parameters()) >= REUSE_BYTES:
        _KEPT[key] = (loaded, weight_state(loaded.model))
    return loaded


def weight_state(model) -> tuple:
    """What changes when any weight is changed in place, replaced, moved or cast."""
    tensors = list(model.state_dict(keep_vars=True).values())
    placement = (str(tensors[0].device), str(tensors[0].dtype)) if tensors else ()
    return placement, tuple((id(t), t._version) for t in tensors)
