"""From a sample to the text the model reads and the text it should write: the builders each
task (`earlyexit.data.tasks`) is made of.

Captioning uses an empty prompt (the model starts after BOS, as BLIP-2 does); VQA uses BLIP-2's
"Question: … Answer:" prompt and the most frequent human answer as the target; a VisDial round
uses its caption, history and question (as much history as fits the context) and its
ground-truth answer.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from earlyexit.data import Dataset, Sample
from earlyexit.errors import ConfigError

VQA_PROMPT = "Question: {question} Answer:"


def caption_prompt(sample: Sample) -> str:
    """Nothing: a caption is written from the image alone."""
    return ""


def question_prompt(sample: Sample) -> str:
    return VQA_PROMPT.format(question=sample.question)


def reference_caption(sample: Sample, rng: np.random.Generator | None = None) -> str:
    """The first reference caption, or one drawn with `rng`."""
    if rng is None:
        return sample.captions[0]
    return sample.captions[int(rng.integers(len(sample.captions)))]


def majority_answer(sample: Sample, rng: np.random.Generator | None = None) -> str:
    """The most frequent answer (VQA's human answers; a VisDial round's ground truth)."""
    return Counter(sample.answers).most_common(1)[0][0]


def prompt_for(sample: Sample, task: str) -> str:
    """The prompt for the task named `task` (a dialog round with all its history): the builder
    `earlyexit.data.tasks.task_of(task).prompt` uses, for code that holds a task's name."""
    return PROMPTS[task](sample)


def target_for(sample: Sample, task: str, rng: np.random.Generator | None = None) -> str:
    """The target for the task named `task`, as `earlyexit.data.tasks.task_of(task).target` gives it."""
    return TARGETS[task](sample, rng)


def dialog_prompt(sample, rounds: int | None = None) -> str:
    """The prompt of a VisDial round with the last `rounds` rounds of history (all when None)."""
    history = sample.extra.get("history", [])
    if rounds is not None:
        history = history[len(history) - rounds:] if rounds else []
    caption = sample.extra.get("caption", "").strip().rstrip(".")
    parts = [f"{caption}." if caption else ""]
    parts += [f"Question: {question} Answer: {answer}." for question, answer in history]
    parts.append(f"Question: {sample.question} Answer:")
    return " ".join(part for part in parts if part)


def fitting_prompt(backend, sample, longest_option: int) -> str:
    """The round's prompt with as much recent history as the model's context leaves room for."""
    tokenizer = backend.processor.tokenizer
    limit = getattr(backend.text_config, "max_position_embeddings", None)
    image_tokens = getattr(backend.model.config, "num_query_tokens", 0)
    history = len(sample.extra.get("history", []))
    for rounds in range(history, -1, -1):
        prompt = dialog_prompt(sample, rounds)
        if not limit or image_tokens + len(tokenizer(prompt)["input_ids"]) + longest_option <= limit:
            return prompt
    raise ConfigError(f"VisDial round {sample.id}: its question and longest answer option do not fit the model's "
                      f"context of {limit} positions; use a model with a longer context")


def longest_option(backend, options: list[str]) -> int:
    tokenizer = backend.processor.tokenizer
    return 1 + max((len(tokenizer(" " + o, add_special_tokens=False)["input_ids"]) for o in options), default=0)


def one_caption_per_sample(dataset: Dataset) -> Dataset:
    """Every (image, caption) pair becomes a training item, as captioning papers count epochs."""
    samples = [dataclasses.replace(s, id=f"{s.id}#{i}", captions=[c], extra={**s.extra, "image_id": s.extra.get(
        "image_id", s.id)}) for s in dataset for i, c in enumerate(s.captions)]
    return dataclasses.replace(dataset, samples=samples)


# By task name, for `prompt_for` and `target_for`; the `Task` objects are made of the same builders.
PROMPTS = {"caption": caption_prompt, "vqa": question_prompt, "dialog": dialog_prompt}
TARGETS = {"caption": reference_caption, "vqa": majority_answer, "dialog": majority_answer}
