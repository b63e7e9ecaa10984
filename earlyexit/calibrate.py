"""Choosing the exit threshold on the development split, by a stated rule.

The sweep evaluates the strategy at every threshold of the grid (the paper's 0.5 … 1.0 by
default) and records quality next to the speed-ups: the paper's speed-versus-quality curve
(Fig. 4b), written as CSV and PNG. Rules:
- `best`: the threshold with the best quality (ties: the faster one);
- `budget`: the fastest threshold whose quality is at least (1 - budget) x the full model's;
  fastest by wall clock per generated token on the dev split (`speed="wall"`, the full model
  timed next to it on the same batches) or by layer-based speed-up (`speed="layer"`); if none qualifies,
  the best-quality one, and the result says so.
With a gate the sweep moves the gate's threshold, otherwise the strategy's.
"""

from __future__ import annotations

import csv
import dataclasses
import os

from .errors import ConfigError
from .files import atomic_write, save_figure

PAPER_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RULES = ("best", "budget")
SPEEDS = ("wall", "layer")


@dataclasses.dataclass
class CalibrationPoint:
    threshold: float
    quality: float
    param_speedup: float
    layer_speedup: float
    mean_exit_layer: float
    wall_speedup: float | None = None  # end to end, per generated token, against the full model's dev run


def main_metric(task: str) -> str:
    return "CIDEr" if task == "caption" else "overall"


class Knob:
    """What calibration moves: the gate's threshold when the gate decides alone (`replace`), else
    the strategy's own knob (its `knob` field: a threshold, an entropy, a patience, a γ)."""

    def __init__(self, strategy, gate=None):
        self.strategy, self.gate = strategy, gate
        self.on_gate = gate is not None and gate.mode == "replace"
        if not self.on_gate and not strategy.knob:
            raise ConfigError(f"strategy {strategy.name!r} has no knob to calibrate")
        self.name = "gate threshold" if self.on_gate else strategy.knob

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
        from .gates import COSINE_GRID

        if self.on_gate:
            return COSINE_GRID if self.gate.kind == "cosine" else PAPER_GRID
        return self.strategy.calibration_grid()


def sweep(backend, strategy, dataset, settings, grid=None, kv_policy: str = "catchup",
          progress: bool = True, gate=None, measure_wall: bool = False) -> tuple[float, list[CalibrationPoint]]:
    """(full model's quality, one point per knob value) on `dataset`; the knob is `Knob(strategy,
    gate)`'s, over its default grid unless `grid` is given."""
    from tqdm.auto import tqdm

    from .evaluate import evaluate

    settings = dataclasses.replace(settings, measure_wall=measure_wall, progress=False, quick_metrics=True)
    metric = main_metric(dataset.task)
    full = evaluate(backend, None, dataset, settings)["quality"][metric]
    points = []
    knob = Knob(strategy, gate)
    original = knob.value
    try:
        for threshold in tqdm(grid or knob.default_grid(), desc="calibrating", disable=not progress):
            knob.value = threshold
            result = evaluate(backend, strategy, dataset, settings, kv_policy=kv_policy, gate=gate)
            speed = result["speed"]
            wall = speed["wall_speedup"] if measure_wall else None  # timed side by side, batch by batch
            points.append(CalibrationPoint(threshold, result["quality"][metric], speed["param_speedup"],
                                           speed["layer_speedup"], speed["mean_exit_layer"], wall))
    finally:
        knob.value = original
    return full, points


def choose(points: list[CalibrationPoint], full_quality: float, rule: str = "best",
           budget: float = 0.02, speed: str = "layer") -> tuple[CalibrationPoint, str]:
    """The chosen point and a sentence saying why."""
    if rule not in RULES:
        raise ConfigError(f"calibration rule must be one of {', '.join(RULES)} (got {rule!r})")
    if not points:
        raise ConfigError("the calibration grid is empty; pass thresholds such as 0.5,0.7,0.9")
    best = max(points, key=lambda p: (p.quality, p.layer_speedup))
    if rule == "best":
        return best, f"best quality on the dev split (threshold {best.threshold})"
    floor = (1.0 - budget) * full_quality
    allowed = [p for p in points if p.quality >= floor]
    if not allowed:
        return best, (f"no threshold keeps quality within {budget:.1%} of the full model's; "
                      f"took the best quality (threshold {best.threshold})")
    if speed not in SPEEDS:
        raise ConfigError(f"calibration speed must be one of {', '.join(SPEEDS)} (got {speed!r})")
    if speed == "wall" and any(p.wall_speedup is None for p in allowed):
        raise ConfigError("the wall-clock rule needs a sweep that measured wall time (measure_wall=True)")
    key = (lambda p: (p.wall_speedup, p.quality)) if speed == "wall" else (lambda p: (p.layer_speedup, p.quality))
    fastest = max(allowed, key=key)
    measure = "by wall clock on the dev split" if speed == "wall" else "by layer-based speed-up"
    return fastest, (f"fastest threshold {measure} within {budget:.1%} of the full model's quality "
                     f"(threshold {fastest.threshold})")


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
