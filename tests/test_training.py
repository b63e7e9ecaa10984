"""The training loop: determinism, atomic checkpoints, resume on the same loss trajectory."""

import os

import pytest
import torch
from helpers import make_backend

from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.errors import CheckpointError
from earlyexit.training.batching import TrainingBatches, language_model_step
from earlyexit.training.loop import TrainConfig, latest_checkpoint, train

MICRO = SceneConfig(train=24, val=10, test=10)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    cache = tmp_path_factory.mktemp("scenes")
    return [load_scenes("train", task=task, config=MICRO, cache_dir=cache) for task in ("caption", "vqa")]


def fresh(scenes, **kwargs):
    backend = make_backend(seed=11, num_layers=3, image_size=64, patch_size=16, init_std=0.02)
    return backend, TrainingBatches(backend, scenes, batch_size=4, seed=kwargs.pop("seed", 0))


class Interrupt(Exception):
    pass


def test_batches_are_deterministic_and_labelled(scenes):
    _, batches = fresh(scenes)
    first, again = batches(3), batches(3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(batches(4)["input_ids"], first["input_ids"])
    labels, ids = first["labels"], first["input_ids"]
    supervised = labels != -100
    assert supervised.any(axis=1).all()
    assert torch.equal(labels[supervised], ids[supervised])  # targets are the tokens themselves
    image_token = batches.image_token
    assert (labels[ids == image_token] == -100).all()


def test_images_load_lazily_per_batch_with_the_pixels_an_eager_load_gives(scenes):
    import dataclasses

    from earlyexit.training.batching import pixel_values

    backend, _ = fresh(scenes)
    loads = []
    counted = [dataclasses.replace(data, samples=[
        dataclasses.replace(s, image=lambda s=s: loads.append(s.id) or s.load_image()) for s in data.samples])
        for data in scenes]
    batches = TrainingBatches(backend, counted, batch_size=4, seed=0)
    assert loads == []  # nothing is loaded up front
    batch = batches(2)
    assert 0 < len(loads) <= 4  # only this batch's images (VQA rows may share one)
    picks = [batches.items[k] for k in batches.order(0)[8:12]]
    eager = pixel_values(backend, [scenes[d].samples[i].load_image() for d, i in picks])
    assert torch.equal(batch["pixel_values"], eager)
    assert all(torch.equal(batch[k], batches(2)[k]) for k in batch)  # the same step, the same batch
    assert torch.equal(batches.pixels[[0, 0]][1], batches.pixels[0])


def test_resume_continues_the_same_loss_trajectory(scenes, tmp_path):
    backend, batches = fresh(scenes)
    config = TrainConfig(output_dir=str(tmp_path / "straight"), steps=6, checkpoint_every=3, warmup_steps=2,
                         progress=False)
    straight = train(backend.model, language_model_step(backend.model), batches, config)

    backend, batches = fresh(scenes)
    config = TrainConfig(output_dir=str(tmp_path / "resumed"), steps=6, checkpoint_every=3, warmup_steps=2,
                         progress=False)

    def crash_at_4(step):
        if step == 4:
            raise Interrupt()
        return batches(step)

    with pytest.raises(Interrupt):
        train(backend.model, language_model_step(backend.model), crash_at_4, config)
    assert latest_checkpoint(config.output_dir).endswith("checkpoint-3")
    assert not [n for n in os.listdir(config.output_dir) if n.startswith(".checkpoint-")]  # no half-written ones

    backend, batches = fresh(scenes)  # a new process: fresh weights, resumed from the checkpoint
    resumed = train(backend.model, language_model_step(backend.model), batches, config)
    assert len(resumed) == 6
    resumed, straight = [e["loss"] for e in resumed], [e["loss"] for e in straight]
    assert resumed[:3] == straight[:3]
    torch.testing.assert_close(torch.tensor(resumed[3:]), torch.tensor(straight[3:]), rtol=1e-5, atol=1e-6)
    assert straight[-1] < straight[0]


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine(tmp_path):
    import math

    from earlyexit.training.loop import PlainEngine

    weight = torch.nn.Parameter(torch.zeros(2))
    config = TrainConfig(output_dir=str(tmp_path), steps=10, warmup_steps=4, learning_rate=0.5, progress=False)
    engine = PlainEngine({"model": {"w": weight}}, config)
    rates = []
    for _ in range(config.steps):
        rates.append(engine.optimizers["model"].param_groups[0]["lr"])
        engine.optimize("model", (weight - 1).pow(2).sum())
    expected = [0.5 * s / 4 for s in range(4)] + [0.25 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(4, 10)]
    assert rates == pytest.approx(expected)


def test_resume_refuses_other_settings(scenes, tmp_path):
    backend, batches = fresh(scenes)
    config = TrainConfig(output_dir=str(tmp_path), steps=2, checkpoint_every=1, progress=False)
    train(backend.model, language_model_step(backend.model), batches, config)
    backend, batches = fresh(scenes)
    other = TrainConfig(output_dir=str(tmp_path), steps=2, checkpoint_every=1, learning_rate=0.5, progress=False)
    with pytest.raises(CheckpointError, match="other settings"):
        train(backend.model, language_model_step(backend.model), batches, other)


def test_caption_words_mark_every_reference_word(scenes):
    backend, _ = fresh(scenes)
    batches = TrainingBatches(backend, scenes, batch_size=6, seed=0, caption_words=True)
    batch = batches(0)
    tokenizer = backend.processor.tokenizer
    for row, (d, i) in enumerate(batches.items[k] for k in batches.order(0)[:6]):
        sample = scenes[d].samples[i]
        words = set()
        for caption in sample.captions:
            words |= set(tokenizer(caption, add_special_tokens=False)["input_ids"])
        assert set(batch["caption_words"][row].nonzero().flatten().tolist()) == words  # empty for VQA rows


def test_embedded_build_is_cached_under_its_fingerprint(tmp_path, monkeypatch):
    from earlyexit.models import embedded

    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path))
    recipe = embedded.with_overrides(
        model={"num_layers": 2, "hidden_size": 32, "ffn_dim": 64, "vision_hidden": 32, "vision_layers": 1,
               "num_query_tokens": 2, "patch_size": 16},
        encoder_pretrain={"steps": 2, "batch_size": 4}, train={"steps": 2, "batch_size": 4})
    assert not embedded.is_built(recipe)
    path = embedded.ensure_built(recipe, progress=False)
    assert path == embedded.model_path(recipe) and embedded.is_built(recipe)
    assert embedded.fingerprint(recipe) in path and embedded.fingerprint(recipe) != embedded.fingerprint()
    info = embedded.build_info(recipe)
    assert info["recipe"] == recipe and info["train_seconds"] > 0
    from earlyexit.backends.blip2_opt import Blip2OptBackend

    backend = Blip2OptBackend.from_pretrained(path)
    assert backend.num_layers == 2
    mtime = (tmp_path / "models").stat().st_mtime
    assert embedded.ensure_built(recipe, progress=False) == path  # reused, not rebuilt
    assert (tmp_path / "models").stat().st_mtime == mtime


