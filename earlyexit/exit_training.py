"""Exit training on a frozen backbone: data preparation (references, the backbone's own
captions, CapFilt), backbone features, and the driver around `training.train`.

The strategy supplies `training_groups()` (named parameter groups, one optimiser each) and
`training_step(batch, engine)`; this module never looks inside a strategy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .batching import TrainingBatches
from .data import Dataset, Sample
from .errors import ConfigError
from .training import PlainEngine, TrainConfig, train


@dataclasses.dataclass
class BackboneFeatures:
    hidden: tuple  # hidden[k]: states after k decoder layers (hidden[0]: embeddings)
    final_logits: torch.Tensor
    mask: object  # the 4D causal + padding mask for whole-sequence layer calls
    positions: torch.Tensor
    targets: torch.Tensor  # labels shifted: targets[:, t] is the token position t predicts


@torch.no_grad()
def backbone_features(backend, batch: dict) -> BackboneFeatures:
    embeds = backend.decoder_inputs_embeds(batch["pixel_values"], batch["input_ids"])
    out = backend.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                 output_hidden_states=True)
    mask = backend.layer_mask(embeds, batch["attention_mask"], None, 0)
    return BackboneFeatures(hidden=out.hidden_states, final_logits=out.logits, mask=mask,
                            positions=backend.position_ids(batch["attention_mask"]),
                            targets=batch["labels"][:, 1:])


def one_caption_per_sample(dataset: Dataset) -> Dataset:
    """Every (image, caption) pair becomes a training item, as captioning papers count epochs."""
    samples = [dataclasses.replace(s, id=f"{s.id}#{i}", captions=[c], extra={**s.extra, "image_id": s.extra.get(
        "image_id", s.id)}) for s in dataset for i, c in enumerate(s.captions)]
    return dataclasses.replace(dataset, samples=samples)


@torch.no_grad()
def backbone_captions(backend, dataset: Dataset, samples_per_image: int = 1, batch_size: int = 32,
                      seed: int = 0, progress: bool = True) -> dict[str, list[str]]:
    """Captions the backbone writes itself: greedy (1 per image) or sampled (several)."""
    from tqdm.auto import tqdm

    from .evaluate import decode_new_tokens

    sampling = samples_per_image > 1
    torch.manual_seed(seed)
    result = {}
    for start in tqdm(range(0, len(dataset), batch_size), desc="backbone captions", disable=not progress):
        batch = dataset.samples[start:start + batch_size]
        inputs = backend.prepare_inputs([s.load_image() for s in batch], [""] * len(batch))
        sequences = backend.plain_generate(**inputs, max_new_tokens=20, do_sample=sampling, top_p=0.9 if sampling else None,
                                           num_return_sequences=samples_per_image)
        texts = decode_new_tokens(backend, sequences, inputs["input_ids"].shape[1])
        for i, sample in enumerate(batch):
            result[sample.id] = texts[i * samples_per_image:(i + 1) * samples_per_image]
    return result


def capfilt(dataset: Dataset, candidates: dict[str, list[str]], scorer: Callable, keep: int) -> Dataset:
    """Keep, per image, the `keep` candidate captions the image-text scorer ranks highest."""
    samples = []
    for sample in dataset:
        texts = list(dict.fromkeys(t for t in candidates[sample.id] if t))  # distinct, non-empty
        if not texts:
            continue
        scores = scorer(sample, texts)
        ranked = sorted(range(len(texts)), key=lambda i: -float(scores[i]))
        samples.append(dataclasses.replace(sample, captions=[texts[i] for i in ranked[:keep]]))
    return dataclasses.replace(dataset, samples=samples)


def make_scorer(spec: str, backend) -> Callable:
    """`clip:FOLDER_OR_HUB_ID` (CLIP image-text similarity) or `backbone` (offline fallback: the
    backbone's mean log-likelihood of the caption given the image)."""
    if spec.startswith("clip:"):
        from transformers import CLIPModel, CLIPProcessor

        from .backend import hub_offline
        from .errors import ModelNotAvailableError

        name = spec[len("clip:"):]
        try:
            model = CLIPModel.from_pretrained(name, local_files_only=hub_offline()).eval()
            processor = CLIPProcessor.from_pretrained(name, local_files_only=hub_offline())
        except OSError as error:
            raise ModelNotAvailableError(f"CLIP model {name!r} is not available offline; pass a local folder "
                                         "(clip:/path/to/clip-vit-large-patch14) or capfilt_scorer=backbone") from error

        @torch.no_grad()
        def clip_score(sample: Sample, texts: list[str]) -> list[float]:
            inputs = processor(text=texts, images=[sample.load_image()], return_tensors="pt", padding=True)
            return model(**inputs).logits_per_image[0].tolist()

        return clip_score
    if spec == "backbone":
        return lambda sample, texts: caption_log_likelihood(backend, sample, texts)
    raise ConfigError(f"unknown CapFilt scorer {spec!r}; use clip:FOLDER_OR_HUB_ID or backbone")


@torch.no_grad()
def caption_log_likelihood(backend, sample: Sample, texts: list[str]) -> list[float]:
    batches = TrainingBatches(backend, [Dataset("one", "caption", "x", [sample])], batch_size=1)
    rows = [batches.encode("", text) for text in texts]
    batch = batches.collate(rows, batches.pixels[[0] * len(texts)])
    labels = batch.pop("labels")
    logits = backend.model(**batch).logits[:, :-1]
    targets = labels[:, 1:]
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    where = targets != -100
    return ((log_probs * where).sum(-1) / where.sum(-1)).tolist()


def training_data(strategy, backend, dataset: Dataset, progress: bool = True) -> Dataset:
    """The captions exits train on, by the strategy's mode: references (supervised), the
    backbone's own greedy captions (distill: no labels), or CapFilt's filtered samples."""
    mode = getattr(strategy.config, "mode", "supervised")
    if dataset.task != "caption":
        return dataset
    if mode == "distill":
        captions = backbone_captions(backend, dataset, progress=progress)
        dataset = dataclasses.replace(dataset, samples=[dataclasses.replace(s, captions=captions[s.id]) for s in dataset])
    elif mode == "capfilt":
        config = strategy.config
        candidates = backbone_captions(backend, dataset, samples_per_image=config.capfilt_samples, progress=progress)
        dataset = capfilt(dataset, candidates, make_scorer(config.capfilt_scorer, backend), config.capfilt_keep)
    return one_caption_per_sample(dataset)


def train_exits(strategy, backend, dataset: Dataset, output_dir: str, seed: int = 0, progress: bool = True,
                engine=None, deepspeed_config: dict | None = None, on_log=None) -> list[dict]:
    """Train the strategy's exit modules on `dataset` with the backbone frozen; with a
    `deepspeed_config`, DeepSpeed ZeRO runs the optimisation (one engine per player)."""
    if not getattr(strategy, "needs_training", False):
        raise ConfigError(f"strategy {strategy.name!r} has nothing to train")
    backend.model.requires_grad_(False)
    data = training_data(strategy, backend, dataset, progress=progress)
    config = strategy.config
    batches = TrainingBatches(backend, [data], batch_size=config.batch_size, seed=seed)
    steps = max(1, math.ceil(config.epochs * len(batches.items) / config.batch_size))
    train_config = TrainConfig(output_dir=output_dir, steps=steps, learning_rate=config.learning_rate,
                               warmup_steps=min(50, steps // 10), weight_decay=0.0, seed=seed,
                               checkpoint_every=max(1, steps // 4), progress=progress)
    if engine is None and deepspeed_config is not None:
        from .deepspeed_config import launched_world_size
        from .distributed import DeepSpeedEngine

        engine = DeepSpeedEngine(strategy.training_modules(), train_config,
                                 {**deepspeed_config, "train_micro_batch_size_per_gpu": max(
                                     1, config.batch_size // launched_world_size())})
    engine = engine or PlainEngine(strategy.training_groups(), train_config)
    container = torch.nn.ModuleList([m for m in (strategy.exit_modules(), getattr(strategy, "feature_classifiers", None))
                                     if m is not None])
    losses = train(container, strategy.training_step, batches, train_config, engine, on_log=on_log)
    if getattr(engine, "stage", 0) == 3:
        adopt_consolidated(strategy, {group: engine.consolidated_state(group) for group in engine.modules})
    for module in (strategy.exit_modules(), getattr(strategy, "feature_classifiers", None)):
        if module is not None:
            module.requires_grad_(False)
    return losses


def adopt_consolidated(strategy, states: dict) -> None:
    """After ZeRO-3 the trained modules hold only this rank's shards and DeepSpeed's hooks: give
    the strategy fresh modules with the gathered weights (the sharded ones are dropped)."""
    fresh = type(strategy)(strategy.backend, strategy.exit_layers, strategy.config)
    for group, module in fresh.training_modules().items():
        module.load_state_dict(states[group])
    vars(strategy).update(vars(fresh))
