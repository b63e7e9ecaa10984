"""FREE: losses by hand, who each step updates, frozen backbone, adapters, CapFilt."""

import math

import pytest
import torch
from helpers import SpyEngine, make_backend, make_images, no_eos

from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.data.prompts import one_caption_per_sample
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.errors import CheckpointError, ConfigError
from earlyexit.models.adapters import load_exits, save_exits
from earlyexit.strategies.free import (FreeConfig, FreeStrategy, distillation_loss, feature_classifier_loss,
                                       generator_adversarial_loss)
from earlyexit.training.exits import capfilt, train_exits
from earlyexit.training.loop import TrainConfig

MICRO = SceneConfig(train=10, val=10, test=5)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=MICRO, cache_dir=tmp_path_factory.mktemp("scenes"))


def backend64(seed=21):
    return make_backend(seed=seed, num_layers=4, image_size=64, patch_size=16, init_std=0.1)


def test_feature_classifier_loss_by_hand():
    assert feature_classifier_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(2 * math.log(2))
    expected = math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))  # -log s(2) - log(1 - s(-1))
    assert feature_classifier_loss(torch.tensor([2.0]), torch.tensor([-1.0])).item() == pytest.approx(expected)
    # averaged over tokens
    two = feature_classifier_loss(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0])).item()
    assert two == pytest.approx((expected + 2 * math.log(2)) / 2)


def test_generator_loss_by_hand():
    assert generator_adversarial_loss(torch.tensor([1.0])).item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_distillation_loss_by_hand():
    exit_logits, final_logits = torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.0, 0.0]])
    # p_exit = (1/4, 3/4), p_final = (1/2, 1/2)
    paper = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert distillation_loss(exit_logits, final_logits, "exit_final").item() == pytest.approx(paper, rel=1e-5)
    assert distillation_loss(exit_logits, final_logits, "final_exit").item() == pytest.approx(reverse, rel=1e-5)


def test_config_rules():
    assert FreeConfig(mode="distill").kd and not FreeConfig(mode="distill").ce
    assert FreeConfig(mode="distill").epochs == 5 and FreeConfig().epochs == 3
    assert FreeConfig(mode="distill", ce=True).ce  # hard distillation: CE on the backbone's own tokens
    with pytest.raises(ConfigError):
        FreeConfig(mode="bogus")
    with pytest.raises(ConfigError):
        FreeConfig(adversarial=False, ce=False, kd=False)


def test_each_step_updates_only_its_player_and_backbone_stays_frozen(scenes, tmp_path):
    backend = backend64()
    before = {n: p.detach().clone() for n, p in backend.model.state_dict().items()}
    strategy = FreeStrategy(backend, [1, 2], FreeConfig(epochs=1, batch_size=4, learning_rate=1e-3))
    config = TrainConfig(output_dir=str(tmp_path / "spy"), steps=100, warmup_steps=0, progress=False)
    engine = SpyEngine(strategy.training_groups(), config)
    losses = train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False, engine=engine)
    assert engine.calls[:2] == [("discriminator", {"discriminator"}), ("generator", {"generator"})]
    assert all(changed == {group} for group, changed in engine.calls)
    assert {"fc", "gen", "adv", "ce"} <= set(losses[0])
    after = backend.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # bit-identical backbone


def test_save_load_reproduces_generation(scenes, tmp_path, registry):
    backend = backend64()
    strategy = FreeStrategy(backend, [1, 2], FreeConfig(epochs=1, batch_size=4, learning_rate=1e-3, threshold=0.2))
    train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False)
    inputs = backend.prepare_inputs(make_images(2, size=64), ["", "a red"])
    settings = dict(max_new_tokens=6, do_sample=False, **no_eos(backend))
    model = EarlyExitForCausalLM(backend, strategy)
    expected = model.generate(**inputs, **settings)
    expected_layers = model.last_trace.exit_layers
    save_exits(strategy, str(tmp_path / "exits"), backbone_name="micro")

    reloaded = load_exits(str(tmp_path / "exits"), backend64(), registry)  # a fresh copy of the same backbone
    assert reloaded.config.threshold == 0.2 and reloaded.exit_layers == [1, 2]
    model = EarlyExitForCausalLM(reloaded.backend, reloaded)
    assert torch.equal(model.generate(**inputs, **settings), expected)
    assert torch.equal(model.last_trace.exit_layers, expected_layers)

    with pytest.raises(CheckpointError, match="another backbone"):
        load_exits(str(tmp_path / "exits"), backend64(seed=99), registry)
    with pytest.raises(CheckpointError, match="no exit_config.json"):
        load_exits(str(tmp_path), backend, registry)