def test_encoder_pretraining_trains_the_image_side_only(tmp_path):
    from earlyexit.data.scenes import vocabulary
    from earlyexit.data.tokenizer import DEFAULT_WORDS
    from earlyexit.models import embedded

    config = SceneConfig(image_size=32, train=16, val=0, test=0)
    backend = make_backend(image_size=32, patch_size=16, vision_hidden=32, num_query_tokens=2,
                           words=sorted(set(vocabulary(config)) | set(DEFAULT_WORDS)))
    captions = load_scenes("train", "caption", config, cache_dir=tmp_path / "scenes")
    probe = torch.nn.Linear(backend.model.config.qformer_config.hidden_size, len(backend.processor.tokenizer))
    before = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
    losses = embedded.pretrain_encoder(backend, probe, [captions], dict(steps=60, batch_size=8, learning_rate=1e-2,
                                       warmup_steps=5, weight_decay=0.0, seed=0), str(tmp_path / "work"), False)
    after = dict(backend.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith(("vision_model.", "qformer.", "query_tokens")) for n in changed)
    assert any(n.startswith("vision_model.") for n in changed) and "query_tokens" in changed
    first, last = (sum(e["words"] for e in part) / len(part) for part in (losses[:5], losses[-5:]))
    assert last < 0.5 * first  # the probe and encoder learn the captions' words


def test_stale_checkpoint_is_skipped_and_never_costs_a_valid_one(scenes, tmp_path, capsys):
    output = tmp_path / "run"
    stale = output / "checkpoint-999"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # a folder from something else: no trainer state
    (output / ".checkpoint-5-partial").mkdir()  # what a killed save left behind
    backend, batches = fresh(scenes)
    config = TrainConfig(output_dir=str(output), steps=4, checkpoint_every=2, progress=False)
    losses = train(backend.model, language_model_step(backend.model), batches, config)
    assert len(losses) == 4  # trained from the start: the stale folder was not trusted
    assert "checkpoint-999" in capsys.readouterr().err
    assert latest_checkpoint(str(output)).endswith("checkpoint-4")  # the valid one survived pruning
    assert stale.is_dir() and not (output / ".checkpoint-5-partial").exists()
    assert not (output / "checkpoint-2").exists()  # older valid ones are still pruned


def test_a_failed_final_save_leaves_the_previous_model(tmp_path, monkeypatch):
    from earlyexit.core.model_folder import save_model_folder

    backend = make_backend(seed=3, num_layers=2)
    final = tmp_path / "model"
    save_model_folder(backend, str(final))
    before = sorted(p.name for p in final.iterdir())

    def dies_half_way(path):
        (tmp_path / "model-config-written").touch()
        with open(os.path.join(path, "config.json"), "w") as handle:
            handle.write("{}")
        raise KeyboardInterrupt  # a kill in the middle of writing the weights

    monkeypatch.setattr(backend, "save_pretrained", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_model_folder(backend, str(final))
    assert sorted(p.name for p in final.iterdir()) == before  # the previous model, whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model-")]
    (tmp_path / ".model-left-by-kill").mkdir()  # kill -9 leaves its temporary folder behind
    monkeypatch.undo()
    save_model_folder(backend, str(final))
    assert not (tmp_path / ".model-left-by-kill").exists()
