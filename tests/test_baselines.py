"""The paper's baselines (DeeBERT, PABEE, LeeBERT, MuE) and the training half of the Strategy
contract: rules and losses by hand, who each training step updates, adapters round-trip, the
engine's decisions against a reference that replays the rule on one full forward, and FREE's
discriminator comparing like with like."""

import ast
import math
import pathlib
import types

import pytest
import torch
from helpers import SpyEngine, make_backend, make_images, no_eos

from earlyexit.core.accounting import Trace  # noqa: F401 - the engine's trace is what we check against
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.core.strategy import ExitView, StepContext
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.errors import ConfigError
from earlyexit.models.adapters import load_exits, save_exits
from earlyexit.strategies.classifier_exits import entropy, mutual_distillation, patience_update, weighted_average
from earlyexit.training.exits import split_held_out, train_exits
from earlyexit.training.features import backbone_features
from earlyexit.training.loop import TrainConfig

MICRO = SceneConfig(train=12, val=10, test=5)
TRAINED = ("deebert", "pabee", "leebert", "mue")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=MICRO, cache_dir=tmp_path_factory.mktemp("scenes"))


def backend64(seed=21):
    return make_backend(seed=seed, num_layers=4, image_size=64, patch_size=16, init_std=0.1)


def small(registry, name, backend, exits=(1, 2), **options):
    cls = registry.strategy(name)
    defaults = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3}
    return cls(backend, list(exits), cls.Config(**{**defaults, **options}))


# -- rules by hand ---------------------------------------------------------------------------------
def test_entropy_by_hand():
    uniform4 = torch.zeros(1, 4)
    assert entropy(uniform4).item() == pytest.approx(math.log(4))
    p = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)]])
    assert entropy(p).item() == pytest.approx(-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)))


def test_deebert_leaves_when_entropy_is_at_most_s(registry):
    backend = make_backend(seed=3, num_layers=4)
    strategy = small(registry, "deebert", backend, entropy=0.5)
    sharp, flat = torch.tensor([10.0] + [0.0] * 5), torch.zeros(6)
    view = types.SimpleNamespace(logits=lambda: torch.stack([sharp, flat]))
    assert strategy.should_exit(0, view, None).tolist() == [True, False]


def test_patience_counts_consecutive_agreement_for_the_rows_present():
    token = {}
    rows_all = torch.arange(3)
    # exit 0: everyone records; nobody leaves (counter 0)
    assert patience_update(token, rows_all, torch.tensor([5, 6, 7]), 1, 3).tolist() == [False, False, False]
    # exit 1: row 0 agrees, row 1 changes, row 2 agrees
    assert patience_update(token, rows_all, torch.tensor([5, 9, 7]), 2, 3).tolist() == [False, False, False]
    assert token["pabee_count"].tolist() == [1, 0, 1]
    # exit 2: only rows 0 and 1 present (row 2 left elsewhere); row 0 reaches patience 2
    leave = patience_update(token, torch.tensor([0, 1]), torch.tensor([5, 9]), 2, 3)
    assert leave.tolist() == [True, False] and token["pabee_count"].tolist() == [2, 1, 1]


def test_mue_cosine_saturation(registry):
    backend = make_backend(seed=3, num_layers=4)
    strategy = small(registry, "mue", backend, gamma=0.99, layerwise=False)
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    previous = torch.tensor([[1.0, 0.01], [0.0, 1.0]])  # cos ≈ 0.99995 and 0
    view = types.SimpleNamespace(hidden=hidden, previous=previous)
    assert strategy.should_exit(0, view, None).tolist() == [True, False]
    assert strategy.parameter_counts() == {"trainable": 0, "inference": 0} and not strategy.needs_training


def test_losses_by_hand():
    a, b = torch.tensor(2.0), torch.tensor(4.0)
    assert weighted_average([a, b], [1, 2]).item() == pytest.approx((2 + 8) / 3)
    exit_logits = torch.tensor([[0.0, math.log(3)]])  # p = (1/4, 3/4)
    final = torch.tensor([[0.0, 0.0]])  # (1/2, 1/2)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(final || exit)
    (only,) = mutual_distillation([exit_logits], [final])
    assert only.item() == pytest.approx(kl, rel=1e-5)
    first, second = mutual_distillation([exit_logits, final], [])  # each learns from the other
    assert first.item() == pytest.approx(kl, rel=1e-5)
    assert second.item() == pytest.approx(0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5), rel=1e-5)


