"""Step 3 of a run: the strategy's knob (or its gate's threshold), given or calibrated on the dev
split by the stated rule, with the speed-versus-quality curve written beside the run."""

from __future__ import annotations

import dataclasses

from earlyexit.data.tasks import task_of
from earlyexit.evaluation.calibrate import Knob, choose, cost_warning, sweep, write_curve
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
        full_dev, points = sweep(run.backend, run.strategy, run.dev, run.evaluation, grid=settings.grid,
                                 kv_policy=settings.kv_policy, progress=settings.progress, gate=gate,
                                 measure_wall=settings.speed_target == "wall", exit_vocabulary=exit_vocabulary)
        chosen, why = choose(points, full_dev, settings.rule, settings.budget, speed=settings.speed_target,
                             epsilon=settings.epsilon, safest_first=knob.safest_first)
        knob.value = chosen.threshold
        metric = task_of(run.dev).main_metric
        csv_path, png_path = write_curve(points, full_dev, metric, run.output) if run.main else (None, None)
        warning = cost_warning(chosen, settings.speed_target)
    run.log(f"calibration: {why}; curve in {csv_path} and {png_path}")
    if warning:
        run.log(warning)
    return {"rule": settings.rule, "budget": settings.budget, "epsilon": settings.epsilon,
            "speed_target": settings.speed_target, "warning": warning,
            "why": why, "knob": knob.name, "threshold": chosen.threshold, "gate": settings.gate,
            "full_quality": full_dev, "points": [dataclasses.asdict(p) for p in points],
            "csv": csv_path, "png": png_path}
