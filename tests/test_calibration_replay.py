"""Calibration by replay: one teacher-forced pass predicts, for every confidence threshold, which dev
outputs equal the full model's (checked against real greedy decoding of the same rows), at most two
values are decoded, and rules the replay cannot model still decode the whole grid."""

import types

import numpy as np
import pytest
import torch
from helpers import make_backend

import earlyexit.evaluation.calibrate as calibrate
from earlyexit.core.gates import CosineGate, make_gate
from earlyexit.data.registry import load_dataset
from earlyexit.evaluation.calibrate import Knob, confirmation_rows, replay_refusal, replayed_sweep, sweep
from earlyexit.evaluation.common import EvalSettings
from earlyexit.evaluation.evaluate import evaluate
from earlyexit.evaluation.replay import replay_confidence_rule
from earlyexit.pipeline.calibration import knob_points

SETTINGS = EvalSettings(batch_size=4, max_new_tokens=8, measure_wall=False, progress=False, quick_metrics=True)


@pytest.fixture(scope="module")
def backend():
    return make_backend(seed=1, num_layers=6)


@pytest.fixture(scope="module")
def dev():
    return load_dataset("scenes", "dev").subset(12)


@pytest.fixture(scope="module")
def confidence(registry, backend):
    cls = registry.strategy("confidence")
    return cls(backend, [2, 4], cls.Config())


@pytest.fixture(scope="module")
def replay(backend, confidence, dev):
    return replay_confidence_rule(backend, confidence, dev, SETTINGS)


@pytest.fixture
def decodes(monkeypatch):
    """Every `evaluate` calibration makes, as (knob value or None for the full model)."""
    calls = []

    def counted(backend, strategy, *args, **kwargs):
        calls.append(None if strategy is None else strategy.knob_value)
        return evaluate(backend, strategy, *args, **kwargs)

    monkeypatch.setattr(calibrate, "evaluate", counted)
    return calls


def between_confidences(replay, share):
    """A threshold halfway between two neighbouring replayed confidences (no float tie possible),
    about `share` of the way up their range."""
    values = np.unique(replay.confidence[~replay.first])
    k = int(share * (len(values) - 1))
    return float((values[k] + values[k + 1]) / 2)


def test_replayed_agreement_is_what_greedy_decoding_gives(backend, confidence, dev, replay):
    full = evaluate(backend, None, dev, SETTINGS)["predictions"]
    assert replay.predictions == full  # the replay's greedy outputs are the full model's
    seen = set()
    for share in (0.2, 0.5, 0.95):
        threshold = between_confidences(replay, share)
        confidence.set_knob(threshold)
        real = evaluate(backend, confidence, dev, SETTINGS)
        predicted = replay.predict(threshold)
        differ = sum(real["predictions"][k] != v for k, v in full.items())
        assert predicted["disagreements"] == differ and predicted["samples"] == len(dev)
        assert predicted["agreement"] == pytest.approx(1 - differ / len(dev))
        if differ == 0:  # every state replayed is the real one: so is every token's exit layer
            assert predicted["mean_exit_layer"] == pytest.approx(real["speed"]["mean_exit_layer"])
        seen.add(differ == 0)
    assert seen == {True, False}  # both an exact and a lossy threshold were checked


def test_a_filter_gate_is_replayed_in_front_of_the_rule(backend, confidence, dev, replay):
    """A filter gate decides on the hidden state whatever the threshold: the replay offers the rule
    only the gate's candidates, and still predicts what decoding behind the gate gives."""
    torch.manual_seed(3)
    gate = make_gate("learned", backend.text_config.hidden_size, 2, threshold=0.5, mode="filter")
    gated = replay_confidence_rule(backend, confidence, dev, SETTINGS, gate)
    assert 0.2 < gated.candidates.mean() < 0.8  # the untrained gate turns some tokens away
    full = evaluate(backend, None, dev, SETTINGS)["predictions"]
    threshold = between_confidences(replay, 0.2)
    confidence.set_knob(threshold)
    real = evaluate(backend, confidence, dev, SETTINGS, gate=gate)
    predicted = gated.predict(threshold)
    assert predicted["disagreements"] == sum(real["predictions"][k] != v for k, v in full.items())
    assert predicted["disagreements"] < replay.predict(threshold)["disagreements"]  # the gate held some back


def test_confirmation_rows_follow_the_budget():
    assert confirmation_rows(100, 0.01, 0.1) == 100  # a small dev split is confirmed whole
    assert confirmation_rows(5000, 0.01, 0.1) == calibrate.CONFIRM_ROWS
    assert confirmation_rows(5000, 0.001, 0.1) == 2302  # (1 - 0.001)^n <= 0.1 from n = 2302 on
    assert confirmation_rows(5000, 0.01, 0.1, rows=40) == 40
    with pytest.raises(calibrate.ConfigError, match="at least 1"):
        confirmation_rows(100, 0.01, 0.1, rows=0)


