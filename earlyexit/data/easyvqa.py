"""easy-VQA from its PyPI package `easy_vqa`: simple shapes, questions with one-word answers.

The package ships train and test only; "val" is a fixed 10% of the training *images* (with
all their questions), so no val image is ever seen in training.
"""

from __future__ import annotations

import math
import random

from earlyexit.data import Dataset, Sample, image_from_file
from earlyexit.data.coco import check_split
from earlyexit.errors import DataError

VAL_FRACTION = 0.1
_VAL_SEED = 20240101  # fixed: the split must be identical on every machine and run


def load_easy_vqa(split: str) -> Dataset:
    """easy-VQA split "train", "val" (held out from train) or "test".

    Each question has one true answer; it is repeated 10 times in `answers` so that the VQA
    accuracy, min(#matching humans / 3, 1), is exactly the exact-match accuracy.
    Sample ids are "<package split>-<question index>", unique and stable across runs.
    """
    check_split(split, ("train", "val", "test"), "load_easy_vqa")
    try:
        import easy_vqa
    except ImportError:
        raise DataError("the easy_vqa package is not installed; run `pip install easy-vqa`")

    if split == "test":
        package_split = "test"
        questions, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
        wanted_images = set(image_paths)
    else:
        package_split = "train"
        questions, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
        val_images = held_out_images(image_paths)
        wanted_images = val_images if split == "val" else set(image_paths) - val_images

    samples = []
    for index, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        if image_id not in image_paths:
            raise DataError(f"easy_vqa {package_split} question {index} refers to image "
                            f"{image_id}, which the package lacks; reinstall easy-vqa")
        if image_id not in wanted_images:
            continue
        samples.append(Sample(
            id=f"{package_split}-{index}",
            image=image_from_file(image_paths[image_id]),
            question=question,
            answers=[answer] * 10,
            extra={"image_id": image_id},
        ))
    return Dataset(name="easy-vqa", task="vqa", split=split, samples=samples)


def held_out_images(train_image_paths: dict) -> set:
    """The training image ids that form "val": a seeded draw from the sorted ids."""
    image_ids = sorted(train_image_paths)
    count = math.ceil(len(image_ids) * VAL_FRACTION)
    return set(random.Random(_VAL_SEED).sample(image_ids, count))
