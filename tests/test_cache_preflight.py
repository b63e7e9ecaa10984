"""The engine's K/V pre-flight compares with the memory where the model runs: the GPU's free
memory on CUDA (the weights are already there), half the host's memory on the CPU."""

from __future__ import annotations

import pytest
import torch
from helpers import make_backend

from earlyexit.core import engine
from earlyexit.errors import ConfigError


def test_cache_check_uses_the_gpus_free_memory_and_half_the_host(monkeypatch):
    backend = make_backend(seed=0, num_layers=2)
    per_row = engine.cache_bytes_per_row(backend, 30, backend.num_layers)
    asked = []
    monkeypatch.setattr(engine, "available_memory_bytes", lambda device: asked.append(str(device)) or 10 * per_row)
    engine.check_context(backend, 10, 20, rows=5)  # half the host's memory may go to the cache
    with pytest.raises(ConfigError, match=r"more than half of this machine's .*lower --num-beams"):
        engine.check_context(backend, 10, 20, rows=6)
    monkeypatch.setattr(type(backend), "device", property(lambda self: torch.device("cuda", 1)))
    engine.check_context(backend, 10, 20, rows=10)  # all of the GPU's free memory may go to the cache
    with pytest.raises(ConfigError, match=r"more than the .* GiB free on cuda:1; lower --num-beams"):
        engine.check_context(backend, 10, 20, rows=11)
    assert asked[-1] == "cuda:1" and asked[0] == "cpu"
