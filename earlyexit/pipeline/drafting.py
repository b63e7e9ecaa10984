"""Step 4 of a run: for the self-speculative row, the exit that drafts and how many tokens it
drafts a round, chosen by tokens/s on (part of) the dev split; and `--drafter`'s drafter, fitted
on the backbone's own outputs (or reused from the cache) and timed on dev."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import torch

from earlyexit.core.choices import draft_exit_index
from earlyexit.core.drafter import DRAFTER_CONFIG, DRAFTING_KNOBS, load_drafter, save_drafter
from earlyexit.core.generation import count_tokens, timed
from earlyexit.core.speculative import DEFAULT_DRAFT_LENGTH, DRAFT_LENGTHS
from earlyexit.data.splits import load_split
from earlyexit.data.tasks import task_of
from earlyexit.errors import CorruptAdapterError
from earlyexit.evaluation.evaluate import evaluate
from earlyexit.models import embedded
from earlyexit.models.adapters import backbone_fingerprint
from earlyexit.pipeline.context import RunContext
from earlyexit.pipeline.settings import RunSettings
from earlyexit.training.drafters import backbone_token_outputs
from earlyexit.util.files import atomic_folder
from earlyexit.util.ranks import barrier, process_group, shared_from_main


def choose_draft_exit(backend, strategy, dev, evaluation, settings: RunSettings, log, vocabulary=None, drafter=None):
    """(exit index that drafts in speculative mode, draft length, what the choice saw). What is not
    given is chosen by tokens/s on (part of) the dev split, timed beside plain decoding of the same
    rows one at a time (what speculative decoding is compared with): first the exit at the given
    (or default) length, then the length at that exit. When no choice drafts faster than plain
    decoding, the log says so: the row is still reported, but it is slower here."""
    given_exit = None
    if settings.draft_exit is not None:
        given_exit = draft_exit_index(settings.draft_exit, strategy.exit_layers)
        if settings.draft_length is not None:
            return given_exit, settings.draft_length, None
    probe = dataclasses.replace(evaluation, num_beams=1, progress=False, quick_metrics=True, measure_wall=False)
    sample = dev.subset(min(len(dev), 40))
    plain = plain_tokens_per_s(backend, sample, evaluation.max_new_tokens)

    def tokens_per_s(e: int, length: int) -> float:
        result = evaluate(backend, strategy, sample, probe, kv_policy="catchup", decode="speculative", draft_exit=e,
                          draft_length=length, draft_vocabulary=vocabulary, drafter=drafter)
        return result["speed"]["wall"]["early_exit"]["tokens_per_s"]

    length = settings.draft_length or DEFAULT_DRAFT_LENGTH
    by_exit = {}
    if given_exit is None:
        by_exit = {e: tokens_per_s(e, length) for e in range(len(strategy.exit_layers))}
        best = max(by_exit, key=lambda e: (by_exit[e], -e))  # ties: the shallower exit
        log("speculative: tokens/s on dev by draft exit " + ", ".join(
            f"{strategy.exit_layers[e]}: {v:.1f}" for e, v in by_exit.items()) + f" ({length} drafts a round)")
    else:
        best = given_exit
    by_length = {}
    if settings.draft_length is None:
        by_length = {k: (by_exit[best] if k == length and best in by_exit else tokens_per_s(best, k))
                     for k in DRAFT_LENGTHS}
        length = max(by_length, key=lambda k: (by_length[k], -k))
        log(f"speculative: tokens/s on dev at exit {strategy.exit_layers[best]} by draft length " +
            ", ".join(f"{k}: {v:.1f}" for k, v in by_length.items()))
    speed = by_length.get(length, by_exit.get(best))
    log(f"speculative: drafting {length} a round at {strategy.exit_layers[best]} (plain decoding, one row at a "
        f"time: {plain:.1f} tokens/s)")
    if speed <= plain:
        hint = "better exits" + ("" if vocabulary is not None else " or a draft vocabulary (--draft-vocabulary)")
        log(f"note: speculative decoding is slower than plain decoding on dev at every exit and length tried (best "
            f"{speed / plain:.2f}x); its row is reported, but it does not pay here: {hint} may help")
    return best, length, {"dev_tokens_per_s": {strategy.exit_layers[e]: v for e, v in by_exit.items()},
                          "dev_tokens_per_s_by_length": by_length, "draft_length": length,
                          "dev_plain_tokens_per_s": plain, "dev_speedup": speed / plain if plain else None}


def plain_tokens_per_s(backend, dataset, max_new_tokens: int) -> float:
    """Greedy plain decoding of each sample alone (batch 1), as speculative decoding runs."""
    eos = backend.language_model.generation_config.eos_token_id
    seconds = tokens = 0
    for sample in dataset:
        inputs = backend.prepare_inputs([sample.load_image()], [task_of(dataset).prompt(sample)])
        with torch.no_grad():
            sequences, spent, _ = timed(backend.plain_generate, inputs,
                                        {"max_new_tokens": max_new_tokens, "do_sample": False})
        seconds += spent
        tokens += count_tokens(sequences, inputs["input_ids"].shape[1], eos)
    return tokens / seconds if seconds else float("nan")


@dataclasses.dataclass
class Drafting:
    exit: int | None = None  # exit index that drafts (None: no speculative row)
    length: int | None = None
    vocabulary: object = None  # what drafts read out over (token ids), or None for the whole head
    choice: dict | None = None  # what the choice on dev saw
    drafter: object = None  # `--drafter`'s drafter when it drafts outside the exits (its own row)
    drafter_choice: dict | None = None  # what it did on dev


def prepare_drafting(run: RunContext, draft_vocabulary, exit_vocabulary) -> Drafting:
    """The speculative row's drafter: the strategy's exits (their drafting exit and length), or
    `--drafter`'s own drafter, fitted and timed on dev; or none (not asked for, or a ranking task)."""
    settings = run.settings
    if settings.speculative and run.ranking:
        run.log("note: no self-speculative row: VisDial is scored by ranking answer options, nothing is decoded")
    if not settings.speculative or run.ranking:
        return Drafting(vocabulary=draft_vocabulary)
    drafter = make_drafter(run)
    if drafter is not None and not drafter.uses_exits:
        choice = drafter_pays_on_dev(run, drafter)
        if choice["decode"] == "plain":  # no row: it would be the full row's tokens, slower
            return Drafting(vocabulary=draft_vocabulary, drafter_choice=choice)
        return Drafting(drafter=drafter, length=drafter.config.draft_length, drafter_choice=choice)
    vocabulary = draft_vocabulary if draft_vocabulary is not None else exit_vocabulary
    if vocabulary is not None:
        run.log(f"speculative: drafts read out {len(vocabulary)} tokens (the backbone's most frequent on "
                f"{settings.data}/{run.train_split})")
    exit_index, length, choice = choose_draft_exit(run.backend, run.strategy, run.dev, run.evaluation, settings,
                                                   run.log, vocabulary, drafter)
    return Drafting(exit_index, length, vocabulary, choice, drafter=drafter)


