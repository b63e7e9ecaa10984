"""Step 5 of a run: the test split, scored for the full model, the strategy (with its gate), the
untrained `confidence` exits at the same threshold (without and with a gate) and the
self-speculative row, each with quality and the three speed-ups."""

from __future__ import annotations

import dataclasses

from earlyexit.data.tasks import task_of
from earlyexit.evaluation.evaluate import evaluate
from earlyexit.pipeline.context import RunContext
from earlyexit.pipeline.drafting import Drafting
from earlyexit.pipeline.gates import confidence_like


def row_label(run: RunContext, gate) -> str:
    return run.settings.strategy + (f" + {run.settings.gate} gate" if gate is not None else "")


def score_on_test(run: RunContext, knob, gates: dict | None, exit_vocabulary, drafting: Drafting) -> dict:
    """{row name: evaluate()'s report} on the test split."""
    settings, backend, strategy, test = run.settings, run.backend, run.strategy, run.test
    gate = gates["strategy"] if gates is not None else None
    evaluation = run.evaluation
    if task_of(test).ranks:  # ranking decodes nothing: one beam
        evaluation = dataclasses.replace(evaluation, num_beams=1)
    if settings.noise:
        evaluation = dataclasses.replace(evaluation, noise=settings.noise)
    threshold = knob.value if knob is not None else None
    label = row_label(run, gate)
    results = {"full": evaluate(backend, None, test, evaluation, kv_policy=settings.kv_policy,
                                on_batch=run.on_batch)}
    results[label] = evaluate(backend, strategy, test, evaluation, kv_policy=settings.kv_policy, gate=gate,
                              exit_vocabulary=exit_vocabulary, on_batch=run.on_batch)
    if settings.compare_untrained and threshold is not None and (strategy.knob_is_confidence or knob.on_gate):
        # the same threshold on untrained exits
        confidence = confidence_like(run.registry, strategy, threshold if strategy.knob_is_confidence else 0.9)
        if settings.strategy != "confidence":
            results["confidence"] = evaluate(backend, confidence, test, evaluation, kv_policy=settings.kv_policy,
                                             exit_vocabulary=exit_vocabulary)
        if gates is not None:
            if gate.mode == "replace":
                gates["confidence"].threshold = threshold
            name = f"confidence + {settings.gate} gate"
            if name != label:
                results[name] = evaluate(backend, confidence, test, evaluation, kv_policy=settings.kv_policy,
                                         gate=gates["confidence"], exit_vocabulary=exit_vocabulary)
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
