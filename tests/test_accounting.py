"""Speed accounting against hand-computed values for a scripted exit pattern."""

import pytest

from earlyexit.accounting import CostModel, layer_speedup, param_speedup, summarize
from earlyexit.engine import EarlyExitForCausalLM
from helpers import make_backend, make_images, no_eos

# the tiny model: width 32, ffn 128, vocabulary 100, 6 layers
WIDTH, FFN, VOCAB = 32, 128, 100
LAYER = 4 * (WIDTH * WIDTH + WIDTH) + (WIDTH * FFN + FFN) + (FFN * WIDTH + WIDTH) + 2 * 2 * WIDTH
HEAD = VOCAB * WIDTH + 2 * WIDTH  # tied LM head + final layer norm
KV = 2 * (WIDTH * WIDTH + WIDTH) + 2 * WIDTH  # k/v projections + the attention layer norm


@pytest.fixture(scope="module")
def backend():
    return make_backend(seed=2, num_layers=6, vocab_size=VOCAB)


def run_fixed(registry, backend, policy):
    cls = registry.strategy("fixed")
    model = EarlyExitForCausalLM(backend, cls(backend, [2], cls.Config(every=2)), kv_policy=policy)
    inputs = backend.prepare_inputs(make_images(1), ["a red circle"])
    model.generate(**inputs, max_new_tokens=8, do_sample=False, **no_eos(backend))
    return model


def test_cost_model_sizes(registry, backend):
    costs = CostModel.for_model(run_fixed(registry, backend, "catchup"))
    assert costs.layer_params == [LAYER] * 6
    assert costs.head_cost == pytest.approx(HEAD / LAYER)
    assert costs.kv_fill_cost == pytest.approx(KV / LAYER)


def test_catchup_scripted_pattern(registry, backend):
    model = run_fixed(registry, backend, "catchup")
    trace, costs = model.last_trace, CostModel.for_model(model)
    # token 0 comes from the prompt forward (full depth, exit consulted); then full, exit, ...
    assert trace.exit_layers.tolist() == [[2, 6, 2, 6, 2, 6, 2, 6]]
    assert [r.layer_evals for r in trace.steps] == [6, 6, 2, 10, 2, 10, 2, 10]  # 10 = 2 + 4 layers x 2 positions
    assert [r.catchup_evals for r in trace.steps] == [0, 0, 0, 1, 0, 1, 0, 1]
    assert [r.head_evals for r in trace.steps] == [2, 2, 1, 2, 1, 2, 1, 2]
    assert param_speedup(trace, costs) == pytest.approx(6 / 4)
    head = HEAD / LAYER
    assert layer_speedup(trace, costs) == pytest.approx(8 * (6 + head) / (48 + 13 * head))
    summary = summarize(trace, costs)
    assert summary["exit_layer_histogram"] == {2: 4, 6: 4}
    assert summary["tokens"] == 8 and summary["catchup_evals"] == 3


def test_propagate_scripted_pattern(registry, backend):
    model = run_fixed(registry, backend, "propagate")
    trace, costs = model.last_trace, CostModel.for_model(model)
    assert [r.layer_evals for r in trace.steps] == [6, 6, 2, 6, 2, 6, 2, 6]
    assert [r.kv_fill_evals for r in trace.steps] == [0, 0, 4, 0, 4, 0, 4, 0]
    head, kv = HEAD / LAYER, KV / LAYER
    assert layer_speedup(trace, costs) == pytest.approx(8 * (6 + head) / (36 + 13 * head + 12 * kv))


def test_skip_scripted_pattern(registry, backend):
    model = run_fixed(registry, backend, "skip")
    trace, costs = model.last_trace, CostModel.for_model(model)
    assert [r.layer_evals for r in trace.steps] == [6, 6, 2, 6, 2, 6, 2, 6]
    head = HEAD / LAYER
    assert layer_speedup(trace, costs) == pytest.approx(8 * (6 + head) / (36 + 13 * head))


def test_exit_modules_count_in_param_speedup():
    costs = CostModel(layer_params=[10] * 4, head_cost=0.5, kv_fill_cost=0.1,
                      exit_layers=[1, 2], exit_module_costs=[1.0, 1.0])
    # a token leaving at 2 used layers 1-2 and both exit modules (one layer each)
    assert costs.token_params(2) == 40
    assert costs.token_params(1) == 20
    assert costs.token_params(4) == 60  # full depth still paid for the exits it checked


def test_trace_ends_at_end_of_sequence():
    import torch

    from earlyexit.accounting import Trace
    from earlyexit.engine import StepRecord

    steps = [StepRecord(exit_layer=torch.tensor([2, 3]), depth=3, prefill=t == 0) for t in range(4)]
    tokens = torch.tensor([[5, 2, 1, 1], [5, 6, 7, 2]])  # eos = 2, pad = 1 after it
    trace = Trace.from_generation(steps, tokens, None, eos_token_id=2, num_layers=4)
    assert trace.per_sequence() == [[2, 2], [3, 3, 3, 3]]
