"""Step 3 of a run: the strategy's knob (or its gate's threshold), given or calibrated on the dev
split by the stated rule, with the speed-versus-quality curve written beside the run.

A confidence rule (greedy, `catchup`, no gate or a `filter` gate) is replayed on one teacher-forced pass over dev
and only the two values the replay keeps are decoded (`calibrate.replayed_sweep`); any other rule
decodes every value of the grid (`calibrate.sweep`). The log says which, in one line."""

from __future__ import annotations

import dataclasses

from earlyexit.data.tasks import task_of
from earlyexit.evaluation.calibrate import (Knob, choose, cost_warning, replay_refusal, replay_summary,
                                            replayed_sweep, sweep, write_curve)
from earlyexit.pipeline.context import RunContext


def calibrate(run: RunContext, knob: Knob | None, gate, exit_vocabulary) -> dict | None:
    """Sets `knob.value`; returns what calibration saw and chose (None when the value was given
    or there is nothing to calibrate)."""
    settings = run.settings
    if knob is None:
        return None
    if settings.threshold is not None:
        knob.value = settings.threshold
        return None
    with run.timed("calibrate_s"):
        full_dev, points, replayed, how = knob_points(run, knob, gate, exit_vocabulary)
        chosen, why = choose(points, full_dev, settings.rule, settings.budget, speed=settings.speed_target,
                             epsilon=settings.epsilon, safest_first=knob.safest_first)
        knob.value = chosen.threshold
        metric = task_of(run.dev).main_metric
        csv_path, png_path = write_curve(points, full_dev, metric, run.output) if run.main else (None, None)
        if replayed and run.main:  # every value's replayed agreement and speed-up, beside the decoded ones
            write_curve(replayed["predicted"], 1.0, "outputs equal to the full model's (replayed)", run.output,
                        name="calibration-replay")
        warning = cost_warning(chosen, settings.speed_target)
    run.log(how)
    run.log(f"calibration: {why}; curve in {csv_path} and {png_path}")
    if warning:
        run.log(warning)
    return {"rule": settings.rule, "budget": settings.budget, "epsilon": settings.epsilon,
            "speed_target": settings.speed_target, "warning": warning,
            "why": why, "knob": knob.name, "threshold": chosen.threshold, "gate": settings.gate,
            "full_quality": full_dev, "points": [dataclasses.asdict(p) for p in points],
            "search": how, "replayed": replay_record(replayed), "csv": csv_path, "png": png_path}


def knob_points(run: RunContext, knob: Knob, gate, exit_vocabulary) -> tuple:
    """(the full model's dev quality, the decoded points, the replay's record or None, a line saying how)."""
    settings = run.settings
    refusal = replay_refusal(knob, run.dev, run.evaluation, settings.kv_policy, exit_vocabulary)
    if refusal is None:
        full_dev, points, replayed = replayed_sweep(
            run.backend, run.strategy, run.dev, run.evaluation, rule=settings.rule, budget=settings.budget,
            epsilon=settings.epsilon, grid=settings.grid, measure_wall=settings.speed_target == "wall",
            progress=settings.progress, gate=gate)
        return full_dev, points, replayed, replay_summary(knob, replayed)
    full_dev, points = sweep(run.backend, run.strategy, run.dev, run.evaluation, grid=settings.grid,
                             kv_policy=settings.kv_policy, progress=settings.progress, gate=gate,
                             measure_wall=settings.speed_target == "wall", exit_vocabulary=exit_vocabulary)
    how = (f"calibration decoded dev at every {knob.name} of the grid: the one-pass replay cannot model {refusal}")
    return full_dev, points, None, how


def replay_record(replayed: dict | None) -> dict | None:
    if replayed is None:
        return None
    return {**replayed, "predicted": [dataclasses.asdict(p) for p in replayed["predicted"]]}
