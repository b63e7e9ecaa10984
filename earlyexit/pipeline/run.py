"""`earlyexit run`: train (if needed), calibrate, evaluate and report, in one command.

0. will it fit: a memory estimate from the model's config and the settings, against the device's
   free memory, before a weight loads (`memory.py`; the embedded models are small and skip it);
1. the backbone (default: the embedded `tiny`, built on first use) and the strategy's exits:
   loaded from the adapter cache, or trained on the exit-training split and saved (`exits.py`);
2. the gates that decide before the head (`gates.py`) and the vocabularies exits and drafts
   read out over;
3. the threshold: given, or calibrated on the development split by the stated rule; the untrained
   `confidence` exits it is compared with are calibrated by the same rule (`calibration.py`);
4. the drafting exit and length of the self-speculative row, chosen on dev (`drafting.py`);
5. the test split: the full model, the strategy at the chosen threshold, and the untrained
   `confidence` exits at theirs, each with quality and the three speed-ups
   (`scoring.py`);
6. the per-exit accuracy of untrained versus trained exits (the paper's mid-crisis plot) and
   the report (`report.py`).
Splits follow the paper: exits train on 80 % of val and are tuned on the other 20 %; where the test
answers are not published (VQAv2, OK-VQA, VizWiz) they are tuned on the next 10 % and scored on the
last 10 %, GQA on its test-dev (`earlyexit.data.splits`). A split without answers is refused before
any work. Under torchrun every rank runs every step in step; rank 0 writes every file, once.

VisDial (answer ranking, scored by MRR; `earlyexit.evaluation.dialog`): its test split has no
ground truth, so everything comes from val, in three disjoint parts cut at dialog boundaries (no
image is in two of them): exits train on val's first 80 % (the round's dialog prompt and
ground-truth answer; FREE's distill mode uses no label loss), the knob is calibrated on the next
10 % by MRR, and the last 10 % is scored. Nothing is generated, so ranking uses one beam and the
speculative row is skipped (both logged). With caption training data and `test_data` VisDial,
the exits train and calibrate on the captions and the same last 10 % of VisDial val is ranked.
"""

from __future__ import annotations

import dataclasses
import time

from earlyexit.data.splits import load_split, splits_for, test_split_of
from earlyexit.data.tasks import TASKS, task_of
from earlyexit.evaluation.calibrate import Knob
from earlyexit.evaluation.common import EvalSettings
from earlyexit.pipeline.calibration import calibrate, calibrate_untrained, untrained_knobs
from earlyexit.pipeline.context import RunContext, silent
from earlyexit.pipeline.drafting import prepare_drafting
from earlyexit.pipeline.exits import load_models, prepare_exits
from earlyexit.pipeline.gates import prepare_gates
from earlyexit.pipeline.memory import check_memory
from earlyexit.pipeline.report import final_report, mid_crisis_report
from earlyexit.pipeline.scoring import score_on_test
from earlyexit.pipeline.settings import RunSettings, check_settings
from earlyexit.plugins.registry import notify
from earlyexit.training.vocabularies import backbone_vocabularies
from earlyexit.util.ranks import join_process_group, main_first


def run(settings: RunSettings, registry, log=print) -> dict | None:
    """The whole run; its report on rank 0, None on the other ranks."""
    check_settings(settings)  # the CLI checked already; callers of the API get the same one-line errors
    started = time.perf_counter()
    run = start(settings, registry, log)
    check_memory(settings, registry, run.log)  # from the model's config, before a weight loads
    load_models(run)
    load_evaluation_data(run)  # a missing or unscorable split fails here, before any training
    prepare_exits(run)
    gates = prepare_gates(run)
    gate = gates["strategy"] if gates is not None else None
    knob = Knob(run.strategy, gate) if run.strategy.knob or gate is not None else None
    exit_vocabulary, draft_vocabulary = prepare_vocabularies(run)
    calibration = calibrate(run, knob, gate, exit_vocabulary)
    untrained = untrained_knobs(run, knob, gates)
    untrained_calibration = calibrate_untrained(run, knob, untrained, exit_vocabulary)
    drafting = prepare_drafting(run, draft_vocabulary, exit_vocabulary)
    with run.timed("evaluate_s"):
        results = score_on_test(run, gates, exit_vocabulary, drafting, untrained)
    mid_crisis = None
    if run.strategy.needs_training and task_of(run.dev) is TASKS["caption"]:  # the paper's plot is of captions
        mid_crisis = mid_crisis_report(run.backend, run.strategy, run.dev, run.output) if run.main else None
    run.timings["total_s"] = time.perf_counter() - started
    if not run.main:
        return None
    return final_report(run, knob, gate, calibration, drafting, results, mid_crisis, exit_vocabulary, untrained,
                        untrained_calibration)


def start(settings: RunSettings, registry, log) -> RunContext:
    """Join the process group when launched with several processes (every rank trains,
    calibrates and evaluates its share in step; rank 0 writes files and reports) and announce
    the run. The group's collective backend follows the model's device (Backend.load's default
    is the CPU): nccl on GPUs, gloo on CPUs; DeepSpeed later adopts this group."""
    rank, _ = join_process_group(settings.device or "cpu")
    main = rank == 0
    if main:
        notify(registry, "run_start", config=dataclasses.asdict(settings))
    return RunContext(settings, registry, log if main else silent, main)


def load_evaluation_data(run: RunContext) -> None:
    """The dev and test splits (a missing split fails now, before the work) and the evaluation
    settings; ranking tasks use one beam, and say so when beams were asked for."""
    settings = run.settings
    run.evaluation = EvalSettings(batch_size=settings.batch_size, num_beams=settings.num_beams,
                                  max_new_tokens=settings.max_new_tokens, seed=settings.seed,
                                  progress=settings.progress)
    with main_first():  # rank 0 writes what a first load caches (the scenes); the others then read it
        run.dev = load_split(settings.data, splits_for(settings.data)[1], settings.dev_limit)
        run.test = load_split(*test_split_of(settings), settings.test_limit)
    for split in (run.dev, run.test):  # what the static check in settings.py cannot know: the files' answers
        task_of(split).check_split(split)
    if run.ranking and settings.num_beams > 1:
        run.log(f"note: VisDial is scored by ranking answer options, not by beam search: it ranks with one beam "
                f"(--num-beams {settings.num_beams} applies to the {run.dev.task} calibration only)"
                if not task_of(run.dev).ranks else "note: VisDial is ranked with one beam (ranking decodes nothing)")
    if task_of(run.dev).ranks:
        run.evaluation = dataclasses.replace(run.evaluation, num_beams=1)


def prepare_vocabularies(run: RunContext) -> tuple:
    """(exit vocabulary, draft vocabulary), each None unless its size is set, from up to 200
    samples of the exit-training split: never the test split."""
    settings = run.settings
    if not (settings.exit_vocabulary or (settings.draft_vocabulary and settings.speculative and not run.ranking)):
        return None, None
    with run.timed("vocabulary_s"):
        exit_vocabulary, draft_vocabulary = backbone_vocabularies(
            run.backend, settings.data, run.train_split, (settings.exit_vocabulary, settings.draft_vocabulary),
            limit=min(settings.train_limit or 200, 200), batch_size=settings.batch_size, progress=settings.progress,
            max_new_tokens=settings.max_new_tokens)
    if exit_vocabulary is not None:
        run.log(f"exits read out {len(exit_vocabulary)} tokens (the backbone's most frequent on {settings.data}/"
                f"{run.train_split}; the final layer reads all {run.backend.language_model.lm_head.out_features})")
    return exit_vocabulary, draft_vocabulary
