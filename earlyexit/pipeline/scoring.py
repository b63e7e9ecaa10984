"""Step 5 of a run: the test split, scored for the full model, the strategy (with its gate), the
untrained `confidence` exits (without and with a gate, each calibrated by the same rule) and the
speculative row, each with quality and the three speed-ups."""

from __future__ import annotations

import dataclasses

from earlyexit.data.tasks import task_of
from earlyexit.evaluation.evaluate import evaluate
from earlyexit.pipeline.context import RunContext
from earlyexit.pipeline.drafting import Drafting


def row_label(run: RunContext, gate) -> str:
    return run.settings.strategy + (f" + {run.settings.gate} gate" if gate is not None else "")


def score_on_test(run: RunContext, gates: dict | None, exit_vocabulary, drafting: Drafting, untrained: dict) -> dict:
    """{row name: evaluate()'s report} on the test split; `untrained`: {row name: Knob} of the
    untrained `confidence` exits, each set to its own value (`calibration.calibrate_untrained`)."""
    settings, backend, strategy, test = run.settings, run.backend, run.strategy, run.test
    gate = gates["strategy"] if gates is not None else None
    evaluation = run.evaluation
    if task_of(test).ranks:  # ranking decodes nothing: one beam
        evaluation = dataclasses.replace(evaluation, num_beams=1)
    if settings.noise:
        evaluation = dataclasses.replace(evaluation, noise=settings.noise)
    results = {"full": evaluate(backend, None, test, evaluation, kv_policy=settings.kv_policy,
                                on_batch=run.on_batch)}
    results[row_label(run, gate)] = evaluate(backend, strategy, test, evaluation, kv_policy=settings.kv_policy,
                                             gate=gate, exit_vocabulary=exit_vocabulary, on_batch=run.on_batch)
    for name, comparison in untrained.items():
        results[name] = evaluate(backend, comparison.strategy, test, evaluation, kv_policy=settings.kv_policy,
                                 gate=comparison.gate, exit_vocabulary=exit_vocabulary)
    if drafting.exit is not None:
        results[f"{settings.strategy} speculative"] = evaluate(
            backend, strategy, test, dataclasses.replace(evaluation, num_beams=1), kv_policy="catchup",
            decode="speculative", draft_exit=drafting.exit, draft_length=drafting.length,
            draft_vocabulary=drafting.vocabulary, drafter=drafting.drafter)
    elif drafting.drafter is not None:  # a drafter of its own: the full model alone verifies its tokens
        results[f"{drafting.drafter.name} speculative"] = evaluate(
            backend, None, test, dataclasses.replace(evaluation, num_beams=1), decode="speculative",
            drafter=drafting.drafter)
    return results
