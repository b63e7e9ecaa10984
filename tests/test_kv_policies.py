"""Cache invariants of the three kv policies."""

import copy

import pytest
import torch
from helpers import (assert_cache_matches_full_forward, assert_exit_slots_match_running_the_modules, fixed_exit,
                     make_backend, make_images, no_eos)
from transformers import LogitsProcessor, LogitsProcessorList

from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.core.strategy import Strategy

ATOL = 1e-4


class CacheSnapshots(LogitsProcessor):
    """Copies the cache and the running sequences (beams, in cache row order) at every step."""

    def __init__(self, cache):
        self.cache, self.snapshots = cache, []

    def __call__(self, input_ids, scores):
        self.snapshots.append((input_ids.clone(), copy.deepcopy(self.cache)))
        return scores


@pytest.mark.parametrize("every", [1, 2, 3])
def test_catchup_cache_equals_full_forward_greedy(registry, backend6, batch2, every):
    model = EarlyExitForCausalLM(backend6, fixed_exit(registry, backend6, 2, every), kv_policy="catchup")
    sequences = model.generate(**batch2, max_new_tokens=9, do_sample=False, **no_eos(backend6))
    layers = model.last_trace.exit_layers
    assert (layers == 2).any()
    if every > 1:
        assert (layers == 6).any()
        assert sum(r.catchup_positions for r in model.last_trace.steps) > 0
    lagging = assert_cache_matches_full_forward(model.last_cache, backend6, batch2, sequences)
    # held is non-increasing with depth: deep layers lag by the positions still waiting
    held = model.last_cache.held
    assert (held[:, 1:] <= held[:, :-1]).all()
    assert (lagging > 0) == (model.last_trace.exit_layers[:, -1] == 2).any().item()


def test_catchup_with_confidence_mixes_depths(registry, backend6, batch2):
    cls = registry.strategy("confidence")
    model = EarlyExitForCausalLM(backend6, cls(backend6, [2, 4], cls.Config(threshold=0.1)))
    sequences = model.generate(**batch2, max_new_tokens=12, do_sample=False, **no_eos(backend6))
    depths = {r.depth for r in model.last_trace.steps[1:]}
    assert len(depths) >= 2, f"threshold should give a mix of depths, got {depths}"
    assert_cache_matches_full_forward(model.last_cache, backend6, batch2, sequences)


def test_catchup_cache_equals_full_forward_beam(registry, backend6, batch2):
    model = EarlyExitForCausalLM(backend6, fixed_exit(registry, backend6, 3, 2), kv_policy="catchup")
    cache = model.new_cache()
    snapshots = CacheSnapshots(cache)
    model.generate(**batch2, max_new_tokens=7, num_beams=3, do_sample=False, cache=cache,
                   logits_processor=LogitsProcessorList([snapshots]), **no_eos(backend6))
    assert (model.last_trace.exit_layers == 3).any()
    assert sum(r.catchup_positions for r in model.last_trace.steps) > 0
    for running, snapshot in snapshots.snapshots[1:]:
        # after each forward the cache holds every fed token of the running beams
        assert_cache_matches_full_forward(snapshot, backend6, batch2, running, drop_last=False)