def drafter_cache_folder(settings: RunSettings, drafter, fingerprint: str) -> str:
    """Where a fitted drafter of this backbone, data and config is cached (as exits are)."""
    recipe = {"version": 1, **drafter.recipe(), "data": settings.data, "train_limit": settings.train_limit,
              "max_new_tokens": settings.max_new_tokens}
    if settings.dtype not in (None, "float32"):
        recipe["dtype"] = settings.dtype
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(embedded.cache_root(), "drafters", f"{settings.backend}-{fingerprint}-{drafter.name}-{key}")


def make_drafter(run: RunContext):
    """`--drafter`'s drafter, fitted on the backbone's own outputs on the exit-training split (or
    reused from the cache); None without one. The exit drafter needs nothing: it is the exits."""
    settings = run.settings
    if settings.drafter is None:
        return None
    cls = run.registry.drafter(settings.drafter)
    options = dict(settings.drafter_options)
    if settings.draft_length is not None and not cls.uses_exits:  # --draft-length: how far it drafts too
        options.setdefault("draft_length", settings.draft_length)
    drafter = cls(run.backend, cls.Config(**options))
    if not cls.needs_fitting:
        return drafter
    folder = drafter_cache_folder(settings, drafter, backbone_fingerprint(run.backend))
    cached = os.path.isfile(os.path.join(folder, DRAFTER_CONFIG))
    if shared_from_main(cached and not settings.retrain, process_group()[1]):
        try:
            knobs = {k: getattr(drafter.config, k) for k in DRAFTING_KNOBS}  # how this run drafts, not the fit's
            drafter = load_drafter(run.registry, f"{drafter.name}:{folder}", run.backend).with_drafting(**knobs)
            run.log(f"drafter {drafter.name}: reusing {folder}")
            return drafter
        except CorruptAdapterError as error:
            run.log(f"note: {error}; fitting the drafter again")
    began = time.perf_counter()
    train = load_split(settings.data, run.train_split, settings.train_limit)
    outputs, _ = backbone_token_outputs(run.backend, train, batch_size=settings.batch_size,
                                        max_new_tokens=settings.max_new_tokens, progress=settings.progress)
    if drafter.wants_samples:  # it runs the backbone on the samples its outputs belong to
        drafter.fit(outputs, log=run.log, samples=train)
    else:
        drafter.fit(outputs, log=run.log)
    if run.main:
        with atomic_folder(folder) as temporary:
            save_drafter(drafter, temporary)
    barrier()
    run.timings["drafter_fit_s"] = time.perf_counter() - began
    run.log(f"drafter {drafter.name}: fitted on {len(outputs)} of the backbone's own outputs on "
            f"{settings.data}/{run.train_split} in {run.timings['drafter_fit_s']:.1f} s; saved to {folder}")
    return drafter


