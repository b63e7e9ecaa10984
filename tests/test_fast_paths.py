"""The speed paths change no result: shrinking batches, gates, and self-speculative decoding."""

import pytest
import torch
from helpers import assert_vocabulary_readout_is_those_columns, make_backend, make_images, no_eos, speculative_matches

from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.core.gates import CosineGate, LearnedGate
from earlyexit.core.speculative import SelfSpeculativeDecoder
from earlyexit.core.strategy import Strategy
from earlyexit.training.gates import train_gate

PROMPTS = ["a red circle", "two", "what color is the small square", ""]


@pytest.fixture(scope="module")
def backend():
    return make_backend(seed=1, num_layers=6)


def alone(inputs, r):
    """Row r of a batch as a batch of one, its left padding removed."""
    keep = inputs["attention_mask"][r].bool()
    return {"pixel_values": inputs["pixel_values"][r:r + 1], "input_ids": inputs["input_ids"][r:r + 1, keep],
            "attention_mask": inputs["attention_mask"][r:r + 1, keep]}


def new_tokens(sequences, inputs):
    return sequences[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("policy", ["catchup", "propagate", "skip"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_rows_match_rows_alone(registry, backend, policy, num_beams):
    cls = registry.strategy("confidence")
    model = EarlyExitForCausalLM(backend, cls(backend, [2, 4], cls.Config(threshold=0.1)), kv_policy=policy)
    inputs = backend.prepare_inputs(make_images(4, seed=5), PROMPTS)
    settings = dict(max_new_tokens=10, num_beams=num_beams, do_sample=False, **no_eos(backend))
    batch = new_tokens(model.generate(**inputs, **settings), inputs)
    layers = model.last_trace.exit_layers
    assert len({tuple(row) for row in layers[:, 1:].tolist()}) > 1, "rows should leave at different depths"
    for r in range(4):
        one = alone(inputs, r)
        assert torch.equal(new_tokens(model.generate(**one, **settings), one)[0], batch[r])
        assert model.last_trace.exit_layers[0].tolist() == layers[r].tolist()


def test_catchup_batch_costs_less_than_its_deepest_row(registry, backend):
    cls = registry.strategy("confidence")
    model = EarlyExitForCausalLM(backend, cls(backend, [2, 4], cls.Config(threshold=0.1)))
    inputs = backend.prepare_inputs(make_images(4, seed=5), PROMPTS)
    model.generate(**inputs, max_new_tokens=10, do_sample=False, **no_eos(backend))
    mixed = [r for r in model.last_trace.steps[1:] if len(set(r.exit_layer.tolist())) > 1]
    assert mixed, "some step should mix depths"
    # the rows that left stop: a layer runs on fewer rows than the batch (seen as shorter traces)
    from earlyexit.core.accounting import CostModel

    costs = CostModel.for_model(model)
    for record in mixed:
        depths = record.exit_layer.tolist()
        assert costs.breakdown(record, min(depths))["layers"] < costs.breakdown(record, max(depths))["layers"]


def test_gate_that_never_fires_changes_nothing(registry, backend):
    free = registry.strategy("free")(backend, [2, 4])
    inputs = backend.prepare_inputs(make_images(2, seed=6), PROMPTS[:2])
    settings = dict(max_new_tokens=8, do_sample=False)
    expected = backend.plain_generate(**inputs, **settings)
    for gate in (LearnedGate(32, 2, threshold=1.0), CosineGate(threshold=1.5)):
        model = EarlyExitForCausalLM(backend, free, gate=gate)
        assert torch.equal(model.generate(**inputs, **settings), expected)
        assert (model.last_trace.exit_layers[model.last_trace.exit_layers >= 0] == 6).all()


class CountingFree:
    """Wraps a FREE strategy's exit transformers to count the rows each one runs on."""

    def __init__(self, strategy):
        self.rows = []
        for module in strategy.exit_transformers:
            module.register_forward_hook(lambda m, args, out: self.rows.append(args[0].shape[:2]))


def test_gate_runs_the_exit_transformer_only_for_leavers(registry, backend):
    free = registry.strategy("free")(backend, [2, 4])
    counter = CountingFree(free)
    gate = CosineGate(threshold=0.0)  # everyone leaves at the first exit
    model = EarlyExitForCausalLM(backend, free, gate=gate)
    inputs = backend.prepare_inputs(make_images(2, seed=6), PROMPTS[:2])
    model.generate(**inputs, max_new_tokens=5, do_sample=False, **no_eos(backend))
    assert (model.last_trace.exit_layers[:, 1:] == 2).all()
    # one run per decode step, on the newest position of the leaving rows only
    assert counter.rows == [torch.Size([2, 1])] * 4


def test_exit_slot_filled_by_projection_equals_running_the_layer(registry, backend):
    """With a gate the exit transformer runs only for leavers; its cache slot still holds what
    running it on every position would have written."""
    from helpers import assert_exit_slots_match_running_the_modules

    free = registry.strategy("free")(backend, [2, 4])
    model = EarlyExitForCausalLM(backend, free, gate=CosineGate(threshold=0.999))
    inputs = backend.prepare_inputs(make_images(2, seed=7), PROMPTS[:2])
    sequences = model.generate(**inputs, max_new_tokens=8, do_sample=False, **no_eos(backend))
    assert_exit_slots_match_running_the_modules(model, inputs, sequences, free.exit_transformers, atol=1e-5)


def test_learned_gate_trains_and_saves(registry, backend, tmp_path):
    from earlyexit.data.scenes import SceneConfig, load_scenes

    scenes = load_scenes("exit_train", config=SceneConfig(train=4, val=8, test=2), cache_dir=tmp_path / "scenes")
    local = make_backend(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    confidence = registry.strategy("confidence")(local, [1, 2])
    gate = LearnedGate(32, 2)
    before = [p.clone() for p in gate.parameters()]
    report = train_gate(gate, local, confidence, scenes, steps=20, limit=8)
    assert all(0.0 <= p <= 1.0 for p in report["positives"]) and report["examples"][0] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, gate.parameters()))
    gate.save(str(tmp_path / "gate"))
    loaded = LearnedGate.load(str(tmp_path / "gate"))
    x = torch.randn(3, 32)
    torch.testing.assert_close(loaded.score(1, x), gate.score(1, x))


# -- self-speculative decoding ------------------------------------------------------------------
class Scripted(Strategy):
    """Exit read-out that always predicts one token (so no draft is ever accepted)."""

    name = "test-one-token"

    def __init__(self, backend, exit_layers, token):
        super().__init__(backend, exit_layers)
        self.token = token

    def exit_logits(self, exit_index, state):
        logits = torch.full((state.shape[0], self.backend.text_config.vocab_size), -10.0)
        logits[:, self.token] = 10.0
        return logits

    def should_exit(self, exit_index, view, context):
        return torch.zeros(view.hidden.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("draft_exit,draft_length", [(0, 1), (0, 4), (1, 3)])
def test_speculative_is_the_full_model(registry, backend, draft_exit, draft_length):
    free = registry.strategy("free")(backend, [2, 4])
    inputs = backend.prepare_inputs(make_images(4, seed=8), PROMPTS)
    stats = speculative_matches(backend, free, inputs, draft_exit, draft_length)
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted


def test_speculative_when_no_draft_is_accepted(backend):
    inputs = backend.prepare_inputs(make_images(2, seed=9), PROMPTS[:2])
    stats = speculative_matches(backend, Scripted(backend, [2], token=3), inputs, 0, 3)
    assert stats.drafted > 0 and stats.accepted == 0


def test_speculative_when_every_draft_is_accepted(registry):
    backend = make_backend(seed=4, num_layers=6)
    with torch.no_grad():  # layers past 2 add nothing to the residual stream: the exit is the model
        for layer in backend.decoder_layers()[2:]:
            for linear in (layer.self_attn.out_proj, layer.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    inputs = backend.prepare_inputs(make_images(2, seed=10), PROMPTS[:2])
    stats = speculative_matches(backend, registry.strategy("confidence")(backend, [2]), inputs, 0, 4)
    assert stats.drafted > 0 and stats.accepted == stats.drafted


def test_speculative_with_trained_exits(registry, tmp_path):
    from earlyexit.data.scenes import SceneConfig, load_scenes
    from earlyexit.training.exits import train_exits

    local = make_backend(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    scenes = load_scenes("exit_train", config=SceneConfig(train=4, val=8, test=2), cache_dir=tmp_path / "scenes")
    cls = registry.strategy("free")
    free = cls(local, [1, 2], cls.Config(epochs=1, batch_size=8))
    train_exits(free, local, scenes, str(tmp_path / "work"), progress=False)
    inputs = local.prepare_inputs([s.load_image() for s in scenes.samples[:2]], ["", "a"])
    stats = speculative_matches(local, free, inputs, 1, 3)
    assert stats.drafted > 0


# -- drafts over a smaller vocabulary ---------------------------------------------------------------
def test_a_vocabulary_read_out_is_those_columns_of_the_full_one(backend):
    assert_vocabulary_readout_is_those_columns(backend)


def test_draft_vocabulary_of_keeps_the_most_frequent_tokens_and_the_end(backend):
    from earlyexit.core.speculative import draft_vocabulary_of
    from earlyexit.errors import ConfigError

    tokenizer = backend.processor.tokenizer
    texts = ["red red red circle", "red circle", "blue"]
    ids = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in ("red", "circle", "blue")}
    assert all(len(v) == 1 for v in ids.values())  # whole words in this tokenizer
    eos = backend.language_model.generation_config.eos_token_id
    assert draft_vocabulary_of(backend, texts, 3).tolist() == sorted([eos, ids["red"][0], ids["circle"][0]])
    assert len(draft_vocabulary_of(backend, texts, 100)) == 4  # no more than were seen
    with pytest.raises(ConfigError, match="at least one token"):
        draft_vocabulary_of(backend, texts, 0)


def test_forced_exit_reads_out_only_the_draft_vocabulary(registry, backend):
    free = registry.strategy("free")(backend, [2, 4])
    inputs = backend.prepare_inputs(make_images(2, seed=8), PROMPTS[:2])
    vocabulary = torch.tensor([3, 5, 8, 13, 21])
    outputs = {}
    # the prompt pass runs at full depth and reads the whole vocabulary either way; a second
    # token is drafted at the exit
    for name, restricted in (("full", None), ("vocabulary", vocabulary)):
        model = EarlyExitForCausalLM(backend, free)
        model.draft_vocabulary = restricted
        cache = model.new_cache()
        with torch.no_grad():
            model.force_exit = -1
            embeds = backend.decoder_inputs_embeds(inputs["pixel_values"], inputs["input_ids"])
            model.prompt_pass(embeds, inputs["attention_mask"], cache)
            model.force_exit = 0
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            outputs[name] = model(input_ids=torch.tensor([[4], [6]]), attention_mask=mask, cache=cache).logits[:, -1]
    full, drafted = outputs["full"], outputs["vocabulary"]
    torch.testing.assert_close(drafted[:, vocabulary], full[:, vocabulary])
    outside = torch.ones(full.shape[1], dtype=torch.bool)
    outside[vocabulary] = False
    assert torch.isinf(drafted[:, outside]).all() and (drafted[:, outside] < 0).all()


@pytest.mark.parametrize("size", [1, 6, 40])
def test_speculative_over_a_draft_vocabulary_is_the_full_model(registry, backend, size):
    from earlyexit.core.accounting import CostModel
    from earlyexit.core.generation import decode_new_tokens
    from earlyexit.core.speculative import draft_vocabulary_of

    free = registry.strategy("free")(backend, [2, 4])
    inputs = backend.prepare_inputs(make_images(4, seed=8), PROMPTS)
    plain = backend.plain_generate(**inputs, max_new_tokens=12, do_sample=False)
    texts = decode_new_tokens(backend, plain, inputs["input_ids"].shape[1])
    vocabulary = draft_vocabulary_of(backend, texts, size)
    model = EarlyExitForCausalLM(backend, free)
    decoder = SelfSpeculativeDecoder(model, 0, 3, draft_vocabulary=vocabulary)
    got = decoder.generate(**inputs, max_new_tokens=12)
    prompt = inputs["input_ids"].shape[1]
    for r in range(plain.shape[0]):
        want = plain[r, prompt:]
        assert torch.equal(got[r, prompt:prompt + len(want)], want)
    assert decoder.last_stats.drafted > 0
    costs = CostModel.for_model(model)
    mean = sum(backend.layer_param_counts()) / backend.num_layers
    assert costs.exit_readout_costs == pytest.approx([backend.head_param_count(len(vocabulary)) / mean] * 2)
    assert costs.head_cost == pytest.approx(backend.head_param_count() / mean)  # verification reads it all


def test_a_bad_draft_vocabulary_is_one_line(registry, backend):
    from earlyexit.errors import ConfigError

    model = EarlyExitForCausalLM(backend, registry.strategy("free")(backend, [2, 4]))
    size = backend.language_model.lm_head.out_features
    for bad, message in (([size], "token ids in"), ([-1], "token ids in"), ([], "token ids in"), ([3, 3], "twice")):
        with pytest.raises(ConfigError, match=message):
            SelfSpeculativeDecoder(model, 0, 3, draft_vocabulary=torch.tensor(bad, dtype=torch.long))


# -- exits over a smaller vocabulary ----------------------------------------------------------------
def exit_vocabulary_model(registry, backend, vocabulary, threshold=0.0, kv_policy="catchup"):
    from earlyexit.core.speculative import token_vocabulary

    cls = registry.strategy("confidence")
    model = EarlyExitForCausalLM(backend, cls(backend, [2, 4], cls.Config(threshold=threshold)), kv_policy=kv_policy)
    model.exit_vocabulary = token_vocabulary(model, vocabulary, "exit")
    return model


def test_exits_over_the_whole_vocabulary_listed_change_nothing(registry, backend):
    inputs = backend.prepare_inputs(make_images(4, seed=9), PROMPTS)
    settings = dict(max_new_tokens=10, do_sample=False, **no_eos(backend))
    size = backend.language_model.lm_head.out_features
    plain = exit_vocabulary_model(registry, backend, None, threshold=0.2)
    listed = exit_vocabulary_model(registry, backend, torch.arange(size), threshold=0.2)
    want = plain.generate(**inputs, **settings)
    assert torch.equal(listed.generate(**inputs, **settings), want)
    assert torch.equal(listed.last_trace.exit_layers, plain.last_trace.exit_layers)
    assert (plain.last_trace.exit_layers[:, 1:] < backend.num_layers).any(), "some token should leave early"


@pytest.mark.parametrize("policy", ["catchup", "propagate"])
def test_exits_emit_only_the_exit_vocabulary_and_the_final_layer_reads_all(registry, backend, policy):
    inputs = backend.prepare_inputs(make_images(4, seed=9), PROMPTS)
    vocabulary = torch.tensor([3, 5, 8, 13, 21])
    # threshold 0: every row leaves at the first exit, so every decoded token is an exit's
    model = exit_vocabulary_model(registry, backend, vocabulary, kv_policy=policy)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, **no_eos(backend))
    decoded = new_tokens(out, inputs)[:, 1:]  # the first token comes from the full-depth prompt pass
    assert (model.last_trace.exit_layers[:, 1:] == 2).all()
    assert torch.isin(decoded, vocabulary).all()
    # an impossible threshold: nothing leaves, and the final layer is free to write any token
    deep = exit_vocabulary_model(registry, backend, vocabulary, threshold=1.1, kv_policy=policy)
    full = deep.generate(**inputs, max_new_tokens=8, do_sample=False, **no_eos(backend))
    assert torch.equal(full, backend.plain_generate(**inputs, max_new_tokens=8, do_sample=False, **no_eos(backend)))
    assert not torch.isin(new_tokens(full, inputs), vocabulary).all()


def test_an_exit_decision_reads_the_softmax_over_the_exit_vocabulary(registry, backend):
    vocabulary = torch.tensor([3, 5, 8, 13, 21])
    model = exit_vocabulary_model(registry, backend, vocabulary)
    state = torch.randn(3, backend.text_config.hidden_size)
    logits = model.exit_logits(0, state)
    full = backend.logits(state)
    torch.testing.assert_close(logits[:, vocabulary], full[:, vocabulary])
    torch.testing.assert_close(logits.softmax(-1)[:, vocabulary], full[:, vocabulary].softmax(-1))


def test_exit_vocabulary_is_charged_by_its_size(registry, backend):
    from earlyexit.core.accounting import CostModel

    vocabulary = torch.arange(10)
    model = exit_vocabulary_model(registry, backend, vocabulary)
    costs = CostModel.for_model(model)
    mean = sum(backend.layer_param_counts()) / backend.num_layers
    assert costs.exit_readout_costs == pytest.approx([backend.head_param_count(10) / mean] * 2)
    assert costs.head_cost == pytest.approx(backend.head_param_count() / mean)


def test_an_exit_vocabulary_is_left_to_strategies_with_their_own_read_out(registry, backend):
    deebert = registry.strategy("deebert")(backend, [2, 4])
    model = EarlyExitForCausalLM(backend, deebert)
    model.exit_vocabulary = torch.tensor([3, 5])
    state = torch.randn(2, backend.text_config.hidden_size)
    assert model.readout_vocabulary(0, drafting=False) is None
    torch.testing.assert_close(model.exit_logits(0, state), deebert.exit_logits(0, state))


def test_a_bad_exit_vocabulary_is_one_line(registry, backend):
    from earlyexit.errors import ConfigError

    size = backend.language_model.lm_head.out_features
    for bad, message in (([size], "exit vocabulary must be token ids in"), ([3, 3], "exit vocabulary lists")):
        with pytest.raises(ConfigError, match=message):
            exit_vocabulary_model(registry, backend, torch.tensor(bad))
