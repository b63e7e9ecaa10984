"""Distill / CapFilt data and backbone vocabularies under several processes: each rank generates
(and scores) only its share of the images, and every rank ends with what one process gets.

The world of two is simulated in this one process (`FakeWorld`): each rank runs in turn, and
what it sends at a gather is recorded, then handed to every rank on the next pass."""

import functools
import math
import pickle

import pytest
import torch
from helpers import make_backend, make_tiny_clip

from earlyexit.data import Sample
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.strategies.free import FreeConfig, FreeStrategy
from earlyexit.training import exits, vocabularies
from earlyexit.training.exits import backbone_captions, capfilt, make_scorer, shared_work


class Stop(Exception):
    """A rank reached a gather whose other parts are not known yet."""


class FakeWorld:
    """Runs `fn` as each rank of a world of `size`. Pass p records every rank's p-th gather; the
    next pass hands gathers 0..p to every rank; until a pass where every rank finishes."""

    def __init__(self, monkeypatch, size: int):
        self.size, self.rank = size, 0
        monkeypatch.setattr(exits, "process_group", lambda: (self.rank, self.size))
        monkeypatch.setattr(exits, "all_ranks", self.all_ranks)

    def all_ranks(self, value, world):
        assert world == self.size
        pickle.dumps(value)  # plain Python: what all_gather_object can send
        index = self.calls
        self.calls += 1
        if index == len(self.sent):
            self.sent.append({})
        if self.rank not in self.sent[index]:
            self.sent[index][self.rank] = value
            raise Stop
        assert self.sent[index][self.rank] == value  # every pass does the same work
        if len(self.sent[index]) < self.size:
            raise Stop
        return [self.sent[index][r] for r in range(self.size)]

    def run(self, fn, on_rank=lambda rank: None) -> list:
        self.sent = []
        while True:
            results = []
            for rank in range(self.size):
                self.rank, self.calls = rank, 0
                on_rank(rank)
                try:
                    results.append(fn())
                except Stop:
                    results.append(Stop)
            if Stop not in results:
                return results


@pytest.fixture(scope="module")
def backend():
    return make_backend(seed=21, num_layers=2, image_size=32, patch_size=16, init_std=0.1)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("train", config=SceneConfig(train=40, val=5, test=5),
                       cache_dir=tmp_path_factory.mktemp("scenes"))


def record_loaded_images(monkeypatch, by_rank: dict, world: FakeWorld | None = None):
    """The sample ids each rank loads the image of (its last pass)."""
    original = Sample.load_image

    def load_image(sample):
        by_rank.setdefault(world.rank if world else 0, []).append(sample.id)
        return original(sample)

    monkeypatch.setattr(Sample, "load_image", load_image)


def test_shared_work_gives_each_rank_its_pieces_and_everyone_every_result(monkeypatch):
    world = FakeWorld(monkeypatch, 2)
    worked = {}

    def work(piece, index):
        worked.setdefault(world.rank, []).append(index)
        return [x * 10 for x in piece]

    results = world.run(lambda: shared_work(list(range(7)), work, 2, progress=False),
                        on_rank=lambda rank: worked.pop(rank, None))
    assert results == [[0, 10, 20, 30, 40, 50, 60]] * 2
    assert worked == {0: [0, 2], 1: [1, 3]}  # pieces [0, 1] [4, 5] on rank 0; [2, 3] [6] on rank 1


@pytest.mark.parametrize("samples_per_image", [1, 3])
def test_backbone_captions_each_rank_writes_its_batches_and_all_get_one_process_result(
        backend, scenes, monkeypatch, samples_per_image):
    """10 images in batches of 3: rank 0 writes batches 0 and 2, rank 1 batches 1 and 3; greedy
    and sampled (seeded per batch), every rank ends with the one-process captions."""
    data = scenes.subset(10)
    one = backbone_captions(backend, data, samples_per_image=samples_per_image, batch_size=3, progress=False,
                            max_new_tokens=8)
    assert len(one) == 10 and all(len(v) == samples_per_image for v in one.values())
    world = FakeWorld(monkeypatch, 2)
    loaded = {}
    record_loaded_images(monkeypatch, loaded, world)
    results = world.run(lambda: backbone_captions(backend, data, samples_per_image=samples_per_image, batch_size=3,
                                                  progress=False, max_new_tokens=8),
                        on_rank=lambda rank: loaded.pop(rank, None))
    assert results == [one, one]
    ids = [s.id for s in data]
    assert loaded == {0: ids[0:3] + ids[6:9], 1: ids[3:6] + ids[9:10]}


