"""Frozen-backbone features for exit training and teacher-forced measurements: every depth's
hidden states over whole sequences, and a cache that keeps them across epochs."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import numpy as np
import torch

from earlyexit.data import Dataset
from earlyexit.data.tasks import task_of
from earlyexit.errors import ConfigError
from earlyexit.training.batching import TrainingBatches
from earlyexit.util.devices import host_memory_bytes


@dataclasses.dataclass
class BackboneFeatures:
    hidden: list  # hidden[k]: the residual stream after k decoder layers (hidden[0]: embeddings); None where not kept
    mask: object  # what whole-sequence `run_layer` calls take as attention_mask (causal + padding)
    positions: torch.Tensor
    targets: torch.Tensor  # labels shifted: targets[:, t] is the token position t predicts
    read_out: Callable  # the backbone's final norm + head (`backend.logits`)
    stored_final_logits: torch.Tensor | None = None

    @property
    def final_logits(self) -> torch.Tensor:
        """backend.logits(hidden[-1]): the full model's read-out at every position."""
        if self.stored_final_logits is None:
            with torch.no_grad():
                return self.read_out(self.hidden[-1])
        return self.stored_final_logits

    def final_logits_at(self, where: torch.Tensor) -> torch.Tensor:
        """The full model's logits at the target positions only (rows, vocab): all a loss needs,
        without the read-out of every prompt position when the features were kept slim."""
        if self.stored_final_logits is not None:
            return self.stored_final_logits[:, :-1][where]
        with torch.no_grad():
            return self.read_out(self.hidden[-1][:, :-1][where])

    def slim(self, depths) -> "BackboneFeatures":
        """A detached copy that keeps only the states at `depths` and the last one, and no logits:
        what a feature cache holds (the full logits would be vocabulary-sized per position)."""
        keep = set(depths) | {len(self.hidden) - 1}
        hidden = [h.detach() if k in keep else None for k, h in enumerate(self.hidden)]
        return dataclasses.replace(self, hidden=hidden, stored_final_logits=None)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden if h is not None)


def backbone_features(backend, batch: dict, layers=None) -> BackboneFeatures:
    """Every depth's hidden states over whole sequences, run layer by layer so that all of them,
    the last included, come from the same point of the network: the residual stream *before*
    the final norm (transformers' `hidden_states[-1]` is taken after it). An exit's state and
    the last layer's are then like with like. `layers`: the decoder layers to run (a strategy's
    trainable copies; gradients flow through them when they require grad); default the
    backbone's own, frozen. A batch that carries its features precomputed (`FEATURES`, set by
    the trainer's feature cache) returns them."""
    if FEATURES in batch:
        return batch[FEATURES]
    layers = list(layers if layers is not None else backend.decoder_layers())
    trainable = torch.is_grad_enabled() and any(p.requires_grad for layer in layers for p in layer.parameters())
    with torch.no_grad():
        hidden, mask, positions, targets = backend.teacher_forcing_inputs(batch, layers)
    with torch.set_grad_enabled(trainable):
        states = [hidden]
        for layer in layers:
            hidden = backend.run_layer(layer, hidden, attention_mask=mask, position_ids=positions, cache=None)
            states.append(hidden)
        final_logits = backend.logits(hidden)
    return BackboneFeatures(hidden=states, mask=mask, positions=positions, targets=targets, read_out=backend.logits,
                            stored_final_logits=final_logits)


FEATURES = "backbone_features"  # key of a training batch that carries its frozen-backbone features


class FeatureCache:
    """Training batches for a strategy that reads only the frozen backbone's features: each
    batch's features are computed once and reused in every later epoch, so an epoch costs the
    exit modules' passes, not the backbone's (on SmolLM2-135M, about a tenth).

    The first epoch visits the batches of `batches` in order; later epochs visit the same
    batches in an order fixed by (seed, epoch), so batch compositions stay those of the first
    epoch. Features are kept for as many batches as fit in `budget_bytes`; the others are
    computed again whenever they come up (exact either way: the backbone is frozen).
    """

    def __init__(self, backend, batches: Callable[[int], dict], num_items: int, batch_size: int, depths,
                 budget_bytes: int, seed: int = 0):
        self.backend, self.batches, self.depths, self.seed = backend, batches, list(depths), seed
        self.num_batches = max(1, math.ceil(num_items / batch_size))
        self.budget, self.used = budget_bytes, 0
        self.kept: dict[int, BackboneFeatures] = {}
        self.computed = self.reused = 0

    def batch_index(self, step: int) -> int:
        epoch, index = divmod(step, self.num_batches)
        if epoch == 0:
            return index
        return int(np.random.default_rng([self.seed, epoch, 11]).permutation(self.num_batches)[index])

    def __call__(self, step: int) -> dict:
        index = self.batch_index(step)
        if index in self.kept:
            self.reused += 1
            return {FEATURES: self.kept[index]}
        with torch.no_grad():
            features = backbone_features(self.backend, self.batches(index)).slim(self.depths)
        self.computed += 1
        if self.used + features.nbytes() <= self.budget:
            self.kept[index] = features
            self.used += features.nbytes()
        return {FEATURES: features}


def feature_cache_budget() -> int:
    """Bytes the feature cache may hold: EARLYEXIT_FEATURE_CACHE_GB (0 turns it off), default a
    quarter of the machine's memory, at most 8 GiB."""
    setting = os.environ.get("EARLYEXIT_FEATURE_CACHE_GB")
    if setting is not None:
        try:
            return int(float(setting) * 2**30)
        except ValueError:
            raise ConfigError(f"EARLYEXIT_FEATURE_CACHE_GB={setting!r} is not a number of GiB (e.g. 4, or 0 for "
                              "no cache)") from None
    memory = host_memory_bytes() or 8 * 2**30
    return min(8 * 2**30, memory // 4)


@torch.no_grad()
def teacher_forced_features(backend, dataset: Dataset, limit: int | None = 200, batch_size: int = 32, layers=None):
    """`exit_training.BackboneFeatures` of every batch of references (captions or answers)."""
    dataset = dataset.subset(limit)
    batches = TrainingBatches(backend, [dataset], batch_size=batch_size, seed=0)
    task = task_of(dataset)
    for start in range(0, len(dataset), batch_size):
        samples = dataset.samples[start:start + batch_size]
        targets = [task.target(s) for s in samples]
        prompts = [batches.prompt(s, task, target) for s, target in zip(samples, targets)]
        rows = [batches.encode(prompt, target) for prompt, target in zip(prompts, targets)]
        batch = batches.collate(rows, batches.pixels[batches.pixel_row[0][start:start + len(samples)]], prompts)
        yield backbone_features(backend, batch, layers)
