"""The tokens the backbone itself writes most often on a split: what exits or drafts may read
out over (an exit vocabulary, a draft vocabulary), never taken from test data."""

from __future__ import annotations

from earlyexit.core.speculative import draft_vocabulary_of
from earlyexit.data.splits import load_split
from earlyexit.training.exits import backbone_captions


def backbone_vocabularies(backend, data: str, split: str, sizes, limit: int = 200, batch_size: int = 32,
                          progress: bool = True, max_new_tokens: int = 20) -> tuple:
    """For each of `sizes` (None or 0: None), that many tokens the backbone itself writes most
    often on (up to `limit` samples of) `data`/`split`: what exits or drafts read out over.
    Several processes share the generation (each rank its batches) and all get the same tokens."""
    outputs = backbone_captions(backend, load_split(data, split, limit), batch_size=batch_size, progress=progress,
                                max_new_tokens=max_new_tokens)
    texts = [t for written in outputs.values() for t in written]
    return tuple(draft_vocabulary_of(backend, texts, size) if size else None for size in sizes)