DRAFT_SEARCH_LENGTHS = (1, 2, 3, 4)  # k tried on dev (with the drafter's own default) where not given
DRAFT_SEARCH_STOPS = (0.0, 0.3)  # τ tried on dev at the chosen k where not given


def given_drafting(settings: RunSettings) -> dict:
    """The drafting knobs the user pinned (`--draft-length`, `--drafter-option draft_length=/stop_below=`)."""
    given = {k: v for k, v in settings.drafter_options.items() if k in DRAFTING_KNOBS}
    if settings.draft_length is not None:
        given.setdefault("draft_length", settings.draft_length)
    return given


def drafter_pays_on_dev(run: RunContext, drafter) -> dict:
    """Speculative decoding with `drafter` on (part of) dev at the run's batch size, timed beside
    the full model's own `generate` of the same batches (as the test row will be). The knobs not
    given are chosen here, by that ratio: first k (at the drafter's τ), then τ at that k; a batch
    verifies rows x (k + 1) positions, so past batch 1 a shorter, more cautious draft may pay where
    the default does not. Where the best does not pay, the run decodes plainly (`decode`: plain,
    and no drafter row) and says so, unless `--draft-anyway`."""
    probe = dataclasses.replace(run.evaluation, num_beams=1, progress=False, quick_metrics=True, measure_wall=True)
    batch = run.evaluation.batch_size
    sample = run.dev.subset(min(len(run.dev), batch * -(-40 // batch)))  # about 40 images, in whole batches
    given = given_drafting(run.settings)
    tried = {}

    def measured(length: int, stop_below: float) -> dict:
        if (length, stop_below) not in tried:
            drafter.with_drafting(draft_length=length, stop_below=stop_below)
            speed = evaluate(run.backend, None, sample, probe, decode="speculative", drafter=drafter)["speed"]
            tried[length, stop_below] = {
                "draft_length": length, "stop_below": stop_below, "dev_speedup": speed["wall_speedup"],
                "dev_decode_speedup": speed["decode_wall_speedup"], "dev_acceptance_rate": speed["acceptance_rate"],
                "dev_tokens_per_s": speed["wall"]["early_exit"]["tokens_per_s"],
                "dev_plain_tokens_per_s": speed["wall"]["full"]["tokens_per_s"]}
        return tried[length, stop_below]

    default = drafter.config
    lengths = ([given["draft_length"]] if "draft_length" in given
               else sorted({*DRAFT_SEARCH_LENGTHS, default.draft_length}))
    stops = [given["stop_below"]] if "stop_below" in given else sorted({*DRAFT_SEARCH_STOPS, default.stop_below})
    first_stop = given.get("stop_below", default.stop_below)
    length = max(lengths, key=lambda k: (measured(k, first_stop)["dev_speedup"], -k))
    stop_below = max(stops, key=lambda t: (measured(length, t)["dev_speedup"], t))
    best = measured(length, stop_below)
    drafter.with_drafting(draft_length=length, stop_below=stop_below)
    if len(tried) > 1:
        run.log(f"speculative with the {drafter.name} drafter on dev, batch {batch}, end to end against the full "
                "model: " + ", ".join(f"k={k} τ={t:g}: {v['dev_speedup']:.2f}x" for (k, t), v in tried.items()) +
                f"; drafting {length} a round, τ = {stop_below:g}")
    run.log(f"speculative with the {drafter.name} drafter on dev, batch {batch}: "
            f"{best['dev_tokens_per_s']:.1f} tokens/s against {best['dev_plain_tokens_per_s']:.1f} for the full "
            f"model ({best['dev_speedup']:.2f}x end to end, {best['dev_decode_speedup']:.2f}x decoding; "
            f"{100 * best['dev_acceptance_rate']:.0f}% of drafts accepted)")
    pays = best["dev_speedup"] > 1
    decode = "speculative" if pays or run.settings.draft_anyway else "plain"
    if not pays:
        then = ("its row is decoded anyway (--draft-anyway)" if decode == "speculative" else
                "the test split is decoded plainly (the full row); --draft-anyway decodes its row, a smaller "
                "--batch-size may pay")
        run.log(f"note: drafting with {drafter.name} does not pay on dev at batch {batch} "
                f"({best['dev_speedup']:.2f}x): {then}")
    return {"drafter": drafter.name, "batch_size": batch, **best, "given": given,
            "tried": list(tried.values()), "pays": pays, "decode": decode}
