"""The exit trainer's feature cache: frozen-backbone features computed once per batch and reused
in later epochs, with the same losses as recomputing them."""

import math

import pytest
import torch
from helpers import make_backend

from earlyexit.data.prompts import one_caption_per_sample
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.strategies.deebert import DeeBertConfig, DeeBertStrategy
from earlyexit.strategies.free import FreeConfig, FreeStrategy
from earlyexit.training.exits import train_exits
from earlyexit.training.features import FeatureCache, backbone_features

MICRO = SceneConfig(train=10, val=10, test=5)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=MICRO, cache_dir=tmp_path_factory.mktemp("scenes"))


def backend64():
    return make_backend(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)


def counting_backbone_passes(monkeypatch, backend) -> list:
    calls = []
    original = backend.teacher_forcing_inputs

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, "teacher_forcing_inputs", counted)
    return calls


def train_free(scenes, folder, epochs, monkeypatch, budget_gb=None):
    if budget_gb is not None:
        monkeypatch.setenv("EARLYEXIT_FEATURE_CACHE_GB", str(budget_gb))
    backend = backend64()
    passes = counting_backbone_passes(monkeypatch, backend)
    torch.manual_seed(0)
    strategy = FreeStrategy(backend, [1, 2], FreeConfig(epochs=epochs, batch_size=4, learning_rate=1e-3))
    losses = train_exits(strategy, backend, scenes, str(folder), progress=False)
    return strategy, losses, len(passes)


def test_the_first_epoch_is_the_same_with_and_without_the_cache(scenes, tmp_path, monkeypatch):
    cached, cached_losses, _ = train_free(scenes, tmp_path / "a", 1, monkeypatch)
    plain, plain_losses, passes = train_free(scenes, tmp_path / "b", 1, monkeypatch, budget_gb=0)
    assert passes == len(plain_losses)  # no cache: one backbone pass per step
    for mine, theirs in zip(cached_losses, plain_losses, strict=True):
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-5)
    for a, b in zip(cached.exit_transformers.parameters(), plain.exit_transformers.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_later_epochs_reuse_every_batch(scenes, tmp_path, monkeypatch):
    items = len(one_caption_per_sample(scenes))
    batches = math.ceil(items / 4)
    _, losses, passes = train_free(scenes, tmp_path / "a", 3, monkeypatch)
    assert len(losses) == math.ceil(3 * items / 4) > 2 * batches
    assert passes == batches  # the backbone ran once per distinct batch
    # a budget smaller than one batch's features keeps nothing in memory: by default it spills to
    # disk (the backbone still runs once per batch); with no disk allowed every step runs the backbone
    _, losses, passes = train_free(scenes, tmp_path / "b", 3, monkeypatch, budget_gb=1e-9)
    assert passes == batches
    monkeypatch.setenv("EARLYEXIT_FEATURE_SPILL_GB", "0")
    _, losses, passes = train_free(scenes, tmp_path / "c", 3, monkeypatch, budget_gb=1e-9)
    assert passes == len(losses)


def test_classifier_exits_use_the_cache_too(scenes, tmp_path, monkeypatch):
    backend = backend64()
    passes = counting_backbone_passes(monkeypatch, backend)
    strategy = DeeBertStrategy(backend, [1, 2], DeeBertConfig(epochs=2, batch_size=8))
    losses = train_exits(strategy, backend, scenes, str(tmp_path / "d"), progress=False)
    assert len(passes) == math.ceil(len(one_caption_per_sample(scenes)) / 8) < len(losses)


def test_every_epoch_visits_every_batch_once():
    cache = FeatureCache(None, None, num_items=37, batch_size=4, depths=[1], budget_bytes=0, seed=3)
    assert cache.num_batches == 10
    for epoch in range(4):
        visited = [cache.batch_index(epoch * 10 + i) for i in range(10)]
        assert sorted(visited) == list(range(10))
    assert [cache.batch_index(i) for i in range(10)] == list(range(10))  # the first epoch in order
    assert [cache.batch_index(10 + i) for i in range(10)] != [cache.batch_index(20 + i) for i in range(10)]


def test_slim_features_keep_what_training_reads(scenes):
    from earlyexit.training.batching import TrainingBatches

    backend = backend64()
    batch = TrainingBatches(backend, [one_caption_per_sample(scenes)], batch_size=3)(0)
    with torch.no_grad():
        full = backbone_features(backend, batch)
    slim = full.slim([2])
    assert [h is not None for h in slim.hidden] == [False, False, True, False, True]
    assert slim.stored_final_logits is None and slim.nbytes() < full.nbytes()
    where = full.targets != -100
    torch.testing.assert_close(slim.final_logits_at(where), full.final_logits[:, :-1][where], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slim.final_logits, full.final_logits, atol=1e-5, rtol=1e-5)
    assert backbone_features(backend, {"backbone_features": slim}) is slim


def test_a_bad_budget_setting_is_one_line(monkeypatch):
    from earlyexit.errors import ConfigError
    from earlyexit.training.features import feature_cache_budget

    monkeypatch.setenv("EARLYEXIT_FEATURE_CACHE_GB", "lots")
    with pytest.raises(ConfigError, match="EARLYEXIT_FEATURE_CACHE_GB"):
        feature_cache_budget()
