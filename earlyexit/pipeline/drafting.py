"""Step 4 of a run: for the self-speculative row, the exit that drafts and how many tokens it
drafts a round, chosen by tokens/s on (part of) the dev split."""

from __future__ import annotations

import dataclasses

import torch

from earlyexit.core.choices import draft_exit_index
from earlyexit.core.generation import count_tokens, timed
from earlyexit.core.speculative import DEFAULT_DRAFT_LENGTH, DRAFT_LENGTHS
from earlyexit.data.tasks import task_of
from earlyexit.evaluation.evaluate import evaluate
from earlyexit.pipeline.context import RunContext
from earlyexit.pipeline.settings import RunSettings


def choose_draft_exit(backend, strategy, dev, evaluation, settings: RunSettings, log, vocabulary=None):
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
                          draft_length=length, draft_vocabulary=vocabulary)
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


def prepare_drafting(run: RunContext, draft_vocabulary, exit_vocabulary) -> Drafting:
    """The speculative row's drafting exit and length, or none (not asked for, or a ranking task)."""
    settings = run.settings
    if settings.speculative and run.ranking:
        run.log("note: no self-speculative row: VisDial is scored by ranking answer options, nothing is decoded")
    if not settings.speculative or run.ranking:
        return Drafting(vocabulary=draft_vocabulary)
    vocabulary = draft_vocabulary if draft_vocabulary is not None else exit_vocabulary
    if vocabulary is not None:
        run.log(f"speculative: drafts read out {len(vocabulary)} tokens (the backbone's most frequent on "
                f"{settings.data}/{run.train_split})")
    exit_index, length, choice = choose_draft_exit(run.backend, run.strategy, run.dev, run.evaluation, settings,
                                                   run.log, vocabulary)
    return Drafting(exit_index, length, vocabulary, choice)
