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
from earlyexit.pipeline.gates import confidence_like
from earlyexit.pipeline.scoring import row_label


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
        full_dev, points, replayed, how = knob_points(run, knob, gate, exit_vocabulary, settings.grid)
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


def untrained_knobs(run: RunContext, knob: Knob | None, gates: dict | None) -> dict:
    """{row name: Knob} of the untrained `confidence` exits the strategy is compared with, at its
    exit layers: alone and behind the run's gate. Only where the strategy's knob is a max-softmax
    threshold or its gate decides (otherwise nothing compares like with like)."""
    settings, strategy = run.settings, run.strategy
    if not settings.compare_untrained or knob is None or not (strategy.knob_is_confidence or knob.on_gate):
        return {}
    confidence = confidence_like(run.registry, strategy)
    knobs = {} if settings.strategy == "confidence" else {"confidence": Knob(confidence)}
    if gates is not None:
        name = f"confidence + {settings.gate} gate"
        if name != row_label(run, gates["strategy"]):
            knobs[name] = Knob(confidence_like(run.registry, strategy), gates["confidence"])
    return knobs


def calibrate_untrained(run: RunContext, knob: Knob, knobs: dict, exit_vocabulary) -> dict:
    """Sets each comparison knob: calibrated on dev by the run's own rule and budget when the
    strategy's knob was calibrated, so every row is held to the same budget; else the strategy's
    given value (its threshold; 0.9 for the exits' own rule behind a deciding gate). Returns
    {row name: what calibration saw and chose} for the calibrated ones."""
    settings, records = run.settings, {}
    for name, comparison in knobs.items():
        same_kind = comparison.on_gate == knob.on_gate  # its knob means what the strategy's means
        if settings.threshold is not None:
            if same_kind:
                comparison.value = knob.value
            continue
        grid = settings.grid if same_kind else None
        with run.timed("calibrate_untrained_s"):
            full_dev, points, replayed, how = knob_points(run, comparison, comparison.gate, exit_vocabulary, grid)
            chosen, why = choose(points, full_dev, settings.rule, settings.budget, speed=settings.speed_target,
                                 epsilon=settings.epsilon, safest_first=comparison.safest_first)
        comparison.value = chosen.threshold
        run.log(f"calibration of {name}: {why}")
        records[name] = {"rule": settings.rule, "budget": settings.budget, "epsilon": settings.epsilon,
                         "why": why, "knob": comparison.name, "threshold": chosen.threshold,
                         "full_quality": full_dev, "points": [dataclasses.asdict(p) for p in points],
                         "search": how, "replayed": replay_record(replayed)}
    return records


def knob_points(run: RunContext, knob: Knob, gate, exit_vocabulary, grid=None) -> tuple:
    """(the full model's dev quality, the decoded points, the replay's record or None, a line saying
    how) for `knob` (its strategy, behind `gate`) over `grid` (None: the knob's default grid). Each
    point's loss bound is of the loss the test split, of its size, will measure."""
    settings, strategy = run.settings, knob.strategy
    refusal = replay_refusal(knob, run.dev, run.evaluation, settings.kv_policy, exit_vocabulary)
    if refusal is None:
        full_dev, points, replayed = replayed_sweep(
            run.backend, strategy, run.dev, run.evaluation, rule=settings.rule, budget=settings.budget,
            epsilon=settings.epsilon, grid=grid, measure_wall=settings.speed_target == "wall",
            progress=settings.progress, gate=gate, scored_rows=len(run.test))
        return full_dev, points, replayed, replay_summary(knob, replayed)
    full_dev, points = sweep(run.backend, strategy, run.dev, run.evaluation, grid=grid,
                             kv_policy=settings.kv_policy, progress=settings.progress, gate=gate,
                             measure_wall=settings.speed_target == "wall", exit_vocabulary=exit_vocabulary,
                             epsilon=settings.epsilon, scored_rows=len(run.test))
    how = (f"calibration decoded dev at every {knob.name} of the grid: the one-pass replay cannot model {refusal}")
    return full_dev, points, None, how


def replay_record(replayed: dict | None) -> dict | None:
    if replayed is None:
        return None
    return {**replayed, "predicted": [dataclasses.asdict(p) for p in replayed["predicted"]]}
