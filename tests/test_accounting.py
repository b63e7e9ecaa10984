"""Speed accounting against hand-computed values for scripted exit patterns."""

import copy

import pytest
import torch
from helpers import make_backend, make_images, no_eos
from transformers import LogitsProcessor, LogitsProcessorList

from earlyexit.core.accounting import CostModel, layer_speedup, param_speedup, summarize
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.core.strategy import Strategy

# the tiny model: width 32, ffn 128, vocabulary 100, 6 layers
WIDTH, FFN, VOCAB = 32, 128, 100
LAYER = 4 * (WIDTH * WIDTH + WIDTH) + (WIDTH * FFN + FFN) + (FFN * WIDTH + WIDTH) + 2 * 2 * WIDTH
HEAD = VOCAB * WIDTH + 2 * WIDTH  # tied LM head + final layer norm
KV = 2 * (WIDTH * WIDTH + WIDTH) + 2 * WIDTH  # k/v projections + the attention layer norm
H, K = HEAD / LAYER, KV / LAYER


@pytest.fixture(scope="module")
def backend():
    return make_backend(seed=2, num_layers=6, vocab_size=VOCAB)


def generate(model, backend, new_tokens=8, prompts=("a red circle",), **kwargs):
    inputs = backend.prepare_inputs(make_images(len(prompts)), list(prompts))
    model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **{**no_eos(backend), **kwargs})
    return inputs["input_ids"].shape[1]


def run_fixed(registry, backend, policy):
    cls = registry.strategy("fixed")
    model = EarlyExitForCausalLM(backend, cls(backend, [2], cls.Config(every=2)), kv_policy=policy)
    return model, generate(model, backend)


def test_cost_model_sizes(registry, backend):
    model, _ = run_fixed(registry, backend, "catchup")
    costs = CostModel.for_model(model)
    assert costs.layer_params == [LAYER] * 6
    assert costs.head_cost == pytest.approx(H)
    assert costs.kv_fill_cost == pytest.approx(K)
    assert costs.exit_module_costs == [0.0] and costs.exit_readout_costs == [pytest.approx(H)]


def test_catchup_scripted_pattern(registry, backend):
    model, prompt = run_fixed(registry, backend, "catchup")
    trace, costs = model.last_trace, CostModel.for_model(model)
    # token 0 comes from the prompt pass (full depth, no exit consulted); then full, exit, ...
    assert trace.exit_layers.tolist() == [[6, 6, 2, 6, 2, 6, 2, 6]]
    assert [r.widths for r in trace.steps[:4]] == [[prompt] * 6, [1] * 6, [1, 1], [1, 1, 2, 2, 2, 2]]
    assert [r.catchup_positions for r in trace.steps] == [0, 0, 0, 4, 0, 4, 0, 4]
    assert param_speedup(trace, costs) == pytest.approx(6 / (36 / 8))
    # catch-up redoes every skipped layer later: no layer saved, end to end or decoding
    spent = 6 * prompt + H + (6 + H) + 3 * (2 + H) + 3 * (10 + H)
    full = 6 * prompt + H + 7 * (6 + H)
    assert layer_speedup(trace, costs) == pytest.approx(full / spent)
    assert layer_speedup(trace, costs, decode_only=True) == pytest.approx(1.0)
    summary = summarize(trace, costs)
    assert summary["exit_layer_histogram"] == {2: 3, 6: 5}
    assert summary["tokens"] == 8


def test_propagate_scripted_pattern(registry, backend):
    model, prompt = run_fixed(registry, backend, "propagate")
    trace, costs = model.last_trace, CostModel.for_model(model)
    assert [r.widths for r in trace.steps[1:4]] == [[1] * 6, [1, 1], [1] * 6]
    spent = 6 * prompt + H + (6 + H) + 3 * (2 + H + 4 * K) + 3 * (6 + H)
    full = 6 * prompt + H + 7 * (6 + H)
    assert layer_speedup(trace, costs) == pytest.approx(full / spent)
    decode = (7 * (6 + H)) / ((6 + H) + 3 * (2 + H + 4 * K) + 3 * (6 + H))
    assert layer_speedup(trace, costs, decode_only=True) == pytest.approx(decode)


def test_skip_scripted_pattern(registry, backend):
    model, prompt = run_fixed(registry, backend, "skip")
    trace, costs = model.last_trace, CostModel.for_model(model)
    spent = 6 * prompt + H + (6 + H) + 3 * (2 + H) + 3 * (6 + H)
    assert layer_speedup(trace, costs) == pytest.approx((6 * prompt + H + 7 * (6 + H)) / spent)


def test_prompt_only_generation_is_full_depth(registry, backend):
    cls = registry.strategy("confidence")
    model = EarlyExitForCausalLM(backend, cls(backend, [1, 2], cls.Config(threshold=0.0)))  # would always leave
    generate(model, backend, new_tokens=1)
    trace, costs = model.last_trace, CostModel.for_model(model)
    assert trace.exit_layers.tolist() == [[6]]
    summary = summarize(trace, costs)
    assert summary["param_speedup"] == 1.0 and summary["layer_speedup"] == pytest.approx(1.0)
    assert summary["exit_layer_histogram"] == {6: 1}


