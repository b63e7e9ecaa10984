"""The calibrated row's loss on dev beside its loss on test, against the budget (hand-computed)."""

import pytest

from earlyexit.pipeline.report import budget_check


def results(full_cider, row_cider, full_predictions, row_predictions):
    return {"full": {"quality": {"CIDEr": full_cider}, "predictions": full_predictions},
            "free + learned gate": {"quality": {"CIDEr": row_cider}, "predictions": row_predictions}}


def calibration(rule, budget, quality=0.99, disagreements=1, samples=50):
    return {"rule": rule, "budget": budget, "knob": "threshold", "threshold": 0.9, "full_quality": 1.0,
            "points": [{"threshold": 0.8, "quality": 0.5, "disagreements": 9, "samples": 50},
                       {"threshold": 0.9, "quality": quality, "disagreements": disagreements, "samples": samples}]}


def test_the_budget_rule_compares_relative_quality_loss():
    check = budget_check(calibration("budget", 0.01), results(0.6, 0.597, {}, {}), "free + learned gate")
    assert check["dev_loss"] == pytest.approx(0.01)  # 0.99 of the full model's quality, at the chosen 0.9
    assert check["test_loss"] == pytest.approx(0.005)  # 1 - 0.597 / 0.6
    assert check["holds_on_test"] is True
    check = budget_check(calibration("budget", 0.01), results(0.6, 0.59, {}, {}), "free + learned gate")
    assert check["test_loss"] == pytest.approx(1 / 60) and check["holds_on_test"] is False


def test_the_risk_rule_compares_the_share_of_outputs_that_differ():
    full = {"a": "x", "b": "y", "c": "z", "d": "w"}
    row = {"a": "x", "b": "y", "c": "other", "d": "w"}
    check = budget_check(calibration("risk", 0.2, disagreements=5, samples=50), results(1, 1, full, row),
                         "free + learned gate")
    assert check["dev_loss"] == pytest.approx(0.1) and check["test_loss"] == pytest.approx(0.25)
    assert check["holds_on_test"] is False


def test_no_check_without_a_calibrated_budget():
    assert budget_check(None, results(1, 1, {}, {}), "free + learned gate") is None
    assert budget_check({**calibration("best", 0.01)}, results(1, 1, {}, {}), "free + learned gate") is None
