"""Exit training on a frozen backbone: data preparation (references, the backbone's own
captions, CapFilt), backbone features, and the driver around `training.train`.

The strategy supplies `training_groups()` (named parameter groups, one optimiser each) and
`training_step(batch, engine)`; this module never looks inside a strategy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import torch

from earlyexit.core.generation import decode_new_tokens
from earlyexit.core.model_folder import hub_offline
from earlyexit.data import Dataset, Sample
from earlyexit.data.tasks import task_of
from earlyexit.errors import ConfigError, ModelNotAvailableError
from earlyexit.training.batching import TrainingBatches
from earlyexit.training.deepspeed import DeepSpeedEngine
from earlyexit.training.engines import TrainingEngine
from earlyexit.training.features import (FeatureCache, backbone_features,
                                         feature_cache_budget,
                                         feature_spill_budget)
from earlyexit.training.loop import (STATE_FILE, PlainEngine, TrainConfig,
                                     latest_checkpoint, train)
from earlyexit.training.prefetch import HostSide, Prefetcher
from earlyexit.util.progress import progress_bar
from earlyexit.util.ranks import (join_process_group, launched_world_size,
                                  process_group)


def all_ranks(value, world: int) -> list:
    """Every rank's `value` on every rank, in rank order (pickled: plain Python only)."""
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def shared_work(items: list, work: Callable[[list, int], list], piece: int, desc: str = "",
                progress: bool = True) -> list:
    """`work(items[k*piece:(k+1)*piece], k)` for every piece k, one result per item, returned in the
    order of `items`. Under several processes each rank works on pieces rank, rank + world, ... and
    the results are gathered on every rank: the pieces are the ones one process makes, so every
    rank gets what one process would (exactly, for a `work` that depends on its piece alone)."""
    rank, world = process_group()
    starts = range(0, len(items), piece)
    mine = {}
    with progress_bar(total=len(range(rank, len(starts), world)), desc=desc,
                      disable=not (progress and rank == 0)) as bar:
        for k in range(rank, len(starts), world):
            mine[k] = work(items[starts[k]:starts[k] + piece], k)
            bar.update(1)
    done = {k: results for part in all_ranks(mine, world) for k, results in part.items()}
    return [result for k in range(len(starts)) for result in done[k]]


def backbone_captions(backend, dataset: Dataset, samples_per_image: int = 1, batch_size: int = 32,
                      seed: int = 0, progress: bool = True, max_new_tokens: int = 20) -> dict[str, list[str]]:
    """What the backbone writes itself after each sample's prompt (captioning: none; VQA: the
    question; a VisDial round: its dialog, with the history that fits the context): greedy (1 per
    sample) or sampled (several; seeded per batch, so as many processes sample what one does), by
    sample id. Several processes share the batches (`shared_work`)."""
    task = task_of(dataset)
    sampling = samples_per_image > 1

    @torch.no_grad()
    def write(batch: list[Sample], index: int) -> list[list[str]]:
        torch.manual_seed(seed * 1_000_003 + index)
        inputs = backend.prepare_inputs([s.load_image() for s in batch],
                                        [task.prompt(s, backend, room=max_new_tokens) for s in batch])
        sequences = backend.plain_generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sampling,
                                           top_p=0.9 if sampling else None, num_return_sequences=samples_per_image)
        texts = decode_new_tokens(backend, sequences, inputs["input_ids"].shape[1])
        return [texts[i * samples_per_image:(i + 1) * samples_per_image] for i in range(len(batch))]

    outputs = shared_work(dataset.samples, write, batch_size, "backbone outputs", progress)
    return {sample.id: texts for sample, texts in zip(dataset.samples, outputs)}


