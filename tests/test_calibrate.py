"""Calibration rules on hand-made sweep points: the budget rule and the risk-controlled
(Learn-then-Test) rule with its exact binomial p-values and fixed-sequence testing."""

import math

import pytest

from earlyexit.evaluation.calibrate import CalibrationPoint, binomial_p_value, choose, cost_warning, loss_bound


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


def test_the_loss_bound_by_hand():
    full = {f"s{i}": 1.0 + i for i in range(50)}
    assert loss_bound(full, dict(full), 0.1) == 0.0  # the same outputs lose nothing in any resample
    # every sample keeps 90 % of its score: every resample loses exactly 10 %
    assert loss_bound(full, {k: 0.9 * v for k, v in full.items()}, 0.1) == pytest.approx(0.1)
    # one sample of 50 scores 0: its point loss 50 / 1275 = 3.9 %; the bound lies above it and
    # grows as ε shrinks
    one_lost = {**full, "s49": 0.0}
    point_loss = 50 / sum(full.values())
    loose, tight = loss_bound(full, one_lost, 0.2), loss_bound(full, one_lost, 0.05)
    assert point_loss < loose < tight
    assert loss_bound(full, {**one_lost, "extra": 5.0}, 0.2) == loose  # scored by one side only: not compared
    # the loss a split of 50 other samples will measure: the spread above the estimate times sqrt(1 + 50 / 50)
    assert loss_bound(full, one_lost, 0.2, scored_rows=50) == pytest.approx(point_loss + (loose - point_loss) * 2 ** 0.5)
    assert loss_bound(full, {k: 0.9 * v for k, v in full.items()}, 0.1, scored_rows=10) == pytest.approx(0.1)


def test_the_budget_rule_holds_the_loss_bound_to_the_budget():
    safest_first = lambda values: sorted(values, reverse=True)  # noqa: E731
    points = [CalibrationPoint(1.0, 0.70, 1.0, 1.0, 12.0, loss_bound=0.0),
              CalibrationPoint(0.9, 0.698, 1.2, 1.2, 10.0, loss_bound=0.008),
              CalibrationPoint(0.8, 0.696, 1.4, 1.4, 8.0, loss_bound=0.02)]  # within 1 % on its estimate alone
    chosen, why = choose(points, 0.70, rule="budget", budget=0.01, epsilon=0.1, safest_first=safest_first)
    assert chosen.threshold == 0.9 and "with probability 90 %" in why.replace("90%", "90 %")
    # nothing bounded within the budget: the safest value, not the best-quality one, and it says so
    over = [CalibrationPoint(0.9, 0.70, 1.2, 1.2, 10.0, loss_bound=0.03),
            CalibrationPoint(1.0, 0.69, 1.0, 1.0, 12.0, loss_bound=0.02)]
    chosen, why = choose(over, 0.70, rule="budget", budget=0.01, epsilon=0.1, safest_first=safest_first)
    assert chosen.threshold == 1.0 and why.startswith("no threshold") and "took the safest" in why


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


def test_each_tasks_per_item_scores_average_to_its_main_metric():
    """What the bootstrap resamples: per-sample scores whose mean is the task's main metric."""
    from earlyexit.data import Dataset, Sample
    from earlyexit.data.tasks import TASKS

    def image():
        return None

    captions = Dataset("t", "caption", "dev", [
        Sample("a", image, captions=["a red circle", "a red round shape"]),
        Sample("b", image, captions=["two blue squares", "two squares that are blue"]),
        Sample("c", image, captions=["a green triangle on white", "one green triangle"])])
    said = {"a": "a red circle", "b": "a blue square", "c": "a triangle"}
    per_item = TASKS["caption"].per_item(captions, said)
    assert sum(per_item.values()) / 3 == pytest.approx(TASKS["caption"].score(captions, said, quick=True)["CIDEr"])
    questions = Dataset("t", "vqa", "dev", [Sample("q1", image, question="color?", answers=["red"] * 10),
                                            Sample("q2", image, question="how many?", answers=["2"] * 2 + ["3"] * 8)])
    answered = {"q1": "red", "q2": "2"}
    per_item = TASKS["vqa"].per_item(questions, answered)
    assert per_item == pytest.approx({"q1": 1.0, "q2": 0.6})  # min(1, matches / 3), over the official 10 choose 9
    assert 100 * sum(per_item.values()) / 2 == pytest.approx(TASKS["vqa"].score(questions, answered)["overall"])
    rounds = Dataset("t", "dialog", "dev", [Sample("r1", image), Sample("r2", image)])
    assert TASKS["dialog"].per_item(rounds, {"r1": 1, "r2": 4}) == {"r1": 1.0, "r2": 0.25}  # reciprocal ranks
