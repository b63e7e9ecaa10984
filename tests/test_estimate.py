"""The pre-flight memory estimate: parameter counts of the paper's models built on the meta
device (no download), K/V and feature-cache sizes against the formulas worked by hand, and the
one-line refusal that names the knob."""

from __future__ import annotations

import json

import pytest

from earlyexit.errors import ConfigError
from earlyexit.models import estimate as est

GiB = 2**30


@pytest.fixture(scope="module")
def shapes():
    return {hub: est.model_shape(est.paper_config(hub)) for hub in est.PAPER_MODELS}


# published sizes (model cards / papers): whole model and its language model, in billions
PUBLISHED = {"Salesforce/blip2-opt-2.7b": (3.8, 2.7), "Salesforce/blip2-opt-6.7b": (7.8, 6.7),
             "Salesforce/blip2-flan-t5-xl": (3.9, 2.85), "Salesforce/instructblip-vicuna-7b": (7.9, 6.74)}


@pytest.mark.parametrize("hub", list(PUBLISHED))
def test_parameter_counts_match_the_published_sizes(shapes, hub):
    shape, (total, language) = shapes[hub], PUBLISHED[hub]
    assert shape.parameters["total"] / 1e9 == pytest.approx(total, rel=0.04)
    assert shape.parameters["language"] / 1e9 == pytest.approx(language, rel=0.04)
    assert shape.parameters["vision"] / 1e9 == pytest.approx(0.985, rel=0.02)  # EVA ViT-g/14


def test_opt_layer_and_readout_counts_are_exact(shapes):
    s = shapes["Salesforce/blip2-opt-2.7b"]
    w, f = 2560, 10240
    # q, k, v, out (weights + biases), fc1, fc2, two layer norms
    assert s.layer_parameters == 4 * (w * w + w) + (w * f + f) + (f * w + w) + 2 * 2 * w
    assert s.readout_parameters == 50272 * w + 2 * w  # the tied head and the final layer norm
    assert (s.num_layers, s.kv_width, s.query_tokens) == (32, 2560, 32)


def test_kv_bytes_equal_the_formula_by_hand(shapes):
    opt67 = shapes["Salesforce/blip2-opt-6.7b"]
    # 2 (K and V) x 32 layers x (32 batch x 5 beams) x (32 queries + 12 prompt + 30 new) x 4096 x 2 bytes
    assert est.kv_bytes(opt67, 160, 44, 30, 2) == 2 * 32 * 160 * 74 * 4096 * 2 == 6_207_569_920
    parts = est.estimate(opt67, est.Settings(strategy="deebert", batch_size=32, num_beams=5, max_new_tokens=30))
    assert parts["kv"] == 6_207_569_920
    free = est.estimate(opt67, est.Settings(strategy="free", exits=3, batch_size=32, num_beams=5))
    assert free["kv"] == 2 * 35 * 160 * 74 * 4096 * 2  # FREE's exit transformers keep their own slots
    t5 = shapes["Salesforce/blip2-flan-t5-xl"]
    # decoder self-attention over 1 + 30 positions, cross-attention over the 44 encoder positions
    assert est.kv_bytes(t5, 10, 44, 30, 2) == 2 * 24 * 10 * 31 * 2048 * 2 + 2 * 24 * 10 * 44 * 2048 * 2
    visdial = est.estimate(shapes["Salesforce/blip2-opt-2.7b"],
                           est.Settings(strategy="deebert", option_rows=100, prompt_tokens=400, max_new_tokens=20))
    assert visdial["kv"] == 2 * 32 * 100 * (32 + 400 + 20) * 2560 * 2  # ~13.8 GiB: VisDial's 100 option rows
    assert visdial["kv"] / GiB == pytest.approx(13.8, abs=0.1)


def test_feature_cache_and_optimizer_follow_the_formulas(shapes):
    s = shapes["Salesforce/blip2-opt-2.7b"]
    settings = est.Settings(strategy="deebert", exits=3, train=True, train_items=1000, batch_size=16,
                            prompt_tokens=12, train_tokens=20, feature_cache_budget=100 * GiB)
    parts = est.estimate(s, settings)
    # ceil(1000/16) = 63 batches x 16 rows x (32 + 12 + 20) positions x 2560 x 2 bytes x (3 exits + last)
    assert parts["feature_cache"] == 63 * 16 * 64 * 2560 * 2 * 4
    trainable = 3 * s.readout_parameters
    assert parts["gradients"] == trainable * 2
    assert parts["optimizer"] == trainable * 12  # two fp32 moments + fp32 masters of bf16 weights
    capped = est.estimate(s, est.Settings(**{**vars(settings), "feature_cache_budget": GiB}))
    assert capped["feature_cache"] == GiB
    fp32 = est.estimate(s, est.Settings(**{**vars(settings), "dtype": "float32"}))
    assert fp32["optimizer"] == trainable * 8  # no masters when the weights are fp32


