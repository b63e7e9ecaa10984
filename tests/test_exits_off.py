"""With exits off, the early-exit model must generate exactly what the backbone generates."""

import pytest
import torch
from helpers import make_backend, make_images

from earlyexit.core.engine import EarlyExitForCausalLM

SHAPES = [
    dict(num_layers=2, hidden_size=32, num_heads=4),
    dict(num_layers=4, hidden_size=48, num_heads=6, word_embed_proj_dim=24),  # project_in/out
    dict(num_layers=6, hidden_size=32, num_heads=2, do_layer_norm_before=False),  # OPT-350m style
    dict(num_layers=3, hidden_size=64, num_heads=8, num_query_tokens=6),
]
PROMPTS = [["a red circle", "two"], ["", "what color is the small square on the left"]]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("prompts", PROMPTS, ids=["short", "long"])
@pytest.mark.parametrize("num_beams", [1, 5])
def test_same_tokens_as_backbone(registry, shape, prompts, num_beams):
    backend = make_backend(seed=3, **shape)
    inputs = backend.prepare_inputs(make_images(len(prompts), seed=4), prompts)
    assert (inputs["attention_mask"] == 0).any(), "the batch should need left padding"
    settings = dict(max_new_tokens=10, num_beams=num_beams, do_sample=False)
    expected = backend.plain_generate(**inputs, **settings)

    plain = EarlyExitForCausalLM(backend).generate(**inputs, **settings)
    assert torch.equal(plain, expected)

    # a threshold no exit can reach: exits are consulted but never taken
    strategy = registry.strategy("confidence")(backend, [1], registry.strategy("confidence").Config(threshold=1.5))
    model = EarlyExitForCausalLM(backend, strategy)
    assert torch.equal(model.generate(**inputs, **settings), expected)
    layers = model.last_trace.exit_layers
    assert ((layers == backend.num_layers) | (layers == -1)).all()


class StopAfterToken:
    """A user's stopping criterion: a row is done once it emitted `token` (HF's interface)."""

    def __init__(self, token: int, prompt_length: int):
        self.token, self.prompt_length = token, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_length:] == self.token).any(-1)


@pytest.mark.parametrize("with_exits", [False, True], ids=["no strategy", "exits never taken"])
def test_sampling_and_stopping_criteria_work_unchanged(registry, with_exits):
    """Seeded sampling (temperature, top-k, top-p), a user's stopping criterion and the length
    limits give the backbone's own tokens, token for token."""
    from transformers import StoppingCriteriaList

    backend = make_backend(seed=7, num_layers=4)
    inputs = backend.prepare_inputs(make_images(3, seed=2), ["a red circle", "two", ""])
    strategy = None
    if with_exits:
        confidence = registry.strategy("confidence")
        strategy = confidence(backend, [1, 2], confidence.Config(threshold=1.5))
    model = EarlyExitForCausalLM(backend, strategy)
    prompt_length = inputs["input_ids"].shape[1]

    def both(**settings):
        torch.manual_seed(11)
        expected = backend.plain_generate(**inputs, **settings)
        torch.manual_seed(11)
        return model.generate(**inputs, **settings), expected

    sampled, expected = both(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, max_new_tokens=12,
                             min_new_tokens=3)
    assert torch.equal(sampled, expected)
    torch.manual_seed(12)  # another seed gives other tokens: the comparison above could fail
    assert not torch.equal(model.generate(**inputs, do_sample=True, temperature=1.3, top_k=20, top_p=0.9,
                                          max_new_tokens=12, min_new_tokens=3), sampled)

    stop_token = int(sampled[0, prompt_length + 1])  # a token row 0 emits: stops it early
    criteria = StoppingCriteriaList([StopAfterToken(stop_token, prompt_length)])
    stopped, expected = both(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, max_new_tokens=12,
                             stopping_criteria=criteria)
    assert torch.equal(stopped, expected)
    assert stopped.shape[1] <= sampled.shape[1]

    short, expected = both(do_sample=True, max_length=prompt_length + 4)
    assert torch.equal(short, expected) and short.shape[1] <= prompt_length + 4
