"""The task of a data set as a registered object: captioning, VQA, VisDial's answer ranking.

A `Task` says what the model reads for a sample (`prompt`) and what it should write (`target`),
which sample field holds the references and the backbone's own outputs (`outputs`), how
predictions are scored (`score`), the quality key calibration compares (`main_metric`) and the
name tables and figures give it (`table_metric`), whether it generates or ranks (`ranks`), and
what it refuses before any work (`check`, `refuse_exit_vocabulary`). `Dataset.task` stays the
task's name; `task_of(dataset or name)` finds its `Task` in `TASKS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from earlyexit.data import Dataset, Sample
from earlyexit.data.prompts import (caption_prompt, dialog_prompt, fitting_prompt, longest_option, majority_answer,
                                    one_caption_per_sample, question_prompt, reference_caption)
from earlyexit.errors import ConfigError
from earlyexit.metrics.caption import caption_scores, cider_per_item
from earlyexit.metrics.dialog import dialog_scores
from earlyexit.metrics.vqa import vqa_scores

RANKING_TAKES_NO_EXIT_VOCABULARY = ("--exit-vocabulary restricts generated tokens; VisDial ranks candidate answers "
                                    "over the whole vocabulary: drop it")


class Task:
    """What a data set's task means to prompting, training, scoring and calibration."""

    name: ClassVar[str]
    outputs: ClassVar[str] = "answers"  # the Sample field of references, and of the backbone's own outputs
    main_metric: ClassVar[str]  # the quality key calibration compares (a key of `score`'s result)
    table_metric: ClassVar[str]  # the metric's name in bench tables and figures
    ranks: ClassVar[bool] = False  # scored by ranking answer options (nothing decoded), else by generating
    needs_answers: ClassVar[bool] = True  # a split without answers cannot be scored

    def prompt(self, sample: Sample, backend=None, room: int = 0, beside: Sequence[str] | None = None) -> str:
        """The text the model reads before it writes. Dialog rounds keep as much recent history as
        fits `backend`'s context beside `room` tokens of output, or beside the longest of the texts
        `beside` (answer options, a target) and its end of sequence; all of it without a backend."""
        raise NotImplementedError

    def target(self, sample: Sample, rng: np.random.Generator | None = None) -> str:
        """The text the model should write (training, teacher forcing); `rng` draws among references."""
        return majority_answer(sample, rng)

    def training_items(self, dataset: Dataset) -> Dataset:
        """The items exits train on (default: the samples)."""
        return dataset

    def score(self, dataset: Dataset, predictions: Mapping, quick: bool = False) -> dict:
        """Quality of `predictions` by sample id (texts; ranking: each round's ground-truth rank)
        against `dataset`'s references. `quick`: the main metric only, where the others cost."""
        raise NotImplementedError

    def per_item(self, dataset: Dataset, predictions: Mapping) -> dict:
        """{sample id: its score} whose mean is the main metric (up to a constant factor): what a
        bootstrap over samples resamples (`calibrate.loss_bound`)."""
        raise NotImplementedError

    def check(self, dataset: Dataset, decode: str = "early-exit", num_beams: int = 1) -> None:
        """Refuse, before any work, a split this task cannot score or decoding it cannot use."""
        self.check_split(dataset)
        self.refuse_decoding(decode, num_beams)

    def check_split(self, dataset: Dataset) -> None:
        """Refuse a split without what scoring reads (VQA: answers; VisDial: the ground truth's index)."""
        if self.needs_answers and any(not s.answers for s in dataset):
            raise ConfigError(f"{dataset.name}/{dataset.split} has no answers to score against; pick a split "
                              "with annotations")

    def refuse_decoding(self, decode: str, num_beams: int) -> None:
        """What a ranking task refuses of the decoding settings (generating tasks: nothing here)."""

    def refuse_exit_vocabulary(self) -> None:
        """Called where an exit vocabulary (`--exit-vocabulary`) was asked for: a ranking task
        refuses it (options are ranked over the whole vocabulary); a generating task takes it."""
        if self.ranks:
            raise ConfigError(RANKING_TAKES_NO_EXIT_VOCABULARY)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class CaptionTask(Task):
    name, outputs, main_metric, table_metric, needs_answers = "caption", "captions", "CIDEr", "CIDEr", False

    def prompt(self, sample, backend=None, room=0, beside=None):
        return caption_prompt(sample)

    def target(self, sample, rng=None):
        return reference_caption(sample, rng)

    def training_items(self, dataset):
        """Every (image, caption) pair is one item, as captioning papers count epochs."""
        return one_caption_per_sample(dataset)

    def score(self, dataset, predictions, quick=False):
        references = {s.id: s.captions for s in dataset if s.id in predictions}
        if quick:  # CIDEr alone: no METEOR (Java) start-up, for calibration sweeps
            per_item = cider_per_item(predictions, references)
            return {"CIDEr": sum(per_item.values()) / len(per_item)}
        return caption_scores(predictions, references)

    def per_item(self, dataset, predictions):
        return cider_per_item(predictions, {s.id: s.captions for s in dataset if s.id in predictions})


class VqaTask(Task):
    name, main_metric, table_metric = "vqa", "overall", "accuracy"

    def prompt(self, sample, backend=None, room=0, beside=None):
        return question_prompt(sample)

    def score(self, dataset, predictions, quick=False):
        return vqa_scores(predictions, {s.id: s.answers for s in dataset if s.id in predictions})

    def per_item(self, dataset, predictions):
        answers = {s.id: s.answers for s in dataset if s.id in predictions}
        return vqa_scores(predictions, answers, per_item=True)["per_item"]


class DialogTask(Task):
    """VisDial: each round's candidate answers ranked by the model's likelihood (MRR, R@k)."""

    name, main_metric, table_metric, ranks = "dialog", "MRR", "MRR", True

    def prompt(self, sample, backend=None, room=0, beside=None):
        if backend is None:
            return dialog_prompt(sample)
        return fitting_prompt(backend, sample, longest_option(backend, beside) if beside is not None else room)

    def score(self, dataset, predictions, quick=False):
        """`predictions`: the ground truth's rank among each round's options, by sample id."""
        return {**dialog_scores([predictions[s.id] for s in dataset.samples]), "rounds": len(predictions),
                "scoring": "rank of the ground truth among the options by mean token log-probability (ties last)"}

    def per_item(self, dataset, predictions):
        return {s.id: 1.0 / predictions[s.id] for s in dataset.samples if s.id in predictions}  # reciprocal ranks

    def check_split(self, dataset):
        if any(s.extra.get("gt_index") is None for s in dataset):
            raise ConfigError(f"{dataset.name}/{dataset.split} has no ground-truth answers to rank against; "
                              "use --split val")

    def refuse_decoding(self, decode, num_beams):
        if decode != "early-exit":
            raise ConfigError("VisDial is scored by ranking answer options, not by decoding; drop --decode speculative")
        if num_beams > 1:
            raise ConfigError("VisDial is scored by ranking answer options, not by beam search; drop --num-beams")


TASKS: dict[str, Task] = {task.name: task for task in (CaptionTask(), VqaTask(), DialogTask())}


def task_of(dataset_or_name: Dataset | Task | str) -> Task:
    """The registered task of a data set, or of a task's name."""
    if isinstance(dataset_or_name, Task):
        return dataset_or_name
    name = dataset_or_name.task if isinstance(dataset_or_name, Dataset) else dataset_or_name
    if name not in TASKS:
        where = f"data set {dataset_or_name.name}: " if isinstance(dataset_or_name, Dataset) else ""
        raise ConfigError(f"{where}unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