def test_knobs_and_configs(registry):
    backend = make_backend(seed=3, num_layers=4)
    pabee = small(registry, "pabee", backend, exits=(1, 2, 3))
    assert pabee.knob == "patience" and pabee.calibration_grid() == (1, 2)
    pabee.set_knob(2.0)
    assert pabee.config.patience == 2 and isinstance(pabee.config.patience, int)
    with pytest.raises(ConfigError, match="whole number"):
        pabee.set_knob(1.5)
    with pytest.raises(ConfigError):
        small(registry, "deebert", backend, entropy=-1.0)
    with pytest.raises(ConfigError):
        small(registry, "leebert", backend, held_out=1.0)
    with pytest.raises(ConfigError):
        small(registry, "mue", backend, gamma=float("nan"))
    assert registry.strategy("mue").default_exit_layers(12) == list(range(1, 12))


# -- training: who changes what ---------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINED)
def test_each_step_changes_only_its_own_groups_and_the_backbone_stays_bit_identical(registry, scenes, tmp_path, name):
    backend = backend64()
    before = {n: p.detach().clone() for n, p in backend.model.state_dict().items()}
    strategy = small(registry, name, backend)
    assert strategy.needs_training
    config = TrainConfig(output_dir=str(tmp_path / "spy"), steps=100, warmup_steps=0, progress=False)
    engine = SpyEngine(strategy.training_groups(), config)
    train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False, engine=engine)
    assert engine.calls and all(changed == {group} for group, changed in engine.calls)
    expected_groups = {"deebert": {"classifiers"}, "pabee": {"classifiers"}, "mue": {"layers"},
                       "leebert": {"classifiers", "loss_weights"}}[name]
    assert {group for group, _ in engine.calls} == expected_groups
    after = backend.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    if name == "mue":  # its own copies moved instead
        assert strategy.trains_backbone
        assert any(not torch.equal(a, b) for a, b in zip(strategy.backbone_layers().parameters(),
                                                          (p for layer in backend.decoder_layers()
                                                           for p in layer.parameters())))


def test_leebert_learns_its_loss_weights_on_held_out_data(registry, scenes, tmp_path):
    backend = backend64()
    strategy = small(registry, "leebert", backend, weights_learning_rate=0.5)
    start = strategy.loss_weights.logits.detach().clone()
    losses = train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False)
    assert "meta" in losses[0] and {"kd1", "kd2", "w1", "w2"} <= set(losses[0])
    assert not torch.equal(strategy.loss_weights.logits, start)
    assert sum(strategy.loss_weights().tolist()) == pytest.approx(2.0)  # E · softmax
    train, held = split_held_out(scenes, 0.2)
    assert len(held) == round(0.2 * len(scenes)) and not {s.id for s in train} & {s.id for s in held}


def test_pabee_weighs_deeper_exits_more(registry):
    backend = make_backend(seed=3, num_layers=4)
    strategy = small(registry, "pabee", backend, exits=(1, 2, 3))
    targets = torch.tensor([0, 1])
    perfect, wrong = torch.tensor([[9.0, 0.0], [0.0, 9.0]]), torch.tensor([[0.0, 9.0], [9.0, 0.0]])
    shallow_wrong, _ = strategy.classifier_loss([wrong, perfect, perfect], targets, None)
    deep_wrong, _ = strategy.classifier_loss([perfect, perfect, wrong], targets, None)
    assert deep_wrong.item() == pytest.approx(3 * shallow_wrong.item(), rel=1e-3)