def test_free_distill_and_capfilt_data_shared_by_two_ranks(backend, scenes, monkeypatch):
    """FREE's unlabelled training data over 10 images, generated 4 images a batch (rank 0 batches
    0 and 2, rank 1 batch 1) and CapFilt-scored 3 images a call (rank 0 images 0-2 and 6-8, rank 1
    3-5 and 9); both ranks hold the one-process data. (Smaller pieces than the defaults, 32 and
    16, and shorter captions keep the test fast; the code is the same.)"""
    monkeypatch.setattr(exits, "backbone_captions", functools.partial(exits.backbone_captions, batch_size=4,
                                                                      max_new_tokens=8))
    monkeypatch.setattr(exits, "capfilt", functools.partial(exits.capfilt, images_per_call=3))
    data = scenes.subset(10)
    distill = FreeStrategy(backend, [1], FreeConfig(mode="distill"))
    picky = FreeStrategy(backend, [1], FreeConfig(mode="capfilt", capfilt_samples=3))
    one_distill = distill.training_data(data, progress=False)
    one_capfilt = picky.training_data(data, progress=False)
    assert len(one_capfilt) >= 10 and not {c for s in one_capfilt for c in s.captions} & {
        c for s in data for c in s.captions}  # the backbone's captions, not the references
    world = FakeWorld(monkeypatch, 2)
    generated, scored = {}, {}
    plain_generate = backend.plain_generate
    monkeypatch.setattr(backend, "plain_generate", lambda **kw: generated.setdefault(world.rank, []).append(
        len(kw["input_ids"])) or plain_generate(**kw))
    likelihood = exits.caption_log_likelihood
    monkeypatch.setattr(exits, "caption_log_likelihood", lambda b, sample, texts: scored.setdefault(
        world.rank, []).append(sample.id) or likelihood(b, sample, texts))

    def fresh(rank):
        generated.pop(rank, None), scored.pop(rank, None)

    assert world.run(lambda: distill.training_data(data, progress=False), fresh) == [one_distill] * 2
    assert generated == {0: [4, 2], 1: [4]}
    assert world.run(lambda: picky.training_data(data, progress=False), fresh) == [one_capfilt] * 2
    assert generated == {0: [4, 2], 1: [4]}
    ids = [s.id for s in data]
    assert scored == {0: ids[0:3] + ids[6:9], 1: ids[3:6] + ids[9:10]}


def test_backbone_vocabularies_shared_by_two_ranks(backend, scenes, monkeypatch):
    monkeypatch.setattr(vocabularies, "load_split", lambda data, split, limit: scenes.subset(limit))
    one = vocabularies.backbone_vocabularies(backend, "scenes", "exit_train", (3, 2), limit=12, batch_size=4,
                                             progress=False, max_new_tokens=8)
    world = FakeWorld(monkeypatch, 2)
    loaded = {}
    record_loaded_images(monkeypatch, loaded, world)
    results = world.run(lambda: vocabularies.backbone_vocabularies(
        backend, "scenes", "exit_train", (3, 2), limit=12, batch_size=4, progress=False, max_new_tokens=8),
        on_rank=lambda rank: loaded.pop(rank, None))
    assert [len(v) for v in one] == [3, 2]
    for exit_vocabulary, draft_vocabulary in results:
        assert torch.equal(exit_vocabulary, one[0]) and torch.equal(draft_vocabulary, one[1])
    assert len(loaded[0]) == 8 and len(loaded[1]) == 4 and not set(loaded[0]) & set(loaded[1])


