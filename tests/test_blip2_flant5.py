"""The `blip2-flant5` backend: BLIP-2 with a T5 encoder–decoder through the engine. The encoder runs
once at full depth; exits live in the decoder. Exits off give transformers' own tokens (greedy and
beams, padded batches, two shapes); every decoder cache slot holds what one full forward holds
(catch-up blocks get the right relative position bias and cross-attention); propagated K/V are
hand-checked; trained exits run and stay with their family; the training layout and the teacher-
forced features agree with the model's own loss; the CLI loads tiny-random and saved folders."""

import json

import pytest
import torch
from helpers import (assert_decoder_cache_matches_full_forward, assert_encoder_decoder_exits_off_match_transformers,
                     assert_teacher_forcing_gives_the_models_own_loss, assert_vocabulary_readout_is_those_columns,
                     fed_decoder_ids, fixed, make_backend, make_images, new_tokens, no_eos, train_exits_then_reload)
from transformers import LogitsProcessorList

from earlyexit.backends.blip2_flant5 import Blip2FlanT5Backend
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.errors import CheckpointError, ConfigError, ModelNotAvailableError
from earlyexit.models.adapters import load_exits, save_exits
from earlyexit.models.loading import load_backend
from earlyexit.training.batching import TrainingBatches
from earlyexit.training.exits import train_exits

PROMPTS = ["a red circle", "what color is the small square on the left", ""]  # three lengths: padding
SHAPES = {  # FlanT5's kind (gated-gelu, untied head) and original T5's (relu, tied head scaled by d_model**-0.5)
    "flant5": dict(num_layers=3, hidden_size=32, num_heads=4),
    "t5-tied": dict(num_layers=2, hidden_size=48, num_heads=6, d_kv=12, d_ff=80, feed_forward_proj="relu",
                    tie_word_embeddings=True, init_factor=3.0, num_query_tokens=6),
}


def tiny(**shape):
    return Blip2FlanT5Backend.from_tiny_config(**shape)


@pytest.fixture(scope="module")
def t5_6():
    """Six decoder layers in float64: cache comparisons then show the engine's arithmetic is the
    full model's (float32 rounding, amplified by an untrained T5's large activations, would blur it)."""
    backend = tiny(seed=1, num_layers=6, hidden_size=32, num_heads=4)
    backend.model.to(torch.float64)
    return backend


@pytest.fixture
def batch3(t5_6):
    return t5_6.prepare_inputs(make_images(3, seed=2), PROMPTS)


# -- exits off ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_beams", [1, 5])
def test_exits_off_gives_transformers_own_tokens(registry, shape, num_beams):
    backend = tiny(seed=3, **shape)
    inputs = backend.prepare_inputs(make_images(3, seed=4), PROMPTS)
    assert (inputs["attention_mask"] == 0).any(), "the batch should need padding"
    settings = dict(max_new_tokens=10, num_beams=num_beams, do_sample=False)
    assert_encoder_decoder_exits_off_match_transformers(registry, backend, inputs, settings)


def test_the_prompt_goes_to_the_encoder_behind_the_image_queries(t5_6, batch3):
    config = t5_6.model.config
    row = batch3["input_ids"][1]
    assert (row[:config.num_query_tokens] == config.image_token_id).all()
    tokenizer = t5_6.processor.tokenizer
    assert row[-1] == tokenizer.eos_token_id  # T5's tokenizer ends the text with </s>
    assert tokenizer.decode(row[config.num_query_tokens:], skip_special_tokens=True) == PROMPTS[1]
    assert t5_6.prompt_ids(PROMPTS[1]) == row[batch3["attention_mask"][1].bool()].tolist()


# -- caches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("every", [2, 3])
def test_catchup_cache_equals_one_full_forward(registry, t5_6, batch3, every):
    model = EarlyExitForCausalLM(t5_6, fixed(registry, t5_6, 2, every), kv_policy="catchup")
    sequences = model.generate(**batch3, max_new_tokens=9, do_sample=False, **no_eos(t5_6))
    layers = model.last_trace.exit_layers
    assert (layers == 2).any() and (layers == 6).any()
    assert sum(r.catchup_positions for r in model.last_trace.steps) > 0
    ids = fed_decoder_ids(t5_6, sequences, batch3)
    lagging = assert_decoder_cache_matches_full_forward(model.last_cache, t5_6, batch3, ids)
    assert lagging > 0 or every == 3  # with every=2 the last token left early: deep layers still lack it


