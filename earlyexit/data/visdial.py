"""VisDial v1.0 (visdial_1.0_{train,val,test}.json) as one dialog-task Sample per round.

Questions and answers are stored once in data.questions / data.answers; rounds refer to them
by index. A round is a Sample when it carries answer_options: every round on train and val,
only the last round of each dialog on test (its earlier rounds are the history).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from earlyexit.data import Dataset, Sample, image_from_file
from earlyexit.data.coco import JsonFile, check_split, require_folder
from earlyexit.errors import ConfigError, DataError

# train uses COCO's own images (train2014 and val2014); val and test ship VisDial files
DEFAULT_IMAGE_PATTERNS = {
    "train": ("train2014/COCO_train2014_{image_id:012d}.jpg",
              "val2014/COCO_val2014_{image_id:012d}.jpg"),
    "val": ("VisualDialog_val2018_{image_id:012d}.jpg",),
    "test": ("VisualDialog_test2018_{image_id:012d}.jpg",),
}


def load_visdial(json_path, image_root, split: str, *,
                 image_pattern: str | Sequence[str] | None = None) -> Dataset:
    """VisDial v1.0; Sample per round with question, answers=[ground truth] (empty on test) and
    extra: options (the 100 candidate answers), gt_index (None on test), history (the
    (question, answer) pairs before this round), caption, round (1-based), image_id.

    `image_pattern` is a file name under image_root with {image_id} (and optionally {split});
    several patterns are tried in order when the image loads. The defaults: VisDial's
    VisualDialog_<split>2018_<id>.jpg for val/test, COCO's train2014/ and val2014/ for train.
    """
    check_split(split, ("train", "val", "test"), "load_visdial")
    patterns = _patterns(image_pattern, split)
    source = JsonFile(json_path, f"visdial_1.0_{split}.json")
    root = require_folder(image_root, f"the VisDial {split} images")
    top = source.check(source.data, dict, "the top level")
    file_split = source.field(top, "split", str, "the top level", optional=True)
    if file_split is not None and file_split != split:
        source.fail(f"holds the {file_split!r} split, not {split!r}")
    data = source.field(top, "data", dict, "the top level")
    questions = source.field(data, "questions", list, "the 'data' object")
    answers = source.field(data, "answers", list, "the 'data' object")

    def text(table: list, name: str, index, where: str) -> str:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(table):
            source.fail(f"{where} refers to {name} {index!r}, outside data.{name} "
                        f"(0..{len(table) - 1})")
        return source.check(table[index], str, f"data.{name}[{index}]")

    samples = []
    for dialog_index, dialog in enumerate(source.field(data, "dialogs", list, "the 'data' object")):
        where = f"dialog {dialog_index}"
        image_id = source.field(dialog, "image_id", int, where)
        caption = source.field(dialog, "caption", str, where)
        image = _image_loader(root, patterns, image_id, split)
        history: list[tuple[str, str]] = []
        for round_index, turn in enumerate(source.field(dialog, "dialog", list, where)):
            round_where = f"{where} round {round_index + 1}"
            question_index = source.field(turn, "question", int, round_where)
            question = text(questions, "questions", question_index, round_where)
            # only a test dialog's last round is unanswered
            answer_index = source.field(turn, "answer", int, round_where,
                                        optional=(split == "test"))
            answer = (None if answer_index is None
                      else text(answers, "answers", answer_index, round_where))
            # test rounds before the last are history only: no options there
            options = source.field(turn, "answer_options", list, round_where,
                                   optional=(split == "test"))
            if options is not None:
                samples.append(Sample(
                    id=f"{image_id}_{round_index + 1}",
                    image=image,
                    question=question,
                    answers=[answer] if answer is not None else [],
                    extra={
                        "options": [text(answers, "answers", option, f"{round_where} option")
                                    for option in options],
                        "gt_index": source.field(turn, "gt_index", int, round_where,
                                                 optional=(split == "test")),
                        "history": list(history),
                        "caption": caption,
                        "round": round_index + 1,
                        "image_id": image_id,
                    },
                ))
            if answer is None:
                break
            history.append((question, answer))
    return Dataset(name="visdial", task="dialog", split=split, samples=samples)


def _patterns(image_pattern, split: str) -> tuple[str, ...]:
    if image_pattern is None:
        return DEFAULT_IMAGE_PATTERNS[split]
    patterns = (image_pattern,) if isinstance(image_pattern, str) else tuple(image_pattern)
    for pattern in patterns:
        try:
            pattern.format(image_id=1, split=split)
        except (KeyError, IndexError, ValueError, AttributeError) as error:
            raise ConfigError(f"load_visdial: image_pattern {pattern!r} is not a valid pattern "
                              f"({error}); use fields {{image_id}} and {{split}}")
    return patterns


def _image_loader(root: Path, patterns: tuple[str, ...], image_id: int, split: str):
    paths = [str(root / pattern.format(image_id=image_id, split=split)) for pattern in patterns]
    if len(paths) == 1:
        return image_from_file(paths[0])

    def load():  # the first pattern whose file exists wins; decided only when loading
        for path in paths:
            if Path(path).is_file():
                return image_from_file(path)()
        raise DataError(f"image {image_id} is missing: none of {', '.join(paths)} exists; "
                        "check image_root or pass image_pattern")

    return load
