"""The backbone fingerprint: exact integer checksums computed where the weights live, once per
model, again only after a weight changed."""

from __future__ import annotations

import numpy as np
import torch
from helpers import make_backend

from earlyexit.models import adapters
from earlyexit.models.adapters import backbone_fingerprint


def reference_checksums(tensor: torch.Tensor) -> tuple[int, int]:
    """The checksums worked in numpy: bits as int32, sums mod 2^32 (one chunk: weights 1, odd)."""
    bits = tensor.detach().reshape(-1).view(torch.int16 if tensor.element_size() == 2 else torch.int32)
    values = bits.numpy().astype(np.int64)
    weights = (np.arange(values.size, dtype=np.int64) * adapters._GOLDEN) % 2**32 | 1
    wrap = lambda v: int((v + 2**31) % 2**32 - 2**31)  # noqa: E731 - signed int32 as torch reports it
    return wrap(int(values.sum())), wrap(int((values * weights % 2**32).sum()))


def test_checksums_equal_the_numpy_reference():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 13, generator=generator), torch.randn(300, generator=generator).to(torch.bfloat16)]
    assert adapters._weight_checksums(tensors) == [reference_checksums(t) for t in tensors]


def test_computed_once_per_model_until_a_weight_changes(monkeypatch):
    backend = make_backend(seed=3, num_layers=4)
    calls = []
    original = adapters._weight_checksums
    monkeypatch.setattr(adapters, "_weight_checksums", lambda tensors: calls.append(1) or original(tensors))
    first = backbone_fingerprint(backend)
    assert backbone_fingerprint(backend) == first and len(calls) == 1  # reused: nothing hashed again
    with torch.no_grad():
        backend.model.vision_model.embeddings.patch_embedding.weight[0, 0, 0, 0] *= 2  # the vision tower
    changed = backbone_fingerprint(backend)
    assert changed != first and len(calls) == 2
    with torch.no_grad():
        backend.model.vision_model.embeddings.patch_embedding.weight[0, 0, 0, 0] /= 2
    assert backbone_fingerprint(backend) == first  # the same weights again: the same fingerprint


def test_swapping_two_weights_changes_the_fingerprint():
    backend = make_backend(seed=3, num_layers=4)
    before = backbone_fingerprint(backend)
    weight = backend.decoder_layers()[2].fc2.weight
    with torch.no_grad():
        weight[0, 0], weight[0, 1] = weight[0, 1].clone(), weight[0, 0].clone()  # the plain sum stays
    assert backbone_fingerprint(backend) != before


def test_the_cache_does_not_keep_a_model_alive():
    backend = make_backend(seed=3, num_layers=2)
    backbone_fingerprint(backend)
    count = len(adapters._FINGERPRINTS)
    del backend
    import gc

    gc.collect()
    assert len(adapters._FINGERPRINTS) == count - 1
