"""The splits a run uses: exit training, development and test, and `val:A-B` slices of val.
Splits published without answers are refused before any work (`refuse_unanswered`)."""

from __future__ import annotations

import dataclasses

from earlyexit.data.registry import load_dataset
from earlyexit.errors import ConfigError

# splits published without answers (their answers sit on an evaluation server, or the split does
# not exist for that data set: OK-VQA has train and val only): a run cannot score them
UNANSWERED = {"vqav2": ("test", "test-dev"), "okvqa": ("test", "test-dev"), "vizwiz": ("test",),
              "gqa": ("test", "challenge", "submission"), "visdial": ("test",), "nocaps": ("test",)}
# where each of them is scored instead: a disjoint part with answers (val's last 10 %, never what
# exits train on or what is tuned; GQA's test-dev, which ships its answers)
VAL_SLICES = ("val:0.0-0.8", "val:0.8-0.9", "val:0.9-1.0")
ANSWERED_TEST = {"gqa": "testdev"}


def splits_for(data: str) -> tuple[str, str, str]:
    """(exit training, development, test) split names: exits train on 80 % of val, tune on the
    next part and are scored on a split with answers (data sets whose test answers are not
    published: val's last 10 %, or GQA's test-dev)."""
    name = data.partition(":")[0]
    if name in ("scenes", "scenes-vqa"):
        return "exit_train", "dev", "test"
    if name in ANSWERED_TEST:
        return "val:0.0-0.8", "val:0.8-1.0", ANSWERED_TEST[name]
    if name in UNANSWERED:
        return VAL_SLICES
    return "val:0.0-0.8", "val:0.8-1.0", "test"


def refuse_unanswered(data: str, split: str) -> None:
    """A one-line ConfigError, before any work, for scoring a split published without answers."""
    name = data.partition(":")[0]
    if split.partition(":")[0] in UNANSWERED.get(name, ()):
        instead = splits_for(data)[2]
        raise ConfigError(f"{name}/{split} is published without answers, so nothing can be scored on it; score on "
                          f"{instead} (test_split = \"{instead}\" in a bench spec or RunSettings; leaving it out "
                          "picks it)")


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