def with_own_targets(dataset: Dataset, outputs: dict[str, list[str]]) -> Dataset:
    """`dataset` with the backbone's own outputs in place of the references (captions) or answers
    (VQA, VisDial): what exits learn from when no label may be used. Samples the backbone wrote
    nothing for are dropped."""
    key = task_of(dataset).outputs
    samples = [dataclasses.replace(s, **{key: [t for t in outputs[s.id] if t]}) for s in dataset]
    return dataclasses.replace(dataset, samples=[s for s in samples if getattr(s, key)])


def capfilt(dataset: Dataset, candidates: dict[str, list[str]], scorer: Callable, keep: int,
            images_per_call: int = 16, progress: bool = False) -> Dataset:
    """Keep, per image, the `keep` candidate captions the image-text scorer ranks highest.
    `scorer(sample, texts)` scores one image's texts; a scorer with `many(samples, texts_per_sample)`
    is given `images_per_call` images at once. Several processes share the images (`shared_work`)."""
    distinct = [list(dict.fromkeys(t for t in candidates[s.id] if t)) for s in dataset]  # non-empty, once each
    pairs = [(s, texts) for s, texts in zip(dataset.samples, distinct) if texts]

    def best(piece: list, index: int) -> list[list[str]]:
        samples, texts = [s for s, _ in piece], [t for _, t in piece]
        scores = scorer.many(samples, texts) if hasattr(scorer, "many") else [scorer(*p) for p in piece]
        return [[t[i] for i in sorted(range(len(t)), key=lambda i: -float(s[i]))[:keep]]
                for t, s in zip(texts, scores)]

    kept = shared_work(pairs, best, images_per_call, "CapFilt scoring", progress)
    samples = [dataclasses.replace(s, captions=captions) for (s, _), captions in zip(pairs, kept)]
    return dataclasses.replace(dataset, samples=samples)


class ClipScorer:
    """CLIP image-text similarity (logits_per_image) on `device`: `many` scores several images'
    texts in one forward (each image and text encoded once)."""

    def __init__(self, model, processor, device):
        self.model, self.processor, self.device = model.to(device), processor, device

    def __call__(self, sample: Sample, texts: list[str]) -> list[float]:
        return self.many([sample], [texts])[0]

    @torch.no_grad()
    def many(self, samples: list[Sample], texts: list[list[str]]) -> list[list[float]]:
        flat = [t for own in texts for t in own]
        inputs = self.processor(text=flat, images=[s.load_image() for s in samples], return_tensors="pt",
                                padding=True).to(self.device)
        logits = self.model(**inputs).logits_per_image.float().cpu()  # (images, every text): one read-back
        ends = torch.tensor([len(own) for own in texts]).cumsum(0).tolist()
        return [logits[i, end - len(own):end].tolist() for i, (own, end) in enumerate(zip(texts, ends))]


def make_scorer(spec: str, backend) -> Callable:
    """`clip:FOLDER_OR_HUB_ID` (CLIP image-text similarity, on the backbone's device) or `backbone`
    (offline fallback: the backbone's mean log-likelihood of the caption given the image)."""
    if spec.startswith("clip:"):
        from transformers import CLIPModel, CLIPProcessor

        name = spec[len("clip:"):]
        try:
            model = CLIPModel.from_pretrained(name, local_files_only=hub_offline()).eval()
            processor = CLIPProcessor.from_pretrained(name, local_files_only=hub_offline())
        except OSError as error:
            raise ModelNotAvailableError(f"CLIP model {name!r} is not available offline; pass a local folder "
                                         "(clip:/path/to/clip-vit-large-patch14) or capfilt_scorer=backbone") from error
        return ClipScorer(model, processor, backend.device if backend is not None else torch.device("cpu"))
    if spec == "backbone":
        return lambda sample, texts: caption_log_likelihood(backend, sample, texts)
    raise ConfigError(f"unknown CapFilt scorer {spec!r}; use clip:FOLDER_OR_HUB_ID or backbone")


