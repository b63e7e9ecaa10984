"""Data sets as lists of `Sample`s, whatever their source (embedded, PyPI, official files).

Every loader returns a `Dataset`; images load lazily so big data sets stay cheap to open.
`load_dataset("name[:path]", split)` is the single entry point the CLI uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from earlyexit.data.images import read_image

TASKS = ("caption", "vqa", "dialog")


@dataclasses.dataclass
class Sample:
    """One image with what is known about it.

    caption tasks: `captions` holds the references.
    vqa: `question` and `answers` (the human answers, 10 for VQAv2-style data).
    dialog (VisDial): `question`, `answers` (the ground-truth answer), `extra["options"]` (the
    100 candidate answers), `extra["gt_index"]`, `extra["history"]`.
    """

    id: str
    image: Callable[[], Any]  # returns a PIL RGB image when called
    captions: list[str] = dataclasses.field(default_factory=list)
    question: str | None = None
    answers: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    def load_image(self):
        return self.image()


@dataclasses.dataclass
class Dataset:
    name: str
    task: str  # one of TASKS
    split: str
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    def subset(self, count: int | None) -> Dataset:
        """The first `count` samples (all when None)."""
        if count is None:
            return self
        return dataclasses.replace(self, samples=self.samples[:count])


def image_from_file(path: str) -> Callable[[], Any]:
    """A lazy loader for an image file: an 8-bit RGB PIL image of whatever mode and bit depth the
    file holds; a missing, unreadable, corrupt or decompression-bomb file raises DataError."""

    def load():
        return read_image(path, fix="check the data set's image folder or remove the file from its annotations")

    return load