# -- generation: the engine's decisions against a replay of the rule on one full forward --------------
def replayed_exit_layers(strategy, backend, inputs, sequences):
    """For every generated token, the exit the rule picks when it sees the states of one full
    forward of the whole sequence (catch-up keeps every state exact, so these must agree). The
    first token comes from the prompt pass, which runs at full depth."""
    prompt = inputs["input_ids"].shape[1]
    rows, total = sequences.shape
    mask = torch.cat([inputs["attention_mask"], torch.ones(rows, total - prompt, dtype=torch.long)], 1)
    batch = {"pixel_values": inputs["pixel_values"], "input_ids": sequences, "attention_mask": mask,
             "labels": torch.full_like(sequences, -100)}
    with torch.no_grad():
        features = backbone_features(backend, batch, strategy.backbone_layers())
    run = types.SimpleNamespace(exit_state=lambda e, hidden, rows: hidden,
                                model=types.SimpleNamespace(strategy=strategy, exit_logits=strategy.exit_logits))
    layers = torch.full((rows, total - prompt), backend.num_layers, dtype=torch.long)
    for t in range(1, total - prompt):
        position = prompt + t - 1
        context = StepContext(t, rows, {})
        present = torch.arange(rows)
        for e, k in enumerate(strategy.exit_layers):
            view = ExitView(run, e, k, features.hidden[k][present, position],
                            features.hidden[k - 1][present, position], present)
            with torch.no_grad():
                leave = strategy.should_exit(e, view, context)
            layers[present[leave], t] = k
            present = present[~leave]
            if not len(present):
                break
    return layers


@pytest.mark.parametrize("name,options,beams", [
    ("deebert", {"entropy": 3.0}, 1), ("pabee", {"patience": 1}, 1), ("pabee", {"patience": 1}, 3),
    ("leebert", {"patience": 1}, 3), ("mue", {"gamma": 0.7}, 1), ("mue", {"gamma": 0.7}, 3)])
def test_engine_decisions_match_the_rule_replayed_on_a_full_forward(registry, name, options, beams):
    backend = make_backend(seed=11, num_layers=6, init_std=0.3)
    strategy = small(registry, name, backend, exits=(1, 2, 3, 4, 5), **options)
    if strategy.backbone_layers() is not None:  # fine-tuned copies differ from the backbone
        with torch.no_grad():
            for p in strategy.backbone_layers().parameters():
                p.add_(0.01 * torch.randn_like(p))
    inputs = backend.prepare_inputs(make_images(2), ["a red circle", "two"])
    model = EarlyExitForCausalLM(backend, strategy, kv_policy="catchup")
    sequences = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=beams, **no_eos(backend))
    got = model.last_trace.exit_layers
    assert len(set(got.flatten().tolist()) - {-1}) >= 2, f"want a mix of depths, got {got}"
    expected = replayed_exit_layers(strategy, backend, inputs, sequences)
    valid = got >= 0
    assert torch.equal(got[valid], expected[:, :got.shape[1]][valid])


# -- statistics-matched classifiers ----------------------------------------------------------------
def test_channel_scale_gives_the_final_layers_rms_per_channel():
    from earlyexit.strategies.classifier_exits import channel_scale

    torch.manual_seed(0)
    exit_states, final_states = torch.randn(50, 6), torch.randn(50, 6) * torch.tensor([1, 2, 3, 4, 5, 6.0])
    exit_states[:, 2] *= 100  # an outlier channel
    scale = channel_scale(6)
    assert torch.equal(scale(exit_states), exit_states) and not scale.matched
    scale.match(exit_states, final_states)
    rms = lambda x: x.pow(2).mean(0).sqrt()  # noqa: E731
    torch.testing.assert_close(rms(scale(exit_states)), rms(final_states))
    assert scale.matched and scale.weight[2] < 0.1


@pytest.mark.parametrize("name", ["deebert", "leebert"])
def test_match_statistics_sets_each_scale_once_from_the_first_batch(registry, scenes, name):
    from earlyexit.training.batching import TrainingBatches

    backend = backend64()
    strategy = small(registry, name, backend, exits=(1, 3), match_statistics=True)
    batches = TrainingBatches(backend, [scenes], batch_size=4)
    features = backbone_features(backend, batches(0))
    where = features.targets != -100
    strategy.match_statistics_once(features, where)
    final = features.hidden[-1][:, :-1][where]
    for e, k in enumerate(strategy.exit_layers):
        scaled = strategy.classifiers[e][0](features.hidden[k][:, :-1][where])
        torch.testing.assert_close(scaled.pow(2).mean(0).sqrt(), final.pow(2).mean(0).sqrt(), rtol=1e-4, atol=1e-5)
    weights = [c[0].weight.clone() for c in strategy.classifiers]
    later = backbone_features(backend, batches(1))
    strategy.match_statistics_once(later, later.targets != -100)
    assert all(torch.equal(c[0].weight, w) for c, w in zip(strategy.classifiers, weights))  # set once only


