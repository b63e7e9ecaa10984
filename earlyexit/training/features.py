"""Frozen-backbone features for exit training and teacher-forced measurements: every depth's
hidden states over whole sequences, and a cache that keeps them across epochs."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Callable

import numpy as np
import torch

from earlyexit.data import Dataset
from earlyexit.data.tasks import task_of
from earlyexit.errors import ConfigError
from earlyexit.training.batching import TrainingBatches
from earlyexit.util.devices import available_memory_bytes


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
    epoch. Features are kept in memory (where the model is) for as many batches as fit in
    `budget_bytes`; the others are written once to `spill_dir` (`spill_bytes` at most) and read
    back, memory-mapped, when they come up again; what fits nowhere is computed again. Exact
    either way: the backbone is frozen and a spilled tensor reads back bit for bit. `shard`
    takes this process's rows of a batch (data-parallel training). `close()` deletes the spill.
    """

    def __init__(self, backend, batches: Callable[[int], dict], num_items: int, batch_size: int, depths,
                 budget_bytes: int, seed: int = 0, spill_dir: str | None = None, spill_bytes: int = 0,
                 shard: Callable[[dict], dict] | None = None):
        self.backend, self.batches, self.depths, self.seed = backend, batches, list(depths), seed
        self.num_batches = max(1, math.ceil(num_items / batch_size))
        self.budget, self.used = budget_bytes, 0
        self.kept: dict[int, BackboneFeatures] = {}
        self.spilled: dict[int, BackboneFeatures] = {}  # hidden states on disk, the small rest here
        self.spill_dir, self.spill_room = spill_dir, spill_bytes if spill_dir else 0
        self.shard = shard or (lambda batch: batch)
        self.computed = self.reused = self.read_back = 0
        if self.spill_room:
            shutil.rmtree(spill_dir, ignore_errors=True)  # an interrupted run's files are not trusted
            os.makedirs(spill_dir)

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
        if index in self.spilled:
            self.read_back += 1
            return {FEATURES: self._read(index)}
        with torch.no_grad():
            features = backbone_features(self.backend, self.shard(self.batches(index))).slim(self.depths)
        self.computed += 1
        if self.used + features.nbytes() <= self.budget:
            self.kept[index] = features
            self.used += features.nbytes()
        elif features.nbytes() <= self.spill_room:
            self._write(index, features)
        return {FEATURES: features}

    def _path(self, index: int) -> str:
        return os.path.join(self.spill_dir, f"batch-{index}.safetensors")

    def _write(self, index: int, features: BackboneFeatures) -> None:
        from safetensors.torch import save_file

        save_file({str(k): h.contiguous().cpu() for k, h in enumerate(features.hidden) if h is not None},
                  self._path(index))
        self.spilled[index] = dataclasses.replace(features, hidden=[None] * len(features.hidden))
        self.spill_room -= features.nbytes()

    def _read(self, index: int) -> BackboneFeatures:
        from safetensors.torch import load_file

        skeleton = self.spilled[index]
        stored = load_file(self._path(index), device=str(skeleton.targets.device))  # memory-mapped
        return dataclasses.replace(skeleton, hidden=[stored.get(str(k)) for k in range(len(skeleton.hidden))])

    def close(self) -> None:
        """Delete the spilled features (the cache serves nothing from disk afterwards)."""
        self.spilled.clear()
        if self.spill_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def _gib_setting(name: str, example: str) -> int | None:
    setting = os.environ.get(name)
    if setting is None:
        return None
    try:
        return max(0, int(float(setting) * 2**30))
    except ValueError:
        raise ConfigError(f"{name}={setting!r} is not a number of GiB (e.g. {example})") from None


def feature_cache_budget(device=None) -> int:
    """Bytes of features the cache may hold in memory, where the model runs:
    EARLYEXIT_FEATURE_CACHE_GB (0 turns the cache off), default a quarter of the memory still
    free on `device` (the GPU's, by torch.cuda.mem_get_info, on CUDA; the host's otherwise), at
    most 8 GiB."""
    setting = _gib_setting("EARLYEXIT_FEATURE_CACHE_GB", "4, or 0 for no cache")
    if setting is not None:
        return setting
    memory = available_memory_bytes(str(device) if device is not None else None) or 8 * 2**30
    return min(8 * 2**30, memory // 4)


def feature_spill_budget(folder: str) -> int:
    """Bytes of features the cache may write to disk under `folder`: EARLYEXIT_FEATURE_SPILL_GB
    (0: never spill, recompute instead), default half the free space of that disk."""
    setting = _gib_setting("EARLYEXIT_FEATURE_SPILL_GB", "100, or 0 to recompute instead of spilling")
    if setting is not None:
        return setting
    existing = folder
    while existing and not os.path.isdir(existing):  # the output folder may not exist yet
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing or ".").free // 2


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
