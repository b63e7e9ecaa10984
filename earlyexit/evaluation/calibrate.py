"""Choosing the exit threshold on the development split, by a stated rule.

The sweep evaluates the strategy at every threshold of the grid (the paper's 0.5 … 1.0 by
default) and records quality next to the speed-ups: the paper's speed-versus-quality curve
(Fig. 4b), written as CSV and PNG. Rules:
- `best`: the threshold with the best quality (ties: the faster one);
- `risk`: Learn-then-Test, as CALM calibrates: the fastest threshold whose risk (the share of
  samples whose output differs from the full model's) is at most `budget` (δ) with probability at
  least 1 - ε. Knob values are tested from the safest down (fixed-sequence testing, each with an
  exact binomial p-value) and the walk stops at the first that fails;
- `budget`: the fastest threshold whose quality is at least (1 - budget) x the full model's with
  probability 1 - ε: its relative loss on dev, bounded by a paired bootstrap over dev's samples
  and widened for the test split's own sampling (`loss_bound`; the point estimate alone is read
  where a point carries no bound). On 500 dev images a loss of 0.7 % measured 1.4 % on test, so
  the estimate alone does not hold the budget.
  Fastest by wall clock per generated token on the dev split (`speed="wall"`, the full model
  timed next to it on the same batches) or by layer-based speed-up (`speed="layer"`); if none qualifies,
  the safest one (without bounds: the best-quality one), and the result says so.
With a gate the sweep moves the gate's threshold, otherwise the strategy's. On dialog data (VisDial)
quality is MRR and a sample's output is the top-ranked answer option (what `risk` compares).

Decoding dev once per knob value is what a 2.7B-7B backbone cannot afford, so a max-softmax rule
under greedy `catchup` decoding (behind a `filter` gate or none) is first replayed on one teacher-forced pass over
dev (`replay.py`: per knob value, the share of outputs equal to the full model's and a layer
speed-up); the rule picks on those, and only its pick and the neighbour that exits more are
decoded, on at most `confirmation_rows` dev rows (`replayed_sweep`). Everything else (a gate in
`replace` mode, patience and other rules, beams, ranking, other K/V policies) decodes the whole
grid (`sweep`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np
from tqdm.auto import tqdm

from earlyexit.core.choices import RULES, SPEED_TARGETS
from earlyexit.core.gates import COSINE_GRID
from earlyexit.data.tasks import task_of
from earlyexit.errors import ConfigError
from earlyexit.evaluation.evaluate import evaluate
from earlyexit.evaluation.replay import replay_confidence_rule
from earlyexit.util.files import atomic_write, save_figure

PAPER_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BOOTSTRAP_RESAMPLES = 2000  # enough for a 90 % quantile to move by well under a tenth of a point
CONFIRM_ROWS = 500  # dev rows that confirm the replay's values at most (unless Learn-then-Test needs more)


@dataclasses.dataclass
class CalibrationPoint:
    threshold: float
    quality: float
    param_speedup: float
    layer_speedup: float
    mean_exit_layer: float
    wall_speedup: float | None = None  # end to end, per generated token, against the full model's dev run
    disagreements: int = 0  # samples whose output differs from the full model's (the risk rule's loss)
    samples: int = 0
    # the relative quality loss bounded with probability 1 - ε from dev's samples (`loss_bound`: on
    # the test split, when its size is known): what the budget rule holds to the budget; None where
    # it was not measured
    loss_bound: float | None = None


def main_metric(task) -> str:
    """The quality key calibration compares (the task's, by name or object): CIDEr, VQA accuracy
    ("overall"), or VisDial's MRR (ranking)."""
    return task_of(task).main_metric


class Knob:
    """What calibration moves: the gate's threshold when the gate decides alone (`replace`), else
    the strategy's own knob (its `knob` field: a threshold, an entropy, a patience, a γ)."""

    def __init__(self, strategy, gate=None):
        self.strategy, self.gate = strategy, gate
        self.on_gate = gate is not None and gate.mode == "replace"
        if not self.on_gate and not strategy.knob:
            raise ConfigError(f"strategy {strategy.name!r} has no knob to calibrate")
        self.name = "gate threshold" if self.on_gate else strategy.knob
        self.safer = "higher" if self.on_gate else strategy.knob_safer

    def safest_first(self, values) -> list:
        """Knob values ordered from the one that exits least to the one that exits most."""
        return sorted(values, reverse=self.safer == "higher")

    @property
    def value(self):
        return self.gate.threshold if self.on_gate else self.strategy.knob_value

    @value.setter
    def value(self, value) -> None:
        if self.on_gate:
            self.gate.threshold = value
        else:
            self.strategy.set_knob(value)

    def default_grid(self) -> tuple:
        if self.on_gate:
            return COSINE_GRID if self.gate.kind == "cosine" else PAPER_GRID
        return self.strategy.calibration_grid()


def sweep(backend, strategy, dataset, settings, grid=None, kv_policy: str = "catchup",
          progress: bool = True, gate=None, measure_wall: bool = False,
          exit_vocabulary=None, epsilon: float = 0.1,
          scored_rows: int | None = None) -> tuple[float, list[CalibrationPoint]]:
    """(full model's quality, one point per knob value) on `dataset`; the knob is `Knob(strategy,
    gate)`'s, over its default grid unless `grid` is given. `exit_vocabulary`: as `evaluate`'s;
    `epsilon`, `scored_rows`: each point's loss is bounded as `loss_bound` says."""
    settings = dataclasses.replace(settings, measure_wall=measure_wall, progress=False, quick_metrics=True)
    task = task_of(dataset)
    metric = task.main_metric
    reference = evaluate(backend, None, dataset, settings)
    full = reference["quality"][metric]
    bound = PairedBound(task, dataset, scored_outputs(task, reference), epsilon, scored_rows)
    points = []
    knob = Knob(strategy, gate)
    original = knob.value
    try:
        for threshold in tqdm(grid or knob.default_grid(), desc="calibrating", disable=not progress):
            knob.value = threshold
            result = evaluate(backend, strategy, dataset, settings, kv_policy=kv_policy, gate=gate,
                              exit_vocabulary=exit_vocabulary)
            points.append(measured_point(threshold, result, reference["predictions"], metric, measure_wall, bound))
    finally:
        knob.value = original
    return full, points


def measured_point(threshold, result: dict, reference: dict, metric: str, measure_wall: bool,
                   bound: PairedBound | None = None) -> CalibrationPoint:
    """The calibration point of one decoded knob value; `reference`: the full model's outputs by id;
    `bound`: what bounds its loss (None: not bounded)."""
    speed = result["speed"]
    wall = speed["wall_speedup"] if measure_wall else None  # timed side by side, batch by batch
    differ = sum(result["predictions"][k] != v for k, v in reference.items())
    return CalibrationPoint(threshold, result["quality"][metric], speed["param_speedup"], speed["layer_speedup"],
                            speed["mean_exit_layer"], wall, differ, len(reference),
                            bound(result) if bound is not None else None)


def scored_outputs(task, result: dict) -> dict:
    """What `task` scores of an `evaluate` report, by sample id: ranking tasks score the ground
    truth's rank, generating tasks the predictions."""
    return result["ranks"] if task.ranks else result["predictions"]


class PairedBound:
    """`loss_bound` of each row's outputs on `dataset` against the full model's (`full`: what
    `task` scores of them, by sample id)."""

    def __init__(self, task, dataset, full: dict, epsilon: float, scored_rows: int | None = None,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0):
        self.task, self.dataset, self.epsilon, self.scored_rows = task, dataset, epsilon, scored_rows
        self.resamples, self.seed = resamples, seed
        self.full = task.per_item(dataset, full)

    def __call__(self, result: dict) -> float:
        """The bound of the row `evaluate` reported in `result`."""
        row = self.task.per_item(self.dataset, scored_outputs(self.task, result))
        return loss_bound(self.full, row, self.epsilon, self.scored_rows, self.resamples, self.seed)


def loss_bound(full: dict, row: dict, epsilon: float, scored_rows: int | None = None,
               resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """The relative quality loss 1 - Σ row / Σ full of a row against the full model, from the n dev
    samples both score, bounded from above with probability 1 - ε by a paired bootstrap (each
    resample draws n samples with replacement, the same for both, so where the outputs agree the
    scores cancel and a row that changes few outputs gets a tight bound).

    Without `scored_rows` it bounds the loss on the whole distribution: the (1 - ε) quantile of the
    resampled losses. With it, the loss a split of `scored_rows` other samples will measure (the
    test split's): that loss varies too, so the bootstrap's spread above the point estimate is
    widened by sqrt(1 + n / scored_rows), as a prediction interval widens a confidence interval."""
    ids = sorted((k for k in full if k in row), key=str)  # the same draws whatever order the scores came in
    if not ids:
        raise ConfigError("no dev sample is scored for both the full model and the row; the loss cannot be bounded")
    full_scores = np.array([full[k] for k in ids], dtype=np.float64)
    row_scores = np.array([row[k] for k in ids], dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    full_sums, row_sums = full_scores[draws].sum(axis=1), row_scores[draws].sum(axis=1)
    # a resample on which the full model scores nothing loses nothing unless the row scores less
    losses = np.where(full_sums > 0, 1 - row_sums / np.where(full_sums > 0, full_sums, 1), 0.0)
    quantile = float(np.quantile(losses, 1 - epsilon))
    if not scored_rows:
        return quantile
    point = 1 - row_scores.sum() / full_scores.sum() if full_scores.sum() > 0 else 0.0
    return point + (quantile - point) * math.sqrt(1 + len(ids) / scored_rows)


def replay_refusal(knob: Knob, dataset, settings, kv_policy: str, exit_vocabulary) -> str | None:
    """Why the replay (`replayed_sweep`) cannot model this calibration, or None when it can."""
    strategy = knob.strategy
    reasons = [(knob.on_gate, "a gate that decides alone (replace mode: the knob is its threshold)"),
               (not strategy.knob_is_confidence, f"{strategy.name}'s rule (only a max-softmax threshold replays)"),
               (task_of(dataset).ranks, "ranked data (dialog)"),
               (settings.num_beams > 1, "beam search (the replay follows greedy decoding)"),
               (kv_policy != "catchup", f"the {kv_policy} K/V policy (the replay needs exact caches: catchup)"),
               (exit_vocabulary is not None, "an exit vocabulary"),
               (strategy.backend.is_encoder_decoder, "an encoder-decoder backbone")]
    return next((reason for refused, reason in reasons if refused), None)


def confirmation_rows(dev_rows: int, budget: float, epsilon: float, rows: int | None = None) -> int:
    """Dev rows the confirming decodes use: `rows` if given, else `CONFIRM_ROWS` or, when more, what
    Learn-then-Test needs to accept a knob value with no loss at all ((1 - δ)^n <= ε); never more
    than dev holds (so a small dev split, tiny's 100 rows, is confirmed whole)."""
    if rows is not None and rows < 1:
        raise ConfigError(f"the calibration's confirming rows must be at least 1 (got {rows})")
    needed = math.ceil(math.log(epsilon) / math.log1p(-budget)) if 0 < budget < 1 and 0 < epsilon < 1 else 0
    return min(dev_rows, rows if rows is not None else max(CONFIRM_ROWS, needed))


def shortlist(predicted: list[CalibrationPoint], rule: str, budget: float, epsilon: float, safest_first) -> list:
    """At most two knob values to decode: the one the rule picks on the replayed points (quality:
    the share of outputs equal to the full model's; speed: the replayed layer speed-up) and its
    neighbour on the side that exits more (the safer one when it exits most already)."""
    pick, _ = choose(predicted, 1.0, rule, budget, speed="layer", epsilon=epsilon, safest_first=safest_first)
    order = safest_first([p.threshold for p in predicted])
    at = order.index(pick.threshold)
    neighbour = order[at + 1] if at + 1 < len(order) else order[at - 1] if at else None
    return [pick.threshold] + ([neighbour] if neighbour is not None else [])


def replayed_sweep(backend, strategy, dataset, settings, rule: str = "best", budget: float = 0.02,
                   epsilon: float = 0.1, grid=None, measure_wall: bool = False, rows: int | None = None,
                   progress: bool = True, gate=None,
                   scored_rows: int | None = None) -> tuple[float, list[CalibrationPoint], dict]:
    """`sweep` for a confidence rule under greedy `catchup` decoding (`replay_refusal` is None): every
    knob value replayed on one teacher-forced pass over dev (`replay.py`), at most two decoded on
    the first `confirmation_rows` dev rows. Returns (the full model's quality on those rows, the
    decoded points, what the replay predicted and kept). `gate`: a filter gate in front of the rule."""
    settings = dataclasses.replace(settings, measure_wall=measure_wall, progress=False, quick_metrics=True)
    dev, task, knob = dataset.subset(settings.limit), task_of(dataset), Knob(strategy)
    replay = replay_confidence_rule(backend, strategy, dev, settings, gate)
    predicted = [replayed_point(value, replay.predict(value)) for value in grid or knob.default_grid()]
    kept = shortlist(predicted, rule, budget, epsilon, knob.safest_first)
    subset = dev.subset(confirmation_rows(len(dev), budget, epsilon, rows))
    reference = {s.id: replay.predictions[s.id] for s in subset.samples}
    full = task.score(subset, reference, quick=True)[task.main_metric]
    bound = PairedBound(task, subset, reference, epsilon, scored_rows)
    settings = dataclasses.replace(settings, limit=None)
    points, original = [], knob.value
    order = knob.safest_first([p.threshold for p in predicted])
    # under `budget`, while no decoded value holds the budget, the next safer one is decoded too
    safer = [v for v in reversed(order[:order.index(kept[0])]) if v not in kept] if rule == "budget" else []
    try:
        for value in tqdm(kept + safer, desc="confirming", disable=not progress):
            if value not in kept and any(within_budget(p, full, budget) for p in points):
                break
            knob.value = value
            result = evaluate(backend, strategy, subset, settings, kv_policy="catchup", gate=gate)
            points.append(measured_point(value, result, reference, task.main_metric, measure_wall, bound))
    finally:
        knob.value = original
    kept = [p.threshold for p in points]
    return full, points, {"predicted": predicted, "kept": kept, "replayed_rows": len(dev),
                          "confirmed_rows": len(subset), "replay_seconds": replay.seconds}


def replayed_point(value, prediction: dict) -> CalibrationPoint:
    return CalibrationPoint(value, prediction["agreement"], prediction["param_speedup"], prediction["layer_speedup"],
                            prediction["mean_exit_layer"], None, prediction["disagreements"], prediction["samples"])


def replay_summary(knob: Knob, replayed: dict) -> str:
    """One line: what the replay predicted, which values it kept, how many dev rows confirmed them."""
    shown = ", ".join(f"{p.threshold:g}: {p.quality:.0%} agree, {p.layer_speedup:.2f}x" for p in replayed["predicted"])
    kept = " and ".join(f"{v:g}" for v in replayed["kept"])
    return (f"calibration replayed every {knob.name} on one teacher-forced pass over {replayed['replayed_rows']} dev "
            f"rows (outputs equal to the full model's, layer speed-up: {shown}); kept {kept}, confirmed by decoding "
            f"{replayed['confirmed_rows']} dev rows")


def binomial_p_value(losses: int, n: int, delta: float) -> float:
    """P(Binomial(n, δ) ≤ losses): the exact p-value of the null "the risk exceeds δ" after
    seeing `losses` of `n` samples lost (small: the risk is very likely at most δ)."""
    if delta <= 0:
        return 1.0 if losses > 0 or n == 0 else 0.0
    if delta >= 1:
        return 1.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                 + k * math.log(delta) + (n - k) * math.log1p(-delta) for k in range(losses + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def risk_controlled(points: list[CalibrationPoint], safest_first, delta: float,
                    epsilon: float) -> tuple[CalibrationPoint | None, list[tuple]]:
    """Learn-then-Test with fixed-sequence testing: walk the knob values from the safest, accept
    each whose p-value is at most ε, stop at the first that is not; the fastest accepted one (or
    None) and the (value, p-value) of each test made."""
    by_value = {p.threshold: p for p in points}
    accepted, tests = [], []
    for value in safest_first([p.threshold for p in points]):
        point = by_value[value]
        p_value = binomial_p_value(point.disagreements, point.samples, delta)
        tests.append((value, p_value))
        if p_value > epsilon:
            break
        accepted.append(point)
    return (max(accepted, key=lambda p: p.layer_speedup) if accepted else None), tests


def choose(points: list[CalibrationPoint], full_quality: float, rule: str = "best",
           budget: float = 0.02, speed: str = "layer", epsilon: float = 0.1,
           safest_first=None) -> tuple[CalibrationPoint, str]:
    """The chosen point and a sentence saying why. `risk` needs `safest_first` (`Knob.safest_first`)."""
    if rule not in RULES:
        raise ConfigError(f"calibration rule must be one of {', '.join(RULES)} (got {rule!r})")
    if not points:
        raise ConfigError("the calibration grid is empty; pass thresholds such as 0.5,0.7,0.9")
    if rule == "risk":
        chosen, tests = risk_controlled(points, safest_first or sorted, budget, epsilon)
        shown = ", ".join(f"{v}: p={p:.3g}" for v, p in tests)
        if chosen is None:
            safest = next(p for p in points if p.threshold == tests[0][0])
            return safest, (f"no threshold keeps the share of outputs that differ from the full model's within "
                            f"{budget:.1%} with probability {1 - epsilon:.0%} (tests: {shown}); took the safest "
                            f"(threshold {safest.threshold})")
        return chosen, (f"fastest threshold whose share of outputs differing from the full model's is at most "
                        f"{budget:.1%} with probability {1 - epsilon:.0%}, by Learn-then-Test on the dev split "
                        f"(threshold {chosen.threshold}; tests: {shown})")
    best = max(points, key=lambda p: (p.quality, p.layer_speedup))
    if rule == "best":
        return best, f"best quality on the dev split (threshold {best.threshold})"
    allowed = [p for p in points if within_budget(p, full_quality, budget)]
    bounded = any(p.loss_bound is not None for p in points)
    surely = f" with probability {1 - epsilon:.0%} (a paired bootstrap over dev's samples)" if bounded else ""
    if not allowed:
        safest = (safest_first or sorted)([p.threshold for p in points])[0]
        fallback = next(p for p in points if p.threshold == safest) if bounded else best
        took = "the safest" if bounded else "the best quality"
        return fallback, (f"no threshold keeps quality within {budget:.1%} of the full model's{surely}; "
                          f"took {took} (threshold {fallback.threshold})")
    if speed not in SPEED_TARGETS:
        raise ConfigError(f"calibration speed must be one of {', '.join(SPEED_TARGETS)} (got {speed!r})")
    if speed == "wall" and any(p.wall_speedup is None for p in allowed):
        raise ConfigError("the wall-clock rule needs a sweep that measured wall time (measure_wall=True)")
    key = (lambda p: (p.wall_speedup, p.quality)) if speed == "wall" else (lambda p: (p.layer_speedup, p.quality))
    fastest = max(allowed, key=key)
    measure = "by wall clock on the dev split" if speed == "wall" else "by layer-based speed-up"
    return fastest, (f"fastest threshold {measure} within {budget:.1%} of the full model's quality{surely} "
                     f"(threshold {fastest.threshold})")


def within_budget(point: CalibrationPoint, full_quality: float, budget: float) -> bool:
    """Whether a point holds the budget: its loss bound where measured, else its quality."""
    if point.loss_bound is not None:
        return point.loss_bound <= budget
    return point.quality >= (1.0 - budget) * full_quality


def cost_warning(chosen: CalibrationPoint, speed: str = "layer") -> str | None:
    """A sentence when the chosen knob makes generation slower than the full model on dev (by the
    speed the rule maximised): such exits cost more than they save, and the user must hear it."""
    value = chosen.wall_speedup if speed == "wall" else chosen.layer_speedup
    if value is None or value > 1.0:
        return None
    measure = "wall clock" if speed == "wall" else "layer-equivalents"
    return (f"warning: at the chosen threshold {chosen.threshold} these exits are slower than the full model on dev "
            f"({value:.2f}x by {measure}): they cost more than they save here; serve the full model, or train better "
            "exits, use fewer exits or a gate")


def write_curve(points: list[CalibrationPoint], full_quality: float, metric: str, folder: str,
                name: str = "calibration") -> tuple[str, str]:
    """The speed-versus-quality curve as CSV and PNG; returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    csv_path, png_path = os.path.join(folder, f"{name}.csv"), os.path.join(folder, f"{name}.png")
    with atomic_write(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["threshold", metric, "param_speedup", "layer_speedup", "wall_speedup", "mean_exit_layer"])
        writer.writerow(["full", full_quality, 1.0, 1.0, 1.0, ""])
        for p in points:
            writer.writerow([p.threshold, p.quality, p.param_speedup, p.layer_speedup, p.wall_speedup,
                             p.mean_exit_layer])
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([p.layer_speedup for p in points], [p.quality for p in points], "o-", label="layer speed-up")
    axis.plot([p.param_speedup for p in points], [p.quality for p in points], "s--", label="param speed-up")
    if all(p.wall_speedup is not None for p in points):
        axis.plot([p.wall_speedup for p in points], [p.quality for p in points], "^:", label="wall speed-up (dev)")
    for p in points:
        axis.annotate(f"{p.threshold:g}", (p.layer_speedup, p.quality), textcoords="offset points", xytext=(4, 4),
                      fontsize=7)
    axis.axhline(full_quality, color="gray", linestyle=":", label="full model")
    axis.set_xlabel("speed-up (x)")
    axis.set_ylabel(metric)
    axis.set_title("quality versus speed-up by threshold")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, png_path)
    plt.close(figure)
    return csv_path, png_path
