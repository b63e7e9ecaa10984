"""The few-row CPU matmul route (earlyexit.core.kernels) gives F.linear's result and changes no token."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import make_backend, make_images, no_eos, speculative_matches

from earlyexit.core import kernels
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.errors import ConfigError


def routed_layers(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear) and "forward" in vars(m)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
def test_small_row_linear_equals_linear(rows, bias):
    torch.manual_seed(rows)
    weight = torch.randn(512, 512)  # 2^18 elements: above MIN_WEIGHT
    b = torch.randn(512) if bias else None
    x = torch.randn(1, rows, 512)
    with torch.no_grad():
        got, want = kernels.small_row_linear(x, weight, b), F.linear(x, weight, b)
    assert got.shape == want.shape == (1, rows, 512)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_the_rule():
    square, head = torch.empty(576, 576), torch.empty(2048, 8192)  # 2^24 elements: a head
    assert [kernels.chooses_transposed(square, r) for r in (1, 2, 4, 5, 8)] == [True, True, True, False, False]
    assert [kernels.chooses_transposed(head, r) for r in (1, 5, 8, 9)] == [False, True, True, False]
    assert not kernels.chooses_transposed(torch.empty(128, 512), 2)  # too small to gain
    assert [kernels.chooses_transposed(torch.empty(192, 768), r) for r in (1, 2)] == [False, True]
    assert not kernels.chooses_transposed(torch.empty(768, 3072), 1)  # one row, wide input: measured slower
    assert kernels.chooses_transposed(torch.empty(768, 3072), 2)
    assert not kernels.chooses_transposed(torch.empty(576, 576, dtype=torch.bfloat16), 2)


def test_falls_back_to_linear_exactly():
    weight, x = torch.randn(512, 512), torch.randn(3, 512)
    with torch.no_grad():
        small = torch.randn(128, 512)  # under MIN_WEIGHT
        assert torch.equal(kernels.small_row_linear(x, small), F.linear(x, small))
        many = torch.randn(20, 512)
        assert torch.equal(kernels.small_row_linear(many, weight), F.linear(many, weight))
        half = weight.bfloat16()
        assert torch.equal(kernels.small_row_linear(x.bfloat16(), half), F.linear(x.bfloat16(), half))
    # gradients on (training): F.linear, and gradients flow
    weight.requires_grad_(True)
    out = kernels.small_row_linear(x, weight)
    assert torch.equal(out, F.linear(x, weight))
    out.sum().backward()
    assert weight.grad is not None


def test_install_uninstall_and_deepcopy(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256, bias=False),
                                torch.nn.Linear(256, 64))  # the last is under MIN_WEIGHT: left alone
    assert kernels.install(model) == 2
    assert kernels.install(model) == 0  # idempotent
    assert routed_layers(model) == [model[0], model[2]]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.mul_(2)
        x = torch.randn(2, 512)
        # the copy's route reads the copy's weights, not the original's
        torch.testing.assert_close(twin[0](x), F.linear(x, twin[0].weight, twin[0].bias), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(model(x), model[3](model[2](torch.relu(model[0](x)))))
    kernels.uninstall(model)
    assert routed_layers(model) == []
    monkeypatch.setenv(kernels.ENV, "0")
    assert kernels.install(model) == 0
    monkeypatch.setenv(kernels.ENV, "maybe")
    with pytest.raises(ConfigError, match=kernels.ENV):
        kernels.install(model)


@pytest.mark.parametrize("make", ["load", "tiny_config"])
def test_a_backend_routes_its_model(registry, monkeypatch, make):
    monkeypatch.setattr(kernels, "MIN_WEIGHT", 0)  # the test model is far smaller than real ones
    cls = registry.backend("blip2-opt")
    backend = cls.load("tiny-random") if make == "load" else cls.from_tiny_config(seed=0)
    linears = [m for m in backend.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and len(routed_layers(backend.model)) == len(linears)


@pytest.fixture
def routed_micro(monkeypatch):
    """A micro model whose every linear takes the few-row route (its weights are far under
    MIN_WEIGHT, so lower it)."""
    monkeypatch.setattr(kernels, "MIN_WEIGHT", 0)
    monkeypatch.setattr(kernels, "MIN_WEIGHT_ONE_ROW", 0)
    return make_backend(seed=3, num_layers=6)


def test_routed_generation_keeps_every_token(registry, routed_micro):
    backend = routed_micro
    inputs = backend.prepare_inputs(make_images(3, seed=2), ["a red circle", "", "what color"])
    settings = dict(max_new_tokens=8, do_sample=False, **no_eos(backend))
    kernels.uninstall(backend.model)  # made routed: take it off for the reference
    with torch.no_grad():
        unrouted = backend.plain_generate(**inputs, **settings)
    model = EarlyExitForCausalLM(backend)  # routes the backbone again
    assert routed_layers(backend.language_model)
    head = backend.language_model.lm_head.weight
    assert all(kernels.chooses_transposed(head, rows) for rows in (1, 2, 3, 4))
    with torch.no_grad():
        plain = backend.plain_generate(**inputs, **settings)
    assert torch.equal(plain, unrouted)
    assert torch.equal(model.generate(**inputs, **settings), plain)
    free = registry.strategy("free")(backend, [2, 4])
    with torch.no_grad():
        stats = speculative_matches(backend, free, inputs, 0, 3, max_new_tokens=8)
    assert routed_layers(free.exit_modules())  # the exits took the route too
    assert stats.drafted > 0