def test_capfilt_keeps_the_top_two_by_the_scorer(scenes):
    candidates = {s.id: ["one", "two", "three", "four", "two"] for s in scenes}
    scores = {"one": 0.1, "two": 0.9, "three": 0.5, "four": 0.7}
    seen = []

    def scorer(sample, texts):
        seen.append(texts)
        return [scores[t] for t in texts]

    kept = capfilt(scenes, candidates, scorer, keep=2)
    assert all(s.captions == ["two", "four"] for s in kept)
    assert seen[0] == ["one", "two", "three", "four"]  # duplicates scored once
    assert len(one_caption_per_sample(kept)) == 2 * len(scenes)


@pytest.mark.parametrize("mode, ce", [("distill", None), ("distill", True), ("capfilt", None)])
def test_unlabelled_modes_train_on_the_backbones_own_captions(scenes, tmp_path, mode, ce):
    backend = backend64()
    strategy = FreeStrategy(backend, [1], FreeConfig(mode=mode, ce=ce, epochs=1, batch_size=4, capfilt_samples=3))
    losses = train_exits(strategy, backend, scenes, str(tmp_path / mode), progress=False)
    assert losses and ("kd" in losses[0]) == (mode == "distill") and ("ce" in losses[0]) == (mode == "capfilt" or bool(ce))
    data = strategy.training_data(scenes, progress=False)
    references = {c for s in scenes for c in s.captions}
    assert data.samples and not ({s.captions[0] for s in data} & references)  # no reference captions used
    if mode == "capfilt":  # at most `capfilt_keep` captions per image survive the filter
        per_image = {}
        for s in data:
            per_image.setdefault(s.extra["image_id"], []).append(s)
        assert max(len(v) for v in per_image.values()) <= 2


def test_distill_mode_answers_questions_with_the_backbones_own_answers(tmp_path):
    """Unsupervised on VQA too: every training target is what the backbone itself answers after
    the question, never a human answer."""
    from earlyexit.core.generation import decode_new_tokens
    from earlyexit.data.prompts import VQA_PROMPT

    questions = load_scenes("exit_train", "vqa", config=MICRO, cache_dir=tmp_path).subset(6)
    backend = backend64()
    strategy = FreeStrategy(backend, [1], FreeConfig(mode="distill", epochs=1, batch_size=4))
    data = strategy.training_data(questions, progress=False)
    assert data.samples
    for sample in data:
        inputs = backend.prepare_inputs([sample.load_image()], [VQA_PROMPT.format(question=sample.question)])
        own = decode_new_tokens(backend, backend.plain_generate(**inputs, max_new_tokens=20),
                                inputs["input_ids"].shape[1])
        assert sample.answers == own
    humans = {s.id: s.answers for s in questions}
    assert any(s.answers != humans[s.id] for s in data)


def test_clip_scorer_offline_is_a_clear_error(monkeypatch):
    from earlyexit.errors import ModelNotAvailableError
    from earlyexit.training.exits import make_scorer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="not available offline"):
        make_scorer("clip:openai/clip-vit-large-patch14", None)


def test_capfilt_with_a_local_clip_keeps_its_top_two(scenes, tmp_path):
    from helpers import make_tiny_clip

    from earlyexit.training.exits import make_scorer

    make_tiny_clip(tmp_path / "clip")
    scorer = make_scorer(f"clip:{tmp_path / 'clip'}", None)
    texts = ["a red circle", "two blue squares", "a picture", "three shapes"]
    sample = scenes[0]
    scores = scorer(sample, texts)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    best_two = [texts[i] for i in sorted(range(4), key=lambda i: -scores[i])[:2]]
    kept = capfilt(scenes.subset(1), {sample.id: texts}, scorer, keep=2)
    assert kept[0].captions == best_two


def test_a_changed_middle_layer_changes_the_fingerprint():
    from earlyexit.models.adapters import backbone_fingerprint

    backend = make_backend(seed=5, num_layers=6)
    before = backbone_fingerprint(backend)
    assert backbone_fingerprint(make_backend(seed=5, num_layers=6)) == before  # deterministic
    with torch.no_grad():
        backend.decoder_layers()[3].fc1.weight[7, 11] += 1e-3
    assert backbone_fingerprint(backend) != before