def test_catchup_cache_equals_one_full_forward_under_beam_search(registry, t5_6, batch3):
    from test_kv_policies import CacheSnapshots

    model = EarlyExitForCausalLM(t5_6, fixed(registry, t5_6, 3, 2), kv_policy="catchup")
    cache = model.new_cache()
    snapshots = CacheSnapshots(cache)
    model.generate(**batch3, max_new_tokens=6, num_beams=3, do_sample=False, cache=cache,
                   logits_processor=LogitsProcessorList([snapshots]), **no_eos(t5_6))
    assert (model.last_trace.exit_layers == 3).any()
    for running, snapshot in snapshots.snapshots[1:]:  # running: the decoder ids, beams in cache row order
        assert_decoder_cache_matches_full_forward(snapshot, t5_6, batch3, running)


def test_exit_transformer_and_mixed_depths_stay_exact(registry, t5_6, batch3):
    cls = registry.strategy("free")
    free = cls(t5_6, [2, 4], cls.Config(threshold=0.9))
    model = EarlyExitForCausalLM(t5_6, free, kv_policy="catchup")
    sequences = model.generate(**batch3, max_new_tokens=9, do_sample=False, **no_eos(t5_6))
    assert {2, 4, 6} <= set(model.last_trace.exit_layers.flatten().tolist()), "rows should leave at every depth"
    assert_decoder_cache_matches_full_forward(model.last_cache, t5_6, batch3, fed_decoder_ids(t5_6, sequences, batch3))
    # the exit transformers (T5 blocks) got their own static cross-attention K/V
    encoder = model.last_cache.encoder
    for e, module in enumerate(free.exit_transformers):
        keys, values = t5_6.cross_kv(module, encoder["states"])
        torch.testing.assert_close(encoder[f"cross.{t5_6.num_layers + e}.k"], keys)
        torch.testing.assert_close(encoder[f"cross.{t5_6.num_layers + e}.v"], values)


def rms_norm_by_hand(norm, x):
    """T5's RMSNorm: no mean, no bias; the variance taken in float32 whatever the dtype."""
    return norm.weight * x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


@pytest.mark.parametrize("stacked", [True, False], ids=["one-matmul", "layer-by-layer"])
def test_propagate_projects_kv_from_the_exit_state(registry, t5_6, batch3, stacked, monkeypatch):
    if not stacked:
        monkeypatch.setattr("earlyexit.core.engine.STACKED_KV_BYTES", 0)
    exit_depth = 2
    model = EarlyExitForCausalLM(t5_6, fixed(registry, t5_6, exit_depth, 2), kv_policy="propagate")
    states = []
    # the feed-forward sub-layer's output is the block's
    hook = model.layers[exit_depth - 1].layer[-1].register_forward_hook(lambda m, a, out: states.append(out))
    try:
        model.generate(**batch3, max_new_tokens=7, do_sample=False, **no_eos(t5_6))
    finally:
        hook.remove()
    cache, config = model.last_cache, t5_6.text_config
    exited = [t for t, r in enumerate(model.last_trace.steps) if r.depth == exit_depth]
    assert exited
    for t in exited:
        column = t  # decoder column t holds the token fed at step t (column 0: the start token)
        exit_state = states[t][:, -1:]
        for j in range(exit_depth, t5_6.num_layers):
            sub = model.layers[j].layer[0]
            x = rms_norm_by_hand(sub.layer_norm, exit_state)
            keys = (x @ sub.SelfAttention.k.weight.t()).view(3, 1, config.num_heads, config.d_kv).transpose(1, 2)
            values = (x @ sub.SelfAttention.v.weight.t()).view(3, 1, config.num_heads, config.d_kv).transpose(1, 2)
            torch.testing.assert_close(cache.layers[j].keys[:, :, column:column + 1], keys, atol=1e-9, rtol=0)
            torch.testing.assert_close(cache.layers[j].values[:, :, column:column + 1], values, atol=1e-9, rtol=0)


@pytest.mark.parametrize("policy", ["catchup", "propagate", "skip"])
def test_batch_rows_match_rows_alone(registry, t5_6, policy):
    """Encoder padding stays out of the encoder and the cross-attention, and rows leaving at different
    depths do not disturb each other: each row generates alone what it does in the batch."""
    cls = registry.strategy("confidence")
    model = EarlyExitForCausalLM(t5_6, cls(t5_6, [2, 4], cls.Config(threshold=0.95)), kv_policy=policy)
    inputs = t5_6.prepare_inputs(make_images(3, seed=5), PROMPTS)
    settings = dict(max_new_tokens=8, do_sample=False, **no_eos(t5_6))
    batch = new_tokens(model.generate(**inputs, **settings), inputs)
    layers = model.last_trace.exit_layers
    assert len({tuple(row) for row in layers[:, 1:].tolist()}) > 1, "rows should leave at different depths"
    assert not inputs["attention_mask"][:, -1].all(), "the prompt is padded on the right (see the backend)"
    for r in range(3):
        keep = inputs["attention_mask"][r].bool()
        one = {"pixel_values": inputs["pixel_values"][r:r + 1], "input_ids": inputs["input_ids"][r:r + 1, keep],
               "attention_mask": inputs["attention_mask"][r:r + 1, keep]}
        assert torch.equal(new_tokens(model.generate(**one, **settings), one)[0], batch[r])
        assert model.last_trace.exit_layers[0].tolist() == layers[r].tolist()


