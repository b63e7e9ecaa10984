"""Training batches built ahead on a thread: the same batches as built directly, in order,
whatever the timing; the producer's errors reach the consumer; the thread always ends."""

import random
import threading
import time

import pytest
import torch
from helpers import make_backend

from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.strategies.free import FreeConfig, FreeStrategy
from earlyexit.training import exits
from earlyexit.training.batching import TrainingBatches
from earlyexit.training.prefetch import HostSide, Prefetcher


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=SceneConfig(train=10, val=10, test=5),
                       cache_dir=tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def backend():
    return make_backend(seed=3, num_layers=4, image_size=64, patch_size=16, init_std=0.1)


def assert_same_batch(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].device == value.device, key
        assert torch.equal(got[key], value), key


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "batch-prefetch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefetched_batches_are_the_direct_ones_whatever_the_timing(backend, scenes, dtype):
    """Three epochs of 10 samples at 4 a batch (epochs straddle batches), the producer slowed at
    random so that the consumer sometimes waits and sometimes finds several batches ready; a
    bf16 model gets its pixels in bf16 as `on_model` gives them."""
    backend.model.to(dtype)
    try:
        direct = TrainingBatches(backend, [scenes], batch_size=4, seed=5)
        host = TrainingBatches(HostSide(backend), [scenes], batch_size=4, seed=5)
        jitter = random.Random(0)

        def slow(step):
            time.sleep(jitter.random() * 0.02)
            return host(step)

        prefetcher = Prefetcher(slow, backend, stop=8, ahead=2)
        for step in range(8):
            if step % 3 == 0:
                time.sleep(0.03)  # a slow training step: batches pile up (up to `ahead`)
            assert_same_batch(prefetcher(step), direct(step))
        assert direct(0)["pixel_values"].dtype == dtype
        assert_same_batch(prefetcher(8), direct(8))  # past `stop`: built directly
        prefetcher.close()
        assert not prefetch_threads()
    finally:
        backend.model.to(torch.float32)


@pytest.mark.parametrize("family", ["instructblip_flant5", "minigpt4_llama"])
def test_every_family_prefetches_its_own_batches(scenes, family):
    """The host-side batches of families that lay a batch out their own way (an encoder-decoder's
    `training_layout`, the instruction the Q-Former reads, MiniGPT-4's template) equal theirs."""
    from earlyexit.backends.instructblip_flant5 import InstructBlipFlanT5Backend
    from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend

    cls = {"instructblip_flant5": InstructBlipFlanT5Backend, "minigpt4_llama": Minigpt4LlamaBackend}[family]
    backend = cls.from_tiny_config(seed=1, num_layers=2, hidden_size=32, num_heads=4, image_size=64, patch_size=16)
    direct = TrainingBatches(backend, [scenes], batch_size=3, seed=2)
    prefetcher = Prefetcher(TrainingBatches(HostSide(backend), [scenes], batch_size=3, seed=2), backend, stop=3)
    for step in range(3):
        assert_same_batch(prefetcher(step), direct(step))
    prefetcher.close()


def test_a_step_out_of_order_is_built_directly_and_stops_the_thread():
    built = []

    def build(step):
        built.append(step)
        return {"x": torch.tensor([step])}

    prefetcher = Prefetcher(build, make_backend(seed=1, num_layers=2), stop=100, ahead=2)
    assert prefetcher(3)["x"].item() == 3  # the thread starts at the first step asked for
    assert prefetcher(4)["x"].item() == 4
    assert prefetcher(10)["x"].item() == 10
    assert prefetcher.thread is None and not prefetch_threads()
    assert prefetcher(11)["x"].item() == 11
    assert built[:2] == [3, 4] and built[-2:] == [10, 11]
    assert 5 in built and max(built[:-2]) <= 4 + 2 + 1  # ahead=2 queued, one more waiting to be queued


def test_the_producer_builds_at_most_ahead_batches_in_advance():
    built = []

    def build(step):
        built.append(step)
        return {"x": torch.tensor([step])}

    prefetcher = Prefetcher(build, make_backend(seed=1, num_layers=2), stop=1000, ahead=3)
    prefetcher(0)
    time.sleep(0.5)  # a long training step
    assert built == [0, 1, 2, 3, 4]  # 1, 2, 3 queued; 4 built and waiting for room
    prefetcher.close()  # the producer is blocked on a full queue: close must still end it
    assert not prefetch_threads()


def test_an_error_in_the_producer_is_raised_by_the_consumer():
    error = RuntimeError("image 7 is corrupt")

    def build(step):
        if step == 2:
            raise error
        return {"x": torch.tensor([step])}

    prefetcher = Prefetcher(build, make_backend(seed=1, num_layers=2), stop=10)
    assert prefetcher(0)["x"].item() == 0 and prefetcher(1)["x"].item() == 1
    with pytest.raises(RuntimeError) as raised:
        prefetcher(2)
    assert raised.value is error
    assert prefetcher.thread is None and not prefetch_threads()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and asynchronous copies need CUDA")
def test_on_cuda_batches_are_pinned_and_copied_as_the_direct_ones(scenes):
    backend = make_backend(seed=3, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    backend.model.to("cuda")
    host = TrainingBatches(HostSide(backend), [scenes], batch_size=4, seed=5)
    pinned = []
    prefetcher = Prefetcher(host, backend, stop=4)
    original = prefetcher._pinned
    prefetcher._pinned = lambda batch: pinned.append(original(batch)) or pinned[-1]
    direct = TrainingBatches(backend, [scenes], batch_size=4, seed=5)
    for step in range(4):
        got = prefetcher(step)
        assert got["pixel_values"].is_cuda
        assert_same_batch(got, direct(step))
    prefetcher.close()
    assert pinned and all(v.is_pinned() for batch in pinned for v in batch.values())


def free_losses(scenes, tmp_path, monkeypatch, prefetch: bool, cache_gb: str):
    monkeypatch.setenv("EARLYEXIT_FEATURE_CACHE_GB", cache_gb)
    if not prefetch:  # today's trainer: every batch built by the call that needs it
        class Direct(Prefetcher):
            def _start(self, first):
                self.started = True

        monkeypatch.setattr(exits, "Prefetcher", Direct)
    backend = make_backend(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    torch.manual_seed(0)
    strategy = FreeStrategy(backend, [1], FreeConfig(epochs=2, batch_size=4))
    return exits.train_exits(strategy, backend, scenes, str(tmp_path / f"{prefetch}-{cache_gb}"), progress=False)


@pytest.mark.parametrize("cache_gb", ["0", "1"])
def test_train_exits_prefetches_and_trains_as_without(scenes, tmp_path, monkeypatch, cache_gb):
    """FREE two epochs, without and with the feature cache (which asks for first-epoch batches
    only): the prefetching trainer asks its thread for every batch it builds and its losses are
    those of building each batch on demand, to the bit."""
    served = []
    original = Prefetcher._to_model
    monkeypatch.setattr(Prefetcher, "_to_model", lambda self, batch: served.append(self.thread is not None)
                        or original(self, batch))
    with_thread = free_losses(scenes, tmp_path, monkeypatch, True, cache_gb)
    assert served and all(served)  # every batch came from the thread
    # one caption a row: 40 rows, 10 batches an epoch, 20 steps; the cache serves the second epoch
    assert len(with_thread) == 20 and len(served) == (10 if cache_gb == "1" else 20)
    assert not prefetch_threads()
    served.clear()
    direct = free_losses(scenes, tmp_path, monkeypatch, False, cache_gb)
    assert not any(served)
    assert with_thread == direct
