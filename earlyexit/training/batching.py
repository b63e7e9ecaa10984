"""From samples to model inputs: prompts, targets, and training batches.

Captioning uses an empty prompt (the model starts after BOS, as BLIP-2 does); VQA uses
BLIP-2's "Question: … Answer:" prompt and the most frequent human answer as the target; a
VisDial round uses the prompt it is ranked with (caption, history, question: `dialog.dialog_prompt`,
as much history as fits the context) and its ground-truth answer.
"""

from __future__ import annotations

import numpy as np
import torch

from earlyexit.data import Dataset, Sample
from earlyexit.data.tasks import Task, task_of
from earlyexit.errors import DataError


def pixel_values(backend, images) -> torch.Tensor:
    return backend.processor.image_processor(images, return_tensors="pt")["pixel_values"]


class LazyPixels:
    """The pixel tensors of a list of distinct images, loaded and preprocessed when indexed, so a
    large data set never sits in memory as one tensor. `pixels[row]` is one image (C, H, W);
    `pixels[[r1, r2, ...]]` is a batch (N, C, H, W). The same rows always give the same values."""

    def __init__(self, backend, samples: list[Sample]):
        self.backend, self.samples = backend, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        if isinstance(rows, (int, np.integer)):
            return self[[int(rows)]][0]
        rows = list(rows)
        if not rows:
            raise IndexError("no image rows given")
        distinct = list(dict.fromkeys(rows))  # each image loaded once, however often the batch repeats it
        tensor = pixel_values(self.backend, [self.samples[r].load_image() for r in distinct])
        position = {row: k for k, row in enumerate(distinct)}
        return tensor[[position[r] for r in rows]]


class TrainingBatches:
    """`batches(step)` -> the inputs and labels of training step `step`, deterministically.

    Each epoch visits every (data set, sample) item once in an order fixed by (seed, epoch);
    images are loaded and preprocessed per batch (`pixels` is lazy), so memory does not grow
    with the data set.
    """

    def __init__(self, backend, datasets: list[Dataset], batch_size: int, seed: int = 0, caption_words: bool = False):
        """`caption_words` adds `caption_words` (rows x vocabulary: the words of all reference
        captions of the row's image, for caption rows; all zero otherwise), the target of an
        auxiliary bag-of-words loss that teaches a from-scratch image encoder what to see."""
        self.backend, self.batch_size, self.seed = backend, batch_size, seed
        self.caption_words = caption_words
        self.items = [(d, i) for d, dataset in enumerate(datasets) for i in range(len(dataset))]
        if not self.items:
            raise DataError("the training data is empty; check --data and --split")
        self.datasets = datasets
        self._orders: dict[int, np.ndarray] = {}
        self.pixels, self.pixel_row = self._index_images(datasets)
        tokenizer = backend.processor.tokenizer
        self.tokenizer = tokenizer
        self.image_token = backend.model.config.image_token_id

    def _index_images(self, datasets: list[Dataset]) -> tuple[LazyPixels, list[list[int]]]:
        """The distinct images (VQA has several questions per image) as lazy pixel rows, and for
        each data set and sample the row of its image."""
        def key(dataset, sample):
            return dataset.name, dataset.split, sample.extra.get("image_id", sample.id)

        rows, first_sample = {}, []
        for dataset in datasets:
            for sample in dataset.samples:
                if key(dataset, sample) not in rows:
                    rows[key(dataset, sample)] = len(rows)
                    first_sample.append(sample)
        row_of = [[rows[key(d, s)] for s in d.samples] for d in datasets]
        return LazyPixels(self.backend, first_sample), row_of

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.items))}
        return self._orders[epoch]

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        first = step * self.batch_size
        picks = []
        for k in range(first, first + self.batch_size):
            epoch, offset = divmod(k, len(self.items))
            picks.append(self.items[self.order(epoch)[offset]])
        rng = np.random.default_rng([self.seed, step, 7])
        rows, prompts = [], []
        for d, i in picks:
            dataset = self.datasets[d]
            sample = dataset.samples[i]
            task = task_of(dataset)
            target = task.target(sample, rng)
            prompts.append(self.prompt(sample, task, target))
            rows.append(self.encode(prompts[-1], target))
        batch = self.collate(rows, self.pixels[[self.pixel_row[d][i] for d, i in picks]], prompts)
        if self.caption_words:
            words = torch.zeros(len(picks), len(self.tokenizer))
            for r, (d, i) in enumerate(picks):
                for caption in self.datasets[d].samples[i].captions:
                    words[r, self.tokenizer(caption, add_special_tokens=False)["input_ids"]] = 1.0
            batch["caption_words"] = words.to(self.backend.device)  # a float32 target, beside a model of any dtype
        return batch

    def prompt(self, sample: Sample, task: Task | str, target: str) -> str:
        """The task's prompt; a dialog round keeps only the history that fits the context beside
        its target, as ranking does (`Task.prompt`)."""
        return task_of(task).prompt(sample, self.backend, beside=[target])

    def encode(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """The family's prompt with its image placeholders (`backend.prompt_ids`) + target + EOS;
        labels only on target and EOS."""
        prompt_ids = self.backend.prompt_ids(prompt)
        target_ids = self.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        target_ids = target_ids + [self.tokenizer.eos_token_id]
        return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids

    def collate(self, rows, pixels: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """One batch of `encode`d rows, their images and the prompts they were encoded from (the
        image side of some families reads the prompt too: `Backend.prompt_vision_inputs`)."""
        length = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, (ids, targets) in enumerate(rows):  # right padding: training is not generation
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(ids)] = torch.tensor(targets)
            mask[r, : len(ids)] = 1
        return self.backend.on_model(self.backend.training_layout(
            {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": mask, "labels": labels,
             **self.backend.prompt_vision_inputs(prompts)}))


def language_model_step(model):
    """A training step (see `training.train`): cross-entropy of the BLIP-2 model on the labelled
    tokens (the model shifts the labels itself)."""

    def step(batch: dict[str, torch.Tensor], engine) -> dict[str, float]:
        return {"loss": engine.optimize("model", model(**batch).loss)}

    return step