def test_zero_shards_what_each_stage_shards(shapes):
    s = shapes["Salesforce/instructblip-vicuna-7b"]
    base = dict(strategy="mue", train=True, train_items=1000, batch_size=4)
    plain = est.estimate(s, est.Settings(**base))
    copies = 32 * s.layer_parameters
    assert plain["optimizer"] == copies * 12 and plain["feature_cache"] == 0  # copies train: no frozen features
    assert copies * 12 / 1e9 == pytest.approx(77.7, rel=0.01)  # MuE's layer copies at 7B: 78 GB of AdamW state
    z1 = est.estimate(s, est.Settings(**base, zero_stage=1, world_size=8))
    z3 = est.estimate(s, est.Settings(**base, zero_stage=3, world_size=8))
    assert z1["optimizer"] == copies * 12 // 8 and z1["gradients"] == plain["gradients"]
    assert z3["gradients"] == copies * 2 // 8
    assert z3["weights"] == s.parameters["total"] * 2 + copies * 2 // 8


def test_a_run_that_does_not_fit_is_one_line_naming_the_knob(shapes):
    s = shapes["Salesforce/blip2-opt-6.7b"]
    big_beams = est.estimate(s, est.Settings(strategy="deebert", batch_size=256, num_beams=5, max_new_tokens=60))
    with pytest.raises(ConfigError) as error:
        est.check_fits(big_beams, 80 * GiB)
    message = str(error.value)
    assert "\n" not in message and "largest part is kv" in message and "--num-beams" in message
    training = est.estimate(s, est.Settings(strategy="mue", train=True, train_items=100, batch_size=1))
    with pytest.raises(ConfigError, match="largest part is optimizer.*--zero 3"):
        est.check_fits(training, 80 * GiB)
    est.check_fits(est.estimate(s, est.Settings(strategy="deebert", batch_size=4, num_beams=1)), 80 * GiB)
    est.check_fits(big_beams, None)  # memory unknown: no refusal


# -- the estimate against a real process ----------------------------------------------------------------
CHILD = """
import json, resource, sys
sys.path.insert(0, {tests!r})
import torch
from helpers import make_images, no_eos
from earlyexit.backends.blip2_opt import Blip2OptBackend
from earlyexit.core.engine import EarlyExitForCausalLM

layers, width, batch, new = map(int, sys.argv[1:])
with open("/proc/self/statm") as handle:  # resident now: the runtime, after imports and before any model
    before = int(handle.read().split()[1]) * resource.getpagesize()
backend = Blip2OptBackend.from_tiny_config(seed=0, num_layers=layers, hidden_size=width, num_heads=8, vocab_size=32000)
inputs = backend.prepare_inputs(make_images(batch), ["a photo of"] * batch)
if new:
    with torch.no_grad():
        EarlyExitForCausalLM(backend).generate(**inputs, max_new_tokens=new, do_sample=False, **no_eos(backend))
weights = sum(p.numel() * p.element_size() for p in backend.model.parameters())
print(json.dumps({{"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "weights": weights,
                  "before": before,
                  "prompt": inputs["input_ids"].shape[1], "config": backend.model.config.to_json_string()}}))
"""


def measured(layers: int, width: int, batch: int, new: int) -> dict:
    import os
    import subprocess
    import sys

    code = CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code, str(layers), str(width), str(batch), str(new)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_estimate_of_a_short_decode_is_within_15_percent_of_the_measured_peak():
    """Peak RSS of a child that builds a 12-layer, 1280-wide BLIP-2 OPT (about 280 M parameters, fp32)
    and decodes 16 rows greedily for 20 tokens through the early-exit engine, against the
    estimate plus the baseline measured in that child: its resident memory after the imports,
    before the model (a fresh machine's import peak can pass it, and is freed before the model
    loads, so another process's peak would not do)."""
    from transformers import Blip2Config

    run = measured(12, 1280, 16, 20)
    shape = est.model_shape(Blip2Config.from_dict(json.loads(run["config"])))
    assert shape.parameters["total"] * 4 == run["weights"]  # the meta count is the built model's
    settings = est.Settings(strategy="fixed", exits=0, dtype="float32", batch_size=16, num_beams=1, max_new_tokens=20,
                            prompt_tokens=run["prompt"] - shape.query_tokens, baseline=run["before"])
    parts = est.estimate(shape, settings)
    assert parts["weights"] > parts["baseline"] / 2  # the model, not the runtime, decides the comparison
    assert parts["total"] == pytest.approx(run["maxrss"], rel=0.15), (parts, run["maxrss"])


def test_available_memory_is_the_gpus_free_memory_on_cuda(monkeypatch):
    import torch

    from earlyexit.util import devices

    assert devices.available_memory_bytes("cpu") == devices.host_memory_bytes()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (3 * GiB, 80 * GiB))
    assert devices.available_memory_bytes("cuda:1") == 3 * GiB  # free, not total, and not the host's
    assert asked == [torch.device("cuda:1")]
