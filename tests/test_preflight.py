"""`run`'s pre-flight memory check: from the model's config, before any weight loads."""

from __future__ import annotations

import pytest
from helpers import make_backend

from earlyexit.errors import ConfigError
from earlyexit.models import estimate as est
from earlyexit.pipeline import memory, run as run_module
from earlyexit.pipeline.settings import RunSettings
from earlyexit.plugins.registry import get_registry


class Loaded(Exception):
    """Raised where the run would load the model: the check let it through."""


@pytest.fixture
def no_loading(monkeypatch):
    def load_models(run):
        raise Loaded()

    monkeypatch.setattr(run_module, "load_models", load_models)


def test_a_run_that_cannot_fit_is_refused_before_loading_naming_the_knob(no_loading, monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 16 * est.GiB)
    settings = RunSettings(backend="blip2-opt", strategy="mue", model="Salesforce/blip2-opt-6.7b", device="cpu",
                           dtype="bfloat16", progress=False)
    with pytest.raises(ConfigError) as refused:
        run_module.run(settings, get_registry(), log=lambda *a: None)
    message = str(refused.value)
    assert "\n" not in message and "16.0 GiB free" in message and "--zero 3" in message  # MuE's AdamW state
    assert memory.SKIP_VARIABLE in message
    monkeypatch.setenv(memory.SKIP_VARIABLE, "1")  # the user's way to try anyway
    with pytest.raises(Loaded):
        run_module.run(settings, get_registry(), log=lambda *a: None)


def test_the_estimate_reads_the_runs_settings(monkeypatch):
    registry = get_registry()
    base = RunSettings(backend="blip2-opt", strategy="free", model="Salesforce/blip2-opt-2.7b", device="cpu",
                       dtype="bfloat16")
    parts, device = memory.run_estimate(base, registry)
    shape = est.model_shape(est.paper_config("Salesforce/blip2-opt-2.7b"))
    prompt = shape.query_tokens + est.PROMPT_TOKENS["caption"]
    # decoding K/V of 32 rows, FREE's 3 exit layers with their own cache slots (the formula in estimate's docstring)
    expected_kv = 2 * (shape.num_layers + 3) * 32 * (prompt + 20) * shape.kv_width * 2
    decoding = est.estimate(shape, est.Settings(strategy="free", exits=3, dtype="bfloat16", batch_size=32, num_beams=1,
                                                max_new_tokens=20, prompt_tokens=est.PROMPT_TOKENS["caption"]))
    assert decoding["kv"] == expected_kv and device == "cpu"
    assert parts["total"] >= decoding["total"] - decoding["baseline"]  # training's peak is the larger here
    beams = memory.run_estimate(RunSettings(**{**base.__dict__, "num_beams": 5, "strategy": "confidence"}), registry)[0]
    confidence = memory.run_estimate(RunSettings(**{**base.__dict__, "strategy": "confidence"}), registry)[0]
    assert beams["kv"] == 5 * confidence["kv"]  # nothing to train: the decoding estimate, K/V grows with the rows


def test_embedded_models_are_not_estimated_and_a_folder_is_read_from_its_config(tmp_path, monkeypatch):
    registry = get_registry()
    assert memory.run_estimate(RunSettings(backend="blip2-opt", strategy="free", model="tiny"), registry) is None
    make_backend(seed=1, num_layers=2).save_pretrained(str(tmp_path / "model"))
    settings = RunSettings(backend="blip2-opt", strategy="free", model=str(tmp_path / "model"), device="cpu")
    parts, _ = memory.run_estimate(settings, registry)
    lines = []
    memory.check_memory(settings, registry, lines.append)
    assert lines == []  # fits with room to spare: nothing to say
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: int(parts["total"] * 1.5))
    memory.check_memory(settings, registry, lines.append)  # fits, but takes more than half: said once
    assert len(lines) == 1 and lines[0].startswith("memory: about ") and "free on cpu" in lines[0]