# -- adapters --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", [(name, {}) for name in TRAINED] + [("deebert", {"match_statistics": True})])
def test_train_save_load_gives_the_same_tokens_and_exit_layers(registry, scenes, tmp_path, name, options):
    backend = backend64()
    knob = {"deebert": {"entropy": 2.0}, "pabee": {"patience": 1}, "leebert": {"patience": 1},
            "mue": {"gamma": 0.5}}[name]
    strategy = small(registry, name, backend, exits=(1, 2, 3), **knob, **options)
    train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False)
    inputs = backend.prepare_inputs(make_images(2, size=64), ["", "a red"])
    settings = dict(max_new_tokens=6, do_sample=False, **no_eos(backend))
    model = EarlyExitForCausalLM(backend, strategy)
    expected = model.generate(**inputs, **settings)
    expected_layers = model.last_trace.exit_layers
    save_exits(strategy, str(tmp_path / "exits"), backbone_name="micro")
    reloaded = load_exits(str(tmp_path / "exits"), backend64(), registry)
    assert type(reloaded) is type(strategy) and reloaded.config == strategy.config
    if options.get("match_statistics"):  # the scales were set in training and come back set
        assert all(bool(c[0].matched) for c in reloaded.classifiers)
        assert all(torch.equal(a[0].weight, b[0].weight) for a, b in zip(reloaded.classifiers, strategy.classifiers))
    model = EarlyExitForCausalLM(reloaded.backend, reloaded)
    assert torch.equal(model.generate(**inputs, **settings), expected)
    assert torch.equal(model.last_trace.exit_layers, expected_layers)


def test_parameter_counts(registry):
    backend = make_backend(seed=3, num_layers=4, hidden_size=32)
    head = sum(p.numel() for p in backend.readout_copy().parameters())
    layer = backend.layer_param_counts()[0]
    deebert = small(registry, "deebert", backend, exits=(1, 2))
    assert deebert.parameter_counts() == {"trainable": 2 * head, "inference": 2 * head}
    free = registry.strategy("free")(backend, [1, 2])
    counts = free.parameter_counts()
    assert counts["inference"] == 2 * layer and counts["trainable"] > counts["inference"]  # + feature classifiers
    mue = small(registry, "mue", backend)
    assert mue.parameter_counts() == {"trainable": 4 * layer, "inference": 0}