class ScriptedExit(Strategy):
    """Leaves at the first exit on odd tokens; optional attending module or position-wise module."""

    name = "test-scripted"

    def __init__(self, backend, exit_layers, attention=False, transform=False):
        super().__init__(backend, exit_layers)
        layers = backend.decoder_layers()
        self.attention = torch.nn.ModuleList(copy.deepcopy(layers[k]) for k in self.exit_layers) if attention else None
        width = backend.text_config.hidden_size
        self.transform = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in self.exit_layers) \
            if transform else None

    def exit_modules(self):
        return self.attention or self.transform

    def exit_attention_layer(self, e):
        return self.attention[e] if self.attention is not None else None

    def exit_transform(self, e):
        return self.transform[e] if self.transform is not None else None

    def should_exit(self, exit_index, view, context):
        leave = exit_index == 0 and context.step % 2 == 1
        return torch.full((view.hidden.shape[0],), leave)


def test_exit_modules_are_charged_for_every_prompt_position(backend):
    model = EarlyExitForCausalLM(backend, ScriptedExit(backend, [2, 4], attention=True))
    prompt = generate(model, backend, new_tokens=1)
    costs = CostModel.for_model(model)
    assert costs.exit_module_costs == [1.0, 1.0] and costs.exit_kv_costs == [pytest.approx(K)] * 2
    spent = 6 * prompt + H + 2 * prompt * K  # both exit slots get the prompt's K/V
    assert layer_speedup(model.last_trace, costs) == pytest.approx((6 * prompt + H) / spent)
    assert param_speedup(model.last_trace, costs) == 1.0  # no exit module ran whole


def test_attending_module_runs_only_for_leavers(backend):
    model = EarlyExitForCausalLM(backend, ScriptedExit(backend, [2, 4], attention=True))
    prompt = generate(model, backend, new_tokens=3)
    trace, costs = model.last_trace, CostModel.for_model(model)
    assert trace.exit_layers.tolist() == [[6, 2, 6]]
    # step 1 leaves at 2: layers 1-2, the exit slot's K/V, the whole exit layer, its read-out
    # step 2 goes deep with one catch-up position from layer 2 on; both exit slots get K/V
    step1 = 2 + K + 1 + H
    step2 = 2 + 4 * 2 + 2 * K + 2 * K + H
    spent = 6 * prompt + H + 2 * prompt * K + step1 + step2
    assert layer_speedup(trace, costs) == pytest.approx((6 * prompt + H + 2 * (6 + H)) / spent)
    assert param_speedup(trace, costs) == pytest.approx(6 / ((6 + 3 + 6) / 3))


def test_modules_without_attention_are_charged(backend):
    model = EarlyExitForCausalLM(backend, ScriptedExit(backend, [2], transform=True), kv_policy="skip")
    prompt = generate(model, backend, new_tokens=3)
    costs = CostModel.for_model(model)
    linear = (WIDTH * WIDTH + WIDTH) / LAYER
    assert costs.exit_module_costs == [pytest.approx(linear)]
    spent = 6 * prompt + H + (2 + linear + H) + (6 + H)
    assert layer_speedup(model.last_trace, costs) == pytest.approx((6 * prompt + H + 2 * (6 + H)) / spent)


class EndRowAt(LogitsProcessor):
    """Forces end-of-sequence for one row at one step."""

    def __init__(self, row, step, eos):
        self.row, self.step, self.eos, self.calls = row, step, eos, 0

    def __call__(self, input_ids, scores):
        if self.calls == self.step:
            scores[self.row] = -float("inf")
            scores[self.row, self.eos] = 0.0
        self.calls += 1
        return scores


def test_finished_rows_neither_vote_nor_count(registry, backend):
    eos = backend.language_model.generation_config.eos_token_id
    cls = registry.strategy("fixed")
    model = EarlyExitForCausalLM(backend, cls(backend, [2], cls.Config(every=1)))
    inputs = backend.prepare_inputs(make_images(2), ["a red circle", "two"])
    stop = EndRowAt(row=0, step=1, eos=eos)
    sequences = model.generate(**inputs, max_new_tokens=6, do_sample=False, min_new_tokens=0,
                               logits_processor=LogitsProcessorList([stop]))
    trace = model.last_trace
    prompt = inputs["input_ids"].shape[1]
    assert sequences[0, prompt + 1].item() == eos
    # row 0 ended with its second token: later steps give it no exit and no token
    assert trace.exit_layers[0].tolist()[:2] == [6, 2] and (trace.exit_layers[0, 2:] == -1).all()
    assert [r.exit_layer[0].item() for r in trace.steps[2:]] == [-1] * (len(trace.steps) - 2)
    assert summarize(trace, CostModel.for_model(model))["tokens"] == 2 + int((trace.exit_layers[1] >= 0).sum())


def test_trace_ends_at_end_of_sequence():
    from earlyexit.core.accounting import StepRecord, Trace

    steps = [StepRecord(exit_layer=torch.tensor([2, 3]), new_positions=1, widths=[1, 1, 1], exits=[],
                        kv_policy="catchup", prefill=t == 0) for t in range(4)]
    tokens = torch.tensor([[5, 2, 1, 1], [5, 6, 7, 2]])  # eos = 2, pad = 1 after it
    trace = Trace.from_generation(steps, tokens, None, eos_token_id=2, num_layers=4)
    assert trace.per_sequence() == [[2, 2], [3, 3, 3, 3]]


def test_head_is_never_read_where_no_row_leaves(registry, backend, monkeypatch):
    """`fixed` decides from nothing but the token index: one read-out per token, never more."""
    calls = []
    original = backend.logits
    monkeypatch.setattr(backend, "logits", lambda hidden: calls.append(hidden.shape[0]) or original(hidden))
    cls = registry.strategy("fixed")
    model = EarlyExitForCausalLM(backend, cls(backend, [2], cls.Config(every=3)))
    generate(model, backend, new_tokens=7)
    assert len(calls) == 7  # one per forward: at the exit when the token leaves, else at the end
