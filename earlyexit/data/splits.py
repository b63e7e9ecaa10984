"""The splits a run uses: exit training, development and test, and `val:A-B` slices of val."""

from __future__ import annotations

import dataclasses

from earlyexit.data.registry import load_dataset


def splits_for(data: str) -> tuple[str, str, str]:
    """(exit training, development, test) split names."""
    name = data.partition(":")[0]
    if name in ("scenes", "scenes-vqa"):
        return "exit_train", "dev", "test"
    if name == "visdial":  # VisDial 1.0 test has no ground truth: test on val too, never on what was tuned
        return "val:0.0-0.8", "val:0.8-0.9", "val:0.9-1.0"
    return "val:0.0-0.8", "val:0.8-1.0", "test"


def test_split_of(settings) -> tuple[str, str]:
    """(data set, split) a run scores: `test_data`/`test_split` where given, else the test split
    of the data set scored (VisDial's is a slice of val)."""
    data = settings.test_data or settings.data
    return data, settings.test_split or splits_for(data)[2]


def load_split(data: str, split: str, limit: int | None):
    """A split, where `val:A-B` is the slice [A, B) of the val split (the paper's 80/20 cut).
    Dialog rounds are cut at dialog boundaries, so no image is in two slices."""
    name, _, part = split.partition(":")
    dataset = load_dataset(data, name)
    if part:
        start, stop = (float(x) for x in part.split("-"))
        n = len(dataset)
        first, last = round(start * n), round(stop * n)
        if dataset.task == "dialog":
            first, last = _dialog_start(dataset.samples, first), _dialog_start(dataset.samples, last)
        dataset = dataclasses.replace(dataset, split=split, samples=dataset.samples[first:last])
    return dataset.subset(limit)


def _dialog_start(samples: list, position: int) -> int:
    """The first position at or after `position` where a new dialog (image) begins."""
    def image(k):
        return samples[k].extra.get("image_id", samples[k].id)

    while 0 < position < len(samples) and image(position) == image(position - 1):
        position += 1
    return position