@torch.no_grad()
def caption_log_likelihood(backend, sample: Sample, texts: list[str]) -> list[float]:
    batches = TrainingBatches(backend, [Dataset("one", "caption", "x", [sample])], batch_size=1)
    rows = [batches.encode("", text) for text in texts]
    batch = batches.collate(rows, batches.pixels[[0] * len(texts)], [""] * len(texts))
    features = backbone_features(backend, batch)  # the family's own alignment of logits and targets
    logits, targets = features.final_logits[:, :-1], features.targets
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    where = targets != -100
    return ((log_probs * where).sum(-1) / where.sum(-1)).tolist()


HELD_OUT = "held_out."


def split_held_out(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """(training part, held-out part): a fixed random `fraction` of the images kept aside."""
    if fraction <= 0:
        return dataset, None
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(dataset))
    cut = max(1, round(fraction * len(dataset)))
    if cut >= len(dataset):
        raise ConfigError(f"the exit-training split has {len(dataset)} samples: too few to hold {fraction:.0%} out")
    held = set(order[:cut].tolist())
    keep = [s for i, s in enumerate(dataset.samples) if i not in held]
    aside = [s for i, s in enumerate(dataset.samples) if i in held]
    return dataclasses.replace(dataset, samples=keep), dataclasses.replace(dataset, samples=aside)


def interrupted_training(output_dir: str, config: TrainConfig, world_size: int = 1) -> tuple[str, str]:
    """What an earlier, interrupted training left in `output_dir`, judged against `config`:
    ("none", ""), ("resume", how: its newest complete checkpoint fits `config` and `world_size`
    processes, so `train` resumes from it) or ("stale", why not)."""
    if not os.path.isdir(output_dir):
        return "none", ""
    folder = latest_checkpoint(output_dir)
    if folder is None:
        return "stale", "it holds no complete checkpoint"
    try:
        with open(os.path.join(folder, STATE_FILE)) as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return "stale", f"{os.path.basename(folder)} cannot be read"
    if state.get("schedule") != config.schedule_key():
        return "stale", f"{os.path.basename(folder)} was written with other settings ({state.get('schedule')})"
    if state.get("world_size", 1) != world_size:
        return "stale", f"{os.path.basename(folder)} was written by {state.get('world_size', 1)} processes"
    return "resume", f"from its checkpoint at step {state['step']} of {config.steps}"