def test_self_speculative_decoding_gives_the_full_models_greedy_tokens(registry, t5_6, batch3):
    """The exits draft, the full decoder verifies (catch-up over the drafts, relative bias and
    cross-attention included): the output is transformers' own greedy output, row by row."""
    from earlyexit.core.speculative import SelfSpeculativeDecoder

    cls = registry.strategy("confidence")
    decoder = SelfSpeculativeDecoder(EarlyExitForCausalLM(t5_6, cls(t5_6, [2, 4])), draft_exit=0, draft_length=3)
    expected = t5_6.plain_generate(**batch3, max_new_tokens=8, do_sample=False)
    got = decoder.generate(**batch3, max_new_tokens=8)
    assert torch.equal(got, expected)
    stats = decoder.last_stats
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted  # some drafts kept, some corrected


# -- training -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=SceneConfig(train=12, val=10, test=5),
                       cache_dir=tmp_path_factory.mktemp("scenes"))


def t5_64(seed=21):
    return tiny(seed=seed, num_layers=4, hidden_size=32, num_heads=4, image_size=64, patch_size=16)


def test_training_layout_and_teacher_forced_features_agree_with_the_models_loss(t5_6, scenes):
    batches = TrainingBatches(t5_6, [scenes], batch_size=3)
    batch = batches(0)
    tokenizer = t5_6.processor.tokenizer
    sample_rows = [batches.encode("a red", "circle"), batches.encode("", "two blue squares")]
    two = batches.collate(sample_rows, batches.pixels[[0, 1]], ["a red", ""])
    # the encoder reads queries + prompt, the labels hold the target and its end token only
    assert two["input_ids"][0, two["attention_mask"][0].bool()].tolist() == t5_6.prompt_ids("a red")
    assert two["labels"][1].tolist() == tokenizer(" two blue squares", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    assert two["labels"][0].tolist() == [tokenizer.convert_tokens_to_ids("circle"), tokenizer.eos_token_id, -100,
                                         -100]  # right padded
    assert_teacher_forcing_gives_the_models_own_loss(t5_6, batch)


@pytest.mark.parametrize("name,knob", [("free", {"threshold": 0.03}), ("deebert", {"entropy": 4.4})])
def test_strategy_trains_generates_and_its_adapter_stays_with_its_family(registry, scenes, tmp_path, name, knob):
    strategy = train_exits_then_reload(registry, t5_64, name, knob, scenes, tmp_path)
    backend, cls = strategy.backend, type(strategy)
    opt = make_backend(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    with pytest.raises(CheckpointError, match="backend 'blip2-flant5', not 'blip2-opt'"):
        load_exits(str(tmp_path / "exits"), opt, registry)
    save_exits(cls(opt, [1, 2], strategy.config), str(tmp_path / "opt-exits"))
    with pytest.raises(CheckpointError, match="backend 'blip2-opt', not 'blip2-flant5'"):
        load_exits(str(tmp_path / "opt-exits"), backend, registry)


# -- loading and the CLI --------------------------------------------------------------------------
def test_save_pretrained_round_trip_and_loader_checks(registry, t5_6, batch3, tmp_path, monkeypatch):
    folder = tmp_path / "blip2-flant5"
    t5_6.save_pretrained(str(folder))
    cls = registry.backend("blip2-flant5")
    loaded = cls.load(str(folder))
    assert loaded.text_config.scale_decoder_outputs == t5_6.text_config.scale_decoder_outputs
    inputs = loaded.prepare_inputs(make_images(3, seed=2), PROMPTS)
    assert all(torch.equal(inputs[k], batch3[k]) for k in batch3)
    settings = dict(max_new_tokens=8, do_sample=False)
    expected = EarlyExitForCausalLM(t5_6, fixed(registry, t5_6, 2, 2)).generate(**batch3, **settings)
    assert torch.equal(EarlyExitForCausalLM(loaded, fixed(registry, loaded, 2, 2)).generate(**inputs, **settings),
                       expected)
    opt_folder = tmp_path / "opt"
    make_backend(seed=0).save_pretrained(str(opt_folder))
    with pytest.raises(ConfigError, match="not BLIP-2 with t5"):
        cls.load(str(opt_folder))
    with pytest.raises(ConfigError, match="not BLIP-2 with opt"):
        registry.backend("blip2-opt").load(str(folder))
    with pytest.raises(ConfigError, match="tiny-random"):  # the embedded `tiny` is BLIP-2 with OPT
        load_backend(cls, "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotAvailableError, match="not available offline") as unavailable:
        cls.load("Salesforce/blip2-flan-t5-xl")
    assert "\n" not in str(unavailable.value)


def test_cli_generate_on_a_saved_folder_and_tiny_random(registry, t5_6, tmp_path, capsys):
    from earlyexit.cli import main

    t5_6.save_pretrained(str(tmp_path / "model"))
    make_images(1, seed=6)[0].save(tmp_path / "image.png")
    argv = ["generate", "--backend", "blip2-flant5", "--image", str(tmp_path / "image.png"), "--prompt", "a red",
            "--max-new-tokens", "5", "--json"]
    assert main(argv + ["--model", str(tmp_path / "model"), "--strategy", "fixed", "--exit-layers", "2",
                        "--option", "every=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    inputs = t5_6.prepare_inputs(make_images(1, seed=6), ["a red"])
    expected = EarlyExitForCausalLM(t5_6, fixed(registry, t5_6, 2, 2)).generate(**inputs, max_new_tokens=5,
                                                                                 do_sample=False)
    assert result["token_ids"] == new_tokens(expected, inputs)[0].tolist()[:len(result["token_ids"])]
    assert result["exit_layers"][:3] == [6, 6, 2]  # the first token comes from the full-depth prompt pass
    assert main(argv + ["--model", "tiny-random", "--num-beams", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 12


BUILT_IN = ["confidence", "deebert", "fixed", "free", "leebert", "mue", "pabee"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_strategy_trains_and_generates_under_every_policy(registry, scenes, tmp_path, name):
    backend = t5_64(seed=5)
    backbone = {n: p.detach().clone() for n, p in backend.model.state_dict().items()}
    cls = registry.strategy(name)
    options = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3} if hasattr(cls.Config, "epochs") else {}
    exits = [2] if name == "fixed" else [1, 2]
    strategy = cls(backend, exits, cls.Config(**options))
    if strategy.training_modules():
        trained = {n: p.detach().clone() for n, p in strategy.training_modules().items() for n, p in
                   p.state_dict().items()}
        train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False)
        moved = {n: p for m in strategy.training_modules().values() for n, p in m.state_dict().items()}
        assert any(not torch.equal(trained[n], moved[n]) for n in trained), "training should move something"
    assert all(torch.equal(backbone[n], t) for n, t in backend.model.state_dict().items())
    inputs = backend.prepare_inputs(make_images(2, size=64), ["", "a red"])
    for policy, beams in (("catchup", 1), ("propagate", 2), ("skip", 1)):
        model = EarlyExitForCausalLM(backend, strategy, kv_policy=policy)
        # an untrained T5 may emit padding, which ends a row like </s>: forbid both
        sequences = model.generate(**inputs, max_new_tokens=5, num_beams=beams, do_sample=False,
                                   bad_words_ids=[[backend.text_config.eos_token_id],
                                                  [backend.text_config.pad_token_id]])
        layers = model.last_trace.exit_layers
        assert new_tokens(sequences, inputs).shape == (2, 5) and layers.shape == (2, 5)
        assert set(layers.flatten().tolist()) <= set(exits) | {backend.num_layers}


def test_per_layer_accuracy_reads_the_decoder_layer_by_layer(t5_6, scenes):
    from earlyexit.evaluation.layer_accuracy import per_layer_accuracy

    rows = per_layer_accuracy(t5_6, scenes, limit=6, batch_size=3)
    assert [r["layer"] for r in rows] == list(range(1, 7)) and rows[-1]["agreement"] == 1.0
    batches = TrainingBatches(t5_6, [scenes.subset(6)], batch_size=3)
    correct = total = 0
    with torch.no_grad():
        for start in (0, 3):
            samples = scenes.samples[start:start + 3]
            batch = batches.collate([batches.encode("", s.captions[0]) for s in samples],
                                    batches.pixels[list(range(start, start + 3))], [""] * 3)
            where = batch["labels"] != -100
            predicted = t5_6.model(**batch).logits.argmax(-1)  # transformers' own forward
            correct += int((predicted == batch["labels"])[where].sum())
            total += int(where.sum())
    assert rows[-1]["accuracy"] == pytest.approx(correct / total)


def test_cli_train_backbone_then_eval_the_trained_folder(tmp_path, capsys):
    """`train backbone` fine-tunes on the decoder labels (the model's own loss) and saves a folder
    that `eval` loads and scores with exits."""
    from earlyexit.cli import main

    folder = tmp_path / "start"
    tiny(seed=2, num_layers=4).save_pretrained(str(folder))
    before = Blip2FlanT5Backend.load(str(folder)).model.state_dict()
    assert main(["train", "backbone", "--backend", "blip2-flant5", "--model", str(folder), "--data", "scenes",
                 "--split", "dev", "--output", str(tmp_path / "trained"), "--steps", "2", "--batch-size", "4"]) == 0
    trained = Blip2FlanT5Backend.load(str(tmp_path / "trained" / "model"))
    after = trained.model.state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("language_model.decoder"))
    assert trained.processor.tokenizer.padding_side == "right"
    report = tmp_path / "eval.json"
    assert main(["eval", "--backend", "blip2-flant5", "--model", str(tmp_path / "trained" / "model"), "--strategy",
                 "fixed", "--exit-layers", "2", "--option", "every=2", "--data", "scenes-vqa", "--split", "dev",
                 "--limit", "3",
                 "--max-new-tokens", "4", "--num-beams", "2", "--no-wall", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["speed"]["param_speedup"] > 1.0 and result["quality"]["num_questions"] == 3


def test_dialog_option_scores_are_the_models_own_log_probabilities(t5_6):
    """VisDial ranking forces each option through the decoder; exits off, its mean log-probability
    is what one teacher-forced transformers forward gives."""
    from earlyexit.evaluation.dialog import option_scores

    image, prompt, options = make_images(1, seed=7)[0], "Question: what color? Answer:", ["red", "two blue"]
    scores, work = option_scores(EarlyExitForCausalLM(t5_6).generate, t5_6, image, prompt, options)
    tokenizer, eos = t5_6.processor.tokenizer, t5_6.text_config.eos_token_id
    for option, score in zip(options, scores):
        target = torch.tensor([tokenizer(" " + option, add_special_tokens=False)["input_ids"] + [eos]])
        inputs = t5_6.prepare_inputs([image], [prompt])
        with torch.no_grad():
            logits = t5_6.model(**inputs, labels=target).logits
        expected = logits.log_softmax(-1).gather(-1, target[..., None]).mean()
        assert score == pytest.approx(float(expected), rel=1e-6)  # the forcing reads scores in float32
    assert work["tokens"] == 2 + 3


def test_inputs_embeds_without_a_mask_generate_like_ids_with_one(t5_6, batch3):
    """`generate` from ready embeddings (no ids, no mask: one unpadded row) returns only the new tokens."""
    model = EarlyExitForCausalLM(t5_6)
    one = {k: v[1:2] for k, v in batch3.items()}  # the longest prompt: no padding
    expected = new_tokens(model.generate(**one, max_new_tokens=5, do_sample=False), one)
    embeds = t5_6.decoder_inputs_embeds(one["pixel_values"], one["input_ids"])
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False), expected)


def test_bfloat16_tiny_random_and_folder_generate_with_exits(registry, t5_6, tmp_path):
    backend = registry.backend("blip2-flant5").load("tiny-random", device="cpu", dtype="bfloat16")
    assert backend.dtype == torch.bfloat16 and backend.num_layers == 12
    tiny(seed=2, num_layers=4).save_pretrained(str(tmp_path / "m"))
    folder = registry.backend("blip2-flant5").load(str(tmp_path / "m"), dtype="bfloat16")
    assert folder.dtype == torch.bfloat16
    for b in (backend, folder):
        cls = registry.strategy("free")
        model = EarlyExitForCausalLM(b, cls(b, [2], cls.Config(threshold=0.0)))  # every token leaves at 2
        inputs = b.prepare_inputs(make_images(2), ["a red", ""])
        assert inputs["pixel_values"].dtype == torch.bfloat16
        model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False, **no_eos(b))
        assert model.last_cache.encoder["states"].dtype == torch.bfloat16
        assert (model.last_trace.exit_layers[:, 1:] == 2).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_a_vocabulary_read_out_is_those_columns_of_the_full_one(shape):
    assert_vocabulary_readout_is_those_columns(tiny(seed=3, **SHAPES[shape]))  # the tied head's scale included
