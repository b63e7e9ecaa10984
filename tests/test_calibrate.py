"""Calibration rules on hand-made sweep points: the budget rule and the risk-controlled
(Learn-then-Test) rule with its exact binomial p-values and fixed-sequence testing."""

import math

import pytest

from earlyexit.evaluation.calibrate import CalibrationPoint, binomial_p_value, choose, cost_warning


def point(threshold, quality, layer, disagreements, samples=20):
    return CalibrationPoint(threshold, quality, layer, layer, 12 / layer, None, disagreements, samples)


def test_binomial_p_value_by_hand():
    assert binomial_p_value(0, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert binomial_p_value(1, 10, 0.5) == pytest.approx(11 / 1024)
    expected = sum(math.comb(20, k) * 0.2 ** k * 0.8 ** (20 - k) for k in range(6))
    assert binomial_p_value(5, 20, 0.2) == pytest.approx(expected)
    assert binomial_p_value(20, 20, 0.2) == pytest.approx(1.0)


def test_risk_rule_walks_from_the_safest_and_stops_at_the_first_failure():
    points = [point(1.0, 0.70, 1.0, 0), point(0.9, 0.70, 1.1, 1), point(0.8, 0.69, 1.3, 5),
              point(0.7, 0.60, 1.5, 0)]  # the last looks safe but comes after a failed test
    chosen, why = choose(points, 0.70, rule="risk", budget=0.2, epsilon=0.1,
                         safest_first=lambda values: sorted(values, reverse=True))
    # p(0) = 0.8^20 = 0.0115, p(1) = 0.069 pass; p(5) = 0.80 fails, so 0.7 is never tested
    assert chosen.threshold == 0.9 and "Learn-then-Test" in why and "0.7" not in why.split("tests:")[1]
    # an entropy-like knob is safest at its low end: the same points read the other way round
    chosen, _ = choose(points[::-1], 0.70, rule="risk", budget=0.2, epsilon=0.1,
                       safest_first=lambda values: sorted(values))
    assert chosen.threshold == 0.7


def test_risk_rule_with_nothing_accepted_takes_the_safest():
    points = [point(1.0, 0.70, 1.0, 10), point(0.5, 0.60, 1.5, 15)]
    chosen, why = choose(points, 0.70, rule="risk", budget=0.05, epsilon=0.1,
                         safest_first=lambda values: sorted(values, reverse=True))
    assert chosen.threshold == 1.0 and why.startswith("no threshold")


def test_budget_rule_takes_the_fastest_within_the_budget():
    points = [point(1.0, 0.70, 1.0, 0), point(0.8, 0.695, 1.2, 3), point(0.6, 0.65, 1.6, 9)]
    chosen, _ = choose(points, 0.70, rule="budget", budget=0.01)
    assert chosen.threshold == 0.8


def test_a_chosen_knob_slower_than_the_full_model_is_a_warning():
    """The budget rule picks the fastest point within budget; when even that one is slower than
    the full model (as on smol with six exits), the run must say so, by the speed it maximised."""
    slow = [CalibrationPoint(0.6, 0.47, 1.2, 0.85, 19.3, wall_speedup=0.7),
            CalibrationPoint(1.0, 0.47, 1.0, 0.72, 30.0, wall_speedup=0.6)]
    chosen, _ = choose(slow, 0.472, "budget", 0.01)
    assert chosen.threshold == 0.6
    assert "slower than the full model" in cost_warning(chosen) and "0.85x by layer" in cost_warning(chosen)
    assert "0.70x by wall clock" in cost_warning(chosen, "wall")
    fast = CalibrationPoint(0.6, 0.47, 1.5, 1.2, 8.0, wall_speedup=0.95)
    assert cost_warning(fast) is None and "0.95x" in cost_warning(fast, "wall")