# -- FREE compares like with like ------------------------------------------------------------------
def test_free_discriminator_inputs_come_from_the_same_point_of_the_network(registry, scenes):
    """The real side is the last layer's output and the fake side an exit layer's output, both
    the residual stream before the final norm; neither has been through the final norm."""
    from earlyexit.training.batching import TrainingBatches

    backend = backend64()
    strategy = registry.strategy("free")(backend, [2], registry.strategy("free").Config(batch_size=4))
    batch = TrainingBatches(backend, [scenes], batch_size=4)(0)
    outputs = {}
    hooks = [backend.decoder_layers()[-1].register_forward_hook(lambda m, a, out: outputs.setdefault("last", out)),
             strategy.exit_transformers[0].register_forward_hook(lambda m, a, out: outputs.setdefault("exit", out))]
    seen = []
    hooks.append(strategy.feature_classifiers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0])))

    class Recorder:
        def optimize(self, group, loss):
            return loss.item()

    try:
        strategy.training_step(batch, Recorder())
    finally:
        for hook in hooks:
            hook.remove()
    where = batch["labels"][:, 1:] != -100
    last = outputs["last"][0] if isinstance(outputs["last"], tuple) else outputs["last"]
    exit_out = outputs["exit"][0] if isinstance(outputs["exit"], tuple) else outputs["exit"]
    real, fake = seen[0], seen[1]
    assert torch.allclose(real, last[:, :-1][where], atol=1e-6)
    assert torch.allclose(fake, exit_out[:, :-1][where], atol=1e-6)
    # and the read-out of the real side is the backbone's own output (so it was not normalised twice)
    features = backbone_features(backend, batch)
    with torch.no_grad():
        plain = backend.language_model(inputs_embeds=backend.decoder_inputs_embeds(batch["pixel_values"],
                                                                                   batch["input_ids"]),
                                        attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(features.final_logits, plain, atol=1e-4)


# -- strategies are family-agnostic ------------------------------------------------------------------
def test_no_strategy_imports_a_backend_or_branches_on_the_family():
    root = pathlib.Path(__file__).resolve().parent.parent
    files = sorted((root / "strategies").glob("*.py")) + [root / "earlyexit" / "classifier_exits.py"]
    families = ("opt", "t5", "llama", "vicuna", "blip", "model_type")
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("backends" in n or n.startswith("transformers") for n in names), (path, names)
            if isinstance(node, ast.Compare):
                literals = [c.value.lower() for c in ast.walk(node) if isinstance(c, ast.Constant)
                            and isinstance(c.value, str)]
                assert not any(f in lit for lit in literals for f in families), (path, ast.unparse(node))
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("model_type", "decoder", "text_config_model_type"), (path, node.attr)


# -- MuE's encoder side ------------------------------------------------------------------------------
def test_vision_tower_stops_where_the_image_features_saturate(registry):
    import copy

    backend = make_backend(seed=4, num_layers=4, vision_layers=3)
    pixels = backend.prepare_inputs(make_images(2), ["", ""])["pixel_values"]
    with torch.no_grad():
        full = backend.model.get_image_features(pixels, return_dict=True).pooler_output
        never, depth = backend.image_features(pixels, saturation=2.0)  # a cosine never reaches 2
        assert torch.allclose(never, full, atol=1e-5) and depth.tolist() == [3, 3]
        first, depth = backend.image_features(pixels, saturation=-1.0)  # every image stops after one layer
        assert depth.tolist() == [1, 1]
        truncated = copy.deepcopy(backend.model)
        truncated.vision_model.encoder.layers = truncated.vision_model.encoder.layers[:1]
        assert torch.allclose(first, truncated.get_image_features(pixels, return_dict=True).pooler_output, atol=1e-5)
        assert not torch.equal(first, full)

    strategy = small(registry, "mue", backend, layerwise=False, vision_gamma=-1.0)
    model = EarlyExitForCausalLM(backend, strategy)
    inputs = backend.prepare_inputs(make_images(2), ["", "a red"])
    model.generate(**inputs, max_new_tokens=3, do_sample=False, **no_eos(backend))
    assert model.last_trace.vision_layers.tolist() == [1, 1]


def test_leebert_joint_training_moves_its_layer_copies_and_round_trips(registry, scenes, tmp_path):
    backend = backend64()
    before = {n: p.detach().clone() for n, p in backend.model.state_dict().items()}
    strategy = small(registry, "leebert", backend, joint=True, patience=1)
    assert strategy.trains_backbone and set(strategy.adapter_modules()) == {"exits", "backbone"}
    start = [p.detach().clone() for p in strategy.backbone_layers().parameters()]
    config = TrainConfig(output_dir=str(tmp_path / "spy"), steps=100, warmup_steps=0, progress=False)
    engine = SpyEngine(strategy.training_groups(), config)
    train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False, engine=engine)
    assert all(changed == {group} for group, changed in engine.calls)
    assert any(not torch.equal(a, b) for a, b in zip(strategy.backbone_layers().parameters(), start))
    after = backend.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # the backbone itself stays frozen
    inputs = backend.prepare_inputs(make_images(2, size=64), ["", "a red"])
    settings = dict(max_new_tokens=6, do_sample=False, **no_eos(backend))
    expected = EarlyExitForCausalLM(backend, strategy).generate(**inputs, **settings)
    save_exits(strategy, str(tmp_path / "exits"), backbone_name="micro")
    reloaded = load_exits(str(tmp_path / "exits"), backend64(), registry)
    assert torch.equal(EarlyExitForCausalLM(reloaded.backend, reloaded).generate(**inputs, **settings), expected)