def train_exits(strategy, backend, dataset: Dataset, output_dir: str, seed: int = 0, progress: bool = True,
                engine=None, deepspeed_config: dict | None = None, on_log=None,
                before_training: Callable[[TrainConfig, int], None] | None = None) -> list[dict]:
    """Train what the strategy declares (`training_modules`) on `dataset`, everything else of
    the backbone frozen; with a `deepspeed_config`, DeepSpeed ZeRO runs the optimisation (one
    engine per group). Held-out data (`strategy.held_out_fraction`) is split off by image first.
    A strategy that `reuses_backbone_features` trains on a `FeatureCache` (without DeepSpeed).
    Without a DeepSpeed config the engine is a `TrainingEngine`: fp32 master weights, fp16 loss
    scaling, and data parallel when several processes run.
    `before_training(config, world_size)` is called once the training's settings and engine are
    known, before it resumes from or writes to `output_dir` (to judge what an interrupted training
    left there: `interrupted_training`)."""
    modules = strategy.training_modules()
    if not modules:
        raise ConfigError(f"strategy {strategy.name!r} has nothing to train")
    join_process_group(backend.device)  # before `training_data`, so that ranks share its generation
    backend.model.requires_grad_(False)
    for module in modules.values():
        module.requires_grad_(True)
    train_part, held_part = split_held_out(dataset, strategy.held_out_fraction, seed)
    data = strategy.training_data(train_part, progress=progress)
    config = strategy.config
    host = HostSide(backend)  # batches built on the host; the prefetcher moves them to the model
    batches = TrainingBatches(host, [data], batch_size=config.batch_size, seed=seed)
    held_batches = None
    if held_part is not None:
        held_batches = TrainingBatches(host, [strategy.training_data(held_part, progress=progress)],
                                       batch_size=config.batch_size, seed=seed + 1)
    steps = max(1, math.ceil(config.epochs * len(batches.items) / config.batch_size))
    train_config = TrainConfig(output_dir=output_dir, steps=steps, learning_rate=config.learning_rate,
                               warmup_steps=min(50, steps // 10), weight_decay=0.0, seed=seed,
                               checkpoint_every=max(1, steps // 4), progress=progress)
    if engine is None and deepspeed_config is not None:
        engine = DeepSpeedEngine(modules, train_config, {**deepspeed_config, "train_micro_batch_size_per_gpu": max(
            1, config.batch_size // launched_world_size())})
    engine = engine or TrainingEngine(strategy.training_groups(), train_config)
    if before_training is not None:
        before_training(train_config, getattr(engine, "world_size", 1))
    container = torch.nn.ModuleList(modules.values())
    build = batches if held_batches is None else with_held_out(batches, held_batches)
    budget = feature_cache_budget(backend.device)
    if strategy.reuses_backbone_features and held_batches is None and isinstance(engine, PlainEngine) and budget:
        # the cache asks for each batch once, in order, in the first epoch: prefetch those
        prefetcher = Prefetcher(build, backend, stop=min(steps, math.ceil(len(batches.items) / config.batch_size)))
        batch_for_step = feature_cache(backend, prefetcher, len(batches.items), strategy, engine, budget,
                                       output_dir, seed)
    else:
        batch_for_step = prefetcher = Prefetcher(build, backend, stop=steps)

    def step(batch, engine):
        held = {k[len(HELD_OUT):]: batch.pop(k) for k in [k for k in batch if k.startswith(HELD_OUT)]}
        if not held:
            return strategy.training_step(batch, engine)
        return strategy.training_step(batch, engine, held_out=held)

    try:
        losses = train(container, step, batch_for_step, train_config, engine, on_log=on_log)
    finally:  # the thread ends with the training, finished or failed
        prefetcher.close()
        if isinstance(batch_for_step, FeatureCache):
            batch_for_step.close()
    if getattr(engine, "stage", 0) == 3:
        adopt_consolidated(strategy, {group: engine.consolidated_state(group) for group in engine.modules})
    for module in strategy.training_modules().values():
        module.requires_grad_(False)
    return losses


def with_held_out(batches: TrainingBatches, held_batches: TrainingBatches) -> Callable[[int], dict]:
    """Each step's training and held-out batches as one flat dict (held-out keys prefixed), so that
    data-parallel sharding splits both alike."""
    def build(step: int) -> dict:
        return {**batches(step), **{HELD_OUT + k: v for k, v in held_batches(step).items()}}

    return build


def feature_cache(backend, batches: Callable[[int], dict], num_items: int, strategy, engine, budget: int,
                  output_dir: str, seed: int) -> FeatureCache:
    """The frozen backbone's features of each batch (this rank's rows), kept in memory up to
    `budget` bytes and spilled beyond it to a folder of `output_dir` (one per rank)."""
    spill_dir = os.path.join(output_dir, f"features-rank{getattr(engine, 'rank', 0)}.spill")
    return FeatureCache(backend, batches, num_items, strategy.config.batch_size, strategy.exit_layers,
                        budget, seed=seed, spill_dir=spill_dir, spill_bytes=feature_spill_budget(output_dir),
                        shard=getattr(engine, "shard", None))


def adopt_consolidated(strategy, states: dict) -> None:
    """After ZeRO-3 the trained modules hold only this rank's shards and DeepSpeed's hooks: give
    the strategy fresh modules with the gathered weights (the sharded ones are dropped)."""
    fresh = type(strategy)(strategy.backend, strategy.exit_layers, strategy.config)
    for group, module in fresh.training_modules().items():
        module.load_state_dict(states[group])
    vars(strategy).update(vars(fresh))
