"""With exits off, the early-exit model must generate exactly what the backbone generates."""

import pytest
import torch

from earlyexit.engine import EarlyExitForCausalLM

from helpers import make_backend, make_images

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