def test_propagate_fills_deep_layers_from_exit_state(registry, backend6, batch2):
    exit_depth = 2
    model = EarlyExitForCausalLM(backend6, fixed_exit(registry, backend6, exit_depth, 2), kv_policy="propagate")
    states = []  # output of the last layer run before an exit, per forward
    hook = model.layers[exit_depth - 1].register_forward_hook(lambda m, a, out: states.append(out))
    try:
        model.generate(**batch2, max_new_tokens=7, do_sample=False, **no_eos(backend6))
    finally:
        hook.remove()
    cache = model.last_cache
    prompt = batch2["input_ids"].shape[1]
    exited_steps = [t for t, r in enumerate(model.last_trace.steps) if r.depth == exit_depth]
    assert exited_steps, "fixed every=2 must exit on some tokens"
    for t in exited_steps:
        position = prompt + t - 1  # step t feeds the token generated at step t-1
        exit_state = states[t][:, -1:]
        for j in range(exit_depth, backend6.num_layers):
            layer = model.layers[j]
            x = layer.self_attn_layer_norm(exit_state)
            attn = layer.self_attn
            keys = attn.k_proj(x).view(2, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            values = attn.v_proj(x).view(2, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            torch.testing.assert_close(cache.layers[j].keys[:, :, position:position + 1], keys)
            torch.testing.assert_close(cache.layers[j].values[:, :, position:position + 1], values)


def test_skip_leaves_exited_positions_out_of_deep_layers(registry, backend6, batch2):
    model = EarlyExitForCausalLM(backend6, fixed_exit(registry, backend6, 2, 2), kv_policy="skip")
    model.generate(**batch2, max_new_tokens=7, do_sample=False, **no_eos(backend6))
    cache = model.last_cache
    prompt = batch2["input_ids"].shape[1]
    skipped = {prompt + t - 1 for t, r in enumerate(model.last_trace.steps) if r.depth == 2}
    assert skipped
    # the depth each position reached; layer j attends only to positions that reached beyond it
    reached = cache.reached[:, :cache.total_length]
    for p in range(cache.total_length):
        assert (reached[:, p] == (2 if p in skipped else 6)).all()


class AttentionExit(Strategy):
    """Test strategy with an exit transformer (a copy of a backbone layer), like FREE at inference."""

    name = "test-attention-exit"

    def __init__(self, backend, exit_layers, every=2):
        super().__init__(backend, exit_layers)
        self.every = every
        self.modules = torch.nn.ModuleList(
            copy.deepcopy(backend.decoder_layers()[k]) for k in self.exit_layers)

    def exit_modules(self):
        return self.modules

    def exit_attention_layer(self, exit_index):
        return self.modules[exit_index]

    def should_exit(self, exit_index, view, context):
        return torch.full((view.hidden.shape[0],), context.step % self.every == 0)


def test_exit_transformer_keeps_its_own_exact_cache_under_catchup(backend6, batch2):
    strategy = AttentionExit(backend6, [2, 4], every=3)
    model = EarlyExitForCausalLM(backend6, strategy, kv_policy="catchup")
    sequences = model.generate(**batch2, max_new_tokens=9, do_sample=False, **no_eos(backend6))
    # reference: each exit transformer run once over the full forward's hidden states at its depth
    assert_exit_slots_match_running_the_modules(model, batch2, sequences, strategy.modules, atol=ATOL)
    assert_cache_matches_full_forward(model.last_cache, backend6, batch2, sequences)


class Scripted(Strategy):
    """Rows leave where a script says ({step: {row: exit index}}; unnamed rows go to full depth),
    each exit with an exit transformer (a copy of a backbone layer) of its own."""

    name = "test-scripted"

    def __init__(self, backend, exit_layers, script):
        super().__init__(backend, exit_layers)
        self.script = script
        self.modules = torch.nn.ModuleList(copy.deepcopy(backend.decoder_layers()[k]) for k in self.exit_layers)

    def exit_modules(self):
        return self.modules

    def exit_attention_layer(self, exit_index):
        return self.modules[exit_index]

    def should_exit(self, exit_index, view, context):
        plan = self.script.get(context.step, {})
        return torch.tensor([plan.get(int(r)) == exit_index for r in view.rows])


def llama_backend():
    from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend

    return Minigpt4LlamaBackend.from_tiny_config(seed=1, num_layers=6, hidden_size=32, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("make", [lambda: make_backend(seed=1, num_layers=6), llama_backend], ids=["opt", "llama"])
def test_catchup_when_rows_lag_from_different_depths(make):
    """A row that left at a deeper exit than another row of the same step catches up in the same
    call as that row: at the deeper layer its own waiting state must enter the block (its entries
    there were only padding until then)."""
    backend = make()
    inputs = backend.prepare_inputs(make_images(3, seed=2), ["a red circle", "what color is the small square", ""])
    script = {2: {0: 1, 2: 0}, 4: {1: 0, 0: 1}, 5: {2: 1, 1: 1}, 6: {0: 0}}
    strategy = Scripted(backend, [2, 4], script)
    model = EarlyExitForCausalLM(backend, strategy, kv_policy="catchup")
    sequences = model.generate(**inputs, max_new_tokens=9, do_sample=False, **no_eos(backend))
    layers = model.last_trace.exit_layers
    assert layers[:, 2].tolist() == [4, 6, 2] and layers[:, 5].tolist() == [6, 4, 4]
    assert_exit_slots_match_running_the_modules(model, inputs, sequences, strategy.modules, atol=ATOL)
    assert_cache_matches_full_forward(model.last_cache, backend, inputs, sequences)