def test_calibration_decodes_at_most_two_values_and_picks_what_the_grid_picks(backend, confidence, dev, replay,
                                                                               decodes):
    """The risk rule counts exactly what the replay predicts (outputs that differ from the full
    model's), so the two decoded values lead to the choice the whole decoded grid leads to."""
    grid = sorted({round(between_confidences(replay, s), 6) for s in (0.1, 0.3, 0.5, 0.7, 0.9)} | {1.0})
    rule = dict(rule="risk", budget=0.3, epsilon=0.5)
    full, points, replayed = replayed_sweep(backend, confidence, dev, SETTINGS, grid=grid, **rule)
    assert len(decodes) == len(points) == len(replayed["kept"]) == 2 and None not in decodes
    assert [p.threshold for p in points] == decodes == replayed["kept"]
    assert replayed["confirmed_rows"] == replayed["replayed_rows"] == len(dev)
    safest_first = Knob(confidence).safest_first
    chosen, _ = calibrate.choose(points, full, speed="layer", safest_first=safest_first, **rule)
    decodes.clear()
    full_grid, every = sweep(backend, confidence, dev, SETTINGS, grid=grid, progress=False, epsilon=rule["epsilon"])
    assert len(decodes) == len(grid) + 1  # the old way: the full model, then every value
    assert full_grid == pytest.approx(full)
    assert [p.disagreements for p in every] == [p.disagreements for p in replayed["predicted"]]
    assert calibrate.choose(every, full_grid, speed="layer", safest_first=safest_first, **rule)[0] == chosen
    for point in points:  # the confirmed points are the grid's own
        assert point == next(p for p in every if p.threshold == point.threshold)


def test_the_budget_rule_decodes_safer_values_until_one_holds_the_budget(backend, confidence, dev, replay, decodes,
                                                                         monkeypatch):
    """When no decoded value's loss bound is within the budget, the next safer value is decoded,
    and so on to the safest; the rule then takes the safest, never a value that failed."""
    grid = sorted({round(between_confidences(replay, s), 6) for s in (0.1, 0.5, 0.9)} | {1.0})
    monkeypatch.setattr(calibrate.PairedBound, "__call__", lambda self, result: 0.5)  # every value fails
    rule = dict(rule="budget", budget=0.01, epsilon=0.1)
    full, points, replayed = replayed_sweep(backend, confidence, dev, SETTINGS, grid=grid, **rule)
    order = Knob(confidence).safest_first(grid)  # highest threshold first
    shortlisted = calibrate.shortlist(replayed["predicted"], "budget", 0.01, 0.1, Knob(confidence).safest_first)
    safer = [v for v in reversed(order[:order.index(shortlisted[0])]) if v not in shortlisted]
    assert safer and decodes == replayed["kept"] == shortlisted + safer  # toward the safest, in order
    assert decodes[-1] == 1.0
    chosen, why = calibrate.choose(points, full, speed="layer", safest_first=Knob(confidence).safest_first, **rule)
    assert chosen.threshold == 1.0 and "took the safest" in why
    monkeypatch.setattr(calibrate.PairedBound, "__call__", lambda self, result: 0.0)  # the pick holds
    decodes.clear()
    replayed_sweep(backend, confidence, dev, SETTINGS, grid=grid, **rule)
    assert len(decodes) <= 2  # nothing safer is decoded


def fake_run(backend, strategy, dev):
    settings = types.SimpleNamespace(kv_policy="catchup", grid=(0.5, 0.9), rule="budget", budget=0.01, epsilon=0.1,
                                     speed_target="layer", progress=False)
    return types.SimpleNamespace(settings=settings, backend=backend, strategy=strategy, dev=dev, test=dev,
                                 evaluation=SETTINGS)


def test_rules_the_replay_cannot_model_decode_the_whole_grid(registry, backend, confidence, dev, decodes):
    gate = CosineGate(0.99, mode="replace")
    run = fake_run(backend, confidence, dev.subset(4))
    _, points, replayed, how = knob_points(run, Knob(confidence, gate), gate, None, run.settings.grid)
    assert replayed is None and "cannot model a gate that decides alone" in how
    assert len(decodes) == 3 and decodes[0] is None  # the full model, then each gate threshold
    assert [p.threshold for p in points] == [0.5, 0.9] and gate.threshold == 0.99
    deebert = registry.strategy("deebert")
    assert "deebert's rule" in replay_refusal(Knob(deebert(backend, [2, 4])), dev, SETTINGS, "catchup", None)
    assert "skip" in replay_refusal(Knob(confidence), dev, SETTINGS, "skip", None)
    beams = EvalSettings(num_beams=2)
    assert "beam search" in replay_refusal(Knob(confidence), dev, beams, "catchup", None)
    assert replay_refusal(Knob(confidence), dev, SETTINGS, "catchup", None) is None
    decodes.clear()
    _, points, replayed, how = knob_points(run, Knob(confidence), None, None, run.settings.grid)
    assert how.startswith("calibration replayed every threshold") and "confirmed by decoding 4 dev rows" in how
    assert len(decodes) <= 2 and replayed["kept"] == [p.threshold for p in points]
