"""The exit trainer's feature cache beyond its memory budget: features written once to disk in
the first epoch, read back (memory-mapped) in later ones instead of recomputed, and deleted at
the end; the budget is sized from the memory of the device the model runs on."""

import math
import os

import pytest
import torch
from helpers import make_backend

from earlyexit.data.prompts import one_caption_per_sample
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.errors import ConfigError
from earlyexit.strategies.deebert import DeeBertConfig, DeeBertStrategy
from earlyexit.training import features as features_module
from earlyexit.training.batching import TrainingBatches
from earlyexit.training.exits import train_exits
from earlyexit.training.features import FeatureCache, feature_cache_budget, feature_spill_budget

MICRO = SceneConfig(train=10, val=10, test=5)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=MICRO, cache_dir=tmp_path_factory.mktemp("scenes"))


def backend64():
    return make_backend(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)


def train_deebert(scenes, folder, monkeypatch, budget_gb: str | None):
    """Three epochs of DeeBERT exits; returns (classifier weights, losses, backbone passes, what
    the cache held on disk just before it was closed)."""
    if budget_gb is None:
        monkeypatch.delenv("EARLYEXIT_FEATURE_CACHE_GB", raising=False)
    else:
        monkeypatch.setenv("EARLYEXIT_FEATURE_CACHE_GB", budget_gb)
    backend = backend64()
    passes = []
    original = backend.teacher_forcing_inputs
    monkeypatch.setattr(backend, "teacher_forcing_inputs", lambda *a, **k: passes.append(1) or original(*a, **k))
    on_disk = []
    close = FeatureCache.close

    def recording_close(cache):
        on_disk.append((sorted(os.listdir(cache.spill_dir)) if os.path.isdir(cache.spill_dir) else [],
                        cache.read_back, cache.spill_dir))
        close(cache)

    monkeypatch.setattr(FeatureCache, "close", recording_close)
    torch.manual_seed(0)
    strategy = DeeBertStrategy(backend, [1, 2], DeeBertConfig(epochs=3, batch_size=4, learning_rate=1e-3))
    losses = train_exits(strategy, backend, scenes, str(folder), progress=False)
    weights = [p.detach().clone() for p in strategy.classifiers.parameters()]
    return weights, losses, len(passes), on_disk[0]


def test_spilled_features_train_the_same_exits_as_cached_ones(scenes, tmp_path, monkeypatch):
    batches = math.ceil(len(one_caption_per_sample(scenes)) / 4)
    memory, memory_losses, memory_passes, (memory_files, _, _) = train_deebert(
        scenes, tmp_path / "memory", monkeypatch, None)
    spilled, spilled_losses, spilled_passes, (files, read_back, spill_dir) = train_deebert(
        scenes, tmp_path / "spilled", monkeypatch, "1e-9")  # under one batch: everything goes to disk
    assert memory_files == []
    assert files == sorted(f"batch-{i}.safetensors" for i in range(batches))  # each batch written once
    assert spilled_passes == memory_passes == batches  # read back, never recomputed
    assert read_back == len(spilled_losses) - batches  # every later epoch's step came from disk
    assert spilled_losses == memory_losses
    assert all(torch.equal(a, b) for a, b in zip(spilled, memory, strict=True))
    assert spill_dir.startswith(str(tmp_path / "spilled")) and not os.path.exists(spill_dir)  # deleted at the end


def test_a_spill_budget_of_zero_recomputes_instead(scenes, tmp_path, monkeypatch):
    monkeypatch.setenv("EARLYEXIT_FEATURE_SPILL_GB", "0")
    _, losses, passes, (files, read_back, _) = train_deebert(scenes, tmp_path / "a", monkeypatch, "1e-9")
    assert passes == len(losses) and files == [] and read_back == 0


def test_spilled_features_read_back_bit_for_bit(scenes, tmp_path):
    backend = backend64().to(dtype="bfloat16")
    batches = TrainingBatches(backend, [one_caption_per_sample(scenes)], batch_size=3)
    kept = FeatureCache(backend, batches, num_items=9, batch_size=3, depths=[2], budget_bytes=0,
                        spill_dir=str(tmp_path / "spill"), spill_bytes=2**30)
    first = [kept(step)["backbone_features"] for step in range(3)]  # the first epoch: computed, spilled
    assert sorted(os.listdir(tmp_path / "spill")) == [f"batch-{i}.safetensors" for i in range(3)]
    for step in range(3, 6):  # the second epoch, from disk
        again = kept(step)["backbone_features"]
        first_time = first[kept.batch_index(step)]
        assert all(torch.equal(a, b) for a, b in zip(first_time.hidden, again.hidden) if a is not None)
    assert kept.read_back == 3 and kept.computed == 3
    first = first_time
    assert [h is None for h in again.hidden] == [h is None for h in first.hidden] == [True, True, False, True, False]
    assert again.hidden[2].dtype == torch.bfloat16 and torch.equal(again.targets, first.targets)
    kept.close()
    assert not (tmp_path / "spill").exists()


def test_a_batch_bigger_than_the_spill_room_is_recomputed(scenes, tmp_path):
    backend = backend64()
    batches = TrainingBatches(backend, [one_caption_per_sample(scenes)], batch_size=3)
    cache = FeatureCache(backend, batches, num_items=9, batch_size=3, depths=[2], budget_bytes=0,
                         spill_dir=str(tmp_path / "spill"), spill_bytes=10)
    cache(0)
    assert os.listdir(tmp_path / "spill") == [] and cache.spilled == {}
    cache.close()


# -- the budgets ------------------------------------------------------------------------------------
def test_the_memory_budget_follows_the_gpus_free_memory_on_cuda(monkeypatch):
    monkeypatch.delenv("EARLYEXIT_FEATURE_CACHE_GB", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (12 * 2**30, 24 * 2**30))
    assert feature_cache_budget("cuda:0") == 3 * 2**30  # a quarter of the free 12 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * 2**30, 80 * 2**30))
    assert feature_cache_budget("cuda:0") == 8 * 2**30  # at most 8 GiB
    monkeypatch.setattr(features_module, "available_memory_bytes", lambda device: 16 * 2**30 if device == "cpu" else 0)
    assert feature_cache_budget("cpu") == 4 * 2**30  # the host's memory for a model on the CPU
    monkeypatch.setenv("EARLYEXIT_FEATURE_CACHE_GB", "0.5")
    assert feature_cache_budget("cuda:0") == 2**29


def test_the_spill_budget_is_half_the_free_disk(tmp_path, monkeypatch):
    monkeypatch.delenv("EARLYEXIT_FEATURE_SPILL_GB", raising=False)
    free = __import__("shutil").disk_usage(tmp_path).free
    assert abs(feature_spill_budget(str(tmp_path / "not" / "yet")) - free // 2) < 2**26  # the nearest existing folder
    monkeypatch.setenv("EARLYEXIT_FEATURE_SPILL_GB", "2")
    assert feature_spill_budget(str(tmp_path)) == 2 * 2**30
    monkeypatch.setenv("EARLYEXIT_FEATURE_SPILL_GB", "plenty")
    with pytest.raises(ConfigError, match="EARLYEXIT_FEATURE_SPILL_GB"):
        feature_spill_budget(str(tmp_path))