def test_clip_scores_several_images_in_one_call_on_the_backbones_device(backend, scenes, tmp_path):
    make_tiny_clip(tmp_path / "clip")
    scorer = make_scorer(f"clip:{tmp_path / 'clip'}", backend)
    assert scorer.device == backend.device and next(scorer.model.parameters()).device == backend.device
    texts = [["a red circle", "two blue squares"], ["a picture", "three shapes", "one"], ["green"]]
    samples = scenes.samples[:3]
    forwards = []
    handle = scorer.model.register_forward_hook(lambda module, args, output: forwards.append(1))
    together = scorer.many(samples, texts)
    assert len(forwards) == 1
    alone = [scorer(s, t) for s, t in zip(samples, texts)]
    handle.remove()
    assert [len(t) for t in together] == [2, 3, 1]
    for joint, single in zip(together, alone):
        assert joint == pytest.approx(single, abs=1e-4) and all(math.isfinite(x) for x in joint)


def test_capfilt_hands_a_batched_scorer_several_images_per_call(scenes):
    class Scorer:
        calls = []

        def many(self, samples, texts):
            self.calls.append(len(samples))
            return [[len(t) for t in own] for own in texts]  # longest caption first

    candidates = {s.id: ["a", "abc", "", "ab", "abc"] for s in scenes}
    kept = capfilt(scenes.subset(10), candidates, Scorer(), keep=2, images_per_call=4)
    assert Scorer.calls == [4, 4, 2]
    assert [s.captions for s in kept] == [["abc", "ab"]] * 10


SCRIPT = '''
import json
import sys

import torch

from earlyexit.backends.blip2_opt import Blip2OptBackend
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.training.exits import backbone_captions
from earlyexit.util.ranks import join_process_group


def setup(scenes_dir):
    backend = Blip2OptBackend.from_tiny_config(seed=21, num_layers=2, image_size=32, patch_size=16, init_std=0.1)
    scenes = load_scenes("train", config=SceneConfig(train=40, val=5, test=5), cache_dir=scenes_dir).subset(5)
    return backend, scenes


def captions(backend, scenes):
    return backbone_captions(backend, scenes, samples_per_image=2, batch_size=2, progress=False, max_new_tokens=6)


if __name__ == "__main__":
    output, scenes_dir = sys.argv[1:3]
    backend, scenes = setup(scenes_dir)
    rank, world = join_process_group(backend.device)
    rows = []
    generate = backend.plain_generate
    backend.plain_generate = lambda **kw: rows.append(len(kw["input_ids"])) or generate(**kw)
    result = captions(backend, scenes)
    with open(f"{output}/rank{rank}.json", "w") as handle:
        json.dump({"captions": result, "rows": rows, "world": world}, handle)
    torch.distributed.barrier()  # leave together: a gloo group torn down mid-exchange aborts the process
    torch.distributed.destroy_process_group()
'''


def test_two_gloo_processes_sample_what_one_process_samples(tmp_path):
    """A real world of two (torchrun, gloo): 5 images, 2 sampled captions each, 2 images a batch:
    rank 0 samples batches 0 and 2 (2 + 1 images), rank 1 batch 1; both hold the one-process
    captions, gathered with all_gather_object."""
    import importlib.util
    import json
    import socket
    import subprocess
    import sys
    import textwrap

    from helpers import launcher_env

    path = tmp_path / "captions_2p.py"
    path.write_text(textwrap.dedent(SCRIPT))
    spec = importlib.util.spec_from_file_location("captions_2p", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    one = module.captions(*module.setup(str(tmp_path / "scenes")))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), str(path), str(tmp_path), str(tmp_path / "scenes")],
                            capture_output=True, text=True, timeout=300, env=launcher_env())
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["rows"] for r in ranks] == [[2, 1], [2]]
    assert len(one) == 5 and all(len(texts) == 2 for texts in one.values())
    assert ranks[0]["captions"] == ranks[1]["captions"] == one
