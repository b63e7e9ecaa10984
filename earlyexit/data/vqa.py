"""VQA data sets in their official files: VQAv2, OK-VQA, VizWiz and GQA (task "vqa").

`Sample.answers` holds every human answer (10 for VQAv2, OK-VQA and VizWiz) because the VQA
accuracy metric counts how many humans agree; GQA has one answer and is scored by exact match.
"""

from __future__ import annotations

from pathlib import Path

from earlyexit.data import Dataset, Sample, image_from_file
from earlyexit.data.coco import JsonFile, check_split, require_folder

# test-dev is a subset of test2015: its questions say "test-dev2015", its images live in test2015
_IMAGE_SUBTYPE_OF = {"test-dev2015": "test2015"}


def load_vqav2(questions_json, annotations_json, image_root, split_name: str | None = None, *,
               image_subtype: str | None = None) -> Dataset:
    """VQAv2: v2_OpenEnded_mscoco_<subtype>_questions.json (+ v2_mscoco_<subtype>_annotations.json).

    Images are image_root/COCO_<subtype>_<image_id:012d>.jpg, the subtype taken from the
    questions file's "data_subtype" (override with `image_subtype`). Without an annotations
    file (test-dev, test) the answers are empty. `split_name` defaults to the data subtype.
    """
    return _load_vqa_pair("vqav2", questions_json, annotations_json, image_root, split_name,
                          image_subtype, "v2_OpenEnded_mscoco_<subtype>_questions.json",
                          "v2_mscoco_<subtype>_annotations.json")


def load_okvqa(questions_json, annotations_json, image_root, split_name: str | None = None, *,
               image_subtype: str | None = None) -> Dataset:
    """OK-VQA: OpenEnded_mscoco_<subtype>_questions.json + mscoco_<subtype>_annotations.json.

    Same layout as VQAv2; of each answer's "answer" and "raw_answer" the processed "answer"
    is used, as the official evaluation does.
    """
    return _load_vqa_pair("okvqa", questions_json, annotations_json, image_root, split_name,
                          image_subtype, "OK-VQA's OpenEnded_mscoco_<subtype>_questions.json",
                          "OK-VQA's mscoco_<subtype>_annotations.json")


def _load_vqa_pair(name, questions_json, annotations_json, image_root, split_name,
                   image_subtype, questions_expected, annotations_expected) -> Dataset:
    questions_file = JsonFile(questions_json, questions_expected)
    top = questions_file.check(questions_file.data, dict, "the top level")
    questions = questions_file.field(top, "questions", list, "the top level")
    data_subtype = questions_file.field(top, "data_subtype", str, "the top level",
                                        optional=image_subtype is not None)
    image_subtype = image_subtype or _IMAGE_SUBTYPE_OF.get(data_subtype, data_subtype)
    root = require_folder(image_root, f"the COCO {image_subtype} images")
    annotations = None
    if annotations_json is not None:
        annotations_file, annotations = _read_annotations(annotations_json, annotations_expected,
                                                           data_subtype)

    samples = []
    for index, question in enumerate(questions):
        where = f"question {index}"
        question_id = questions_file.field(question, "question_id", (int, str), where)
        image_id = questions_file.field(question, "image_id", int, where)
        text = questions_file.field(question, "question", str, where)
        extra = {"question_id": question_id, "image_id": image_id}
        answers: list[str] = []
        if annotations is not None:
            if question_id not in annotations:
                annotations_file.fail(f"has no annotation for question_id {question_id} of "
                                      f"{questions_file.path.name}")
            answers, details = annotations[question_id]
            extra.update(details)
        samples.append(Sample(
            id=str(question_id),
            image=image_from_file(str(root / f"COCO_{image_subtype}_{image_id:012d}.jpg")),
            question=text,
            answers=answers,
            extra=extra,
        ))
    return Dataset(name=name, task="vqa", split=split_name or data_subtype or image_subtype,
                   samples=samples)


def _read_annotations(path, expected: str, questions_subtype: str | None):
    """The annotations file and question_id -> (answers, descriptive fields)."""
    source = JsonFile(path, expected)
    top = source.check(source.data, dict, "the top level")
    subtype = source.field(top, "data_subtype", str, "the top level", optional=True)
    if subtype and questions_subtype and subtype != questions_subtype:
        source.fail(f"holds {subtype} annotations but the questions are {questions_subtype}")
    by_question = {}
    for index, annotation in enumerate(source.field(top, "annotations", list, "the top level")):
        where = f"annotation {index}"
        question_id = source.field(annotation, "question_id", (int, str), where)
        answer_list = source.field(annotation, "answers", list, where)
        answers = [source.field(answer, "answer", str, f"{where} answer {number}")
                   for number, answer in enumerate(answer_list)]
        # descriptive fields differ a little between VQAv2 and OK-VQA, so each is optional
        details = {key: source.field(annotation, key, str, where, optional=True)
                   for key in ("question_type", "answer_type", "multiple_choice_answer")}
        by_question[question_id] = (answers, {k: v for k, v in details.items() if v})
    return source, by_question


def load_vizwiz(json_path, image_root, split: str) -> Dataset:
    """VizWiz VQA (train.json, val.json, test.json): a list of {image, question, answers, ...}.

    Images are image_root/<image>. Test entries have no answers, so theirs are empty.
    extra: answer_type and answerable (when given).
    """
    check_split(split, ("train", "val", "test"), "load_vizwiz")
    source = JsonFile(json_path, f"VizWiz's {split}.json")
    root = require_folder(image_root, f"the VizWiz {split} images")
    samples = []
    for index, entry in enumerate(source.check(source.data, list, "the top level")):
        where = f"entry {index}"
        image = source.field(entry, "image", str, where)
        question = source.field(entry, "question", str, where)
        # only the test split comes without answers; elsewhere their absence is a broken file
        answer_list = source.field(entry, "answers", list, where, optional=(split == "test"))
        answers = [source.field(answer, "answer", str, f"{where} answer {number}")
                   for number, answer in enumerate(answer_list or [])]
        extra = {"image_name": image}
        for key, kind in (("answer_type", str), ("answerable", int)):
            value = source.field(entry, key, kind, where, optional=True)
            if value is not None:
                extra[key] = value
        samples.append(Sample(
            id=Path(image).stem,  # one question per image: VizWiz_val_00000000
            image=image_from_file(str(root / image)),
            question=question,
            answers=answers,
            extra=extra,
        ))
    return Dataset(name="vizwiz", task="vqa", split=split, samples=samples)


def load_gqa(questions_json, image_root, split: str) -> Dataset:
    """GQA questions (e.g. testdev_balanced_questions.json): {question_id: {imageId, question,
    answer, fullAnswer, ...}}. Images are image_root/<imageId>.jpg.

    GQA is scored by exact match, so answers = [answer] (empty on the test and challenge
    files, which have none); extra["full_answer"] keeps the sentence answer.
    """
    source = JsonFile(questions_json,
                      "a GQA questions file such as testdev_balanced_questions.json")
    root = require_folder(image_root, "the GQA images")
    samples = []
    for question_id, entry in source.check(source.data, dict, "the top level").items():
        where = f"question {question_id}"
        image_id = source.field(entry, "imageId", (str, int), where)
        question = source.field(entry, "question", str, where)
        answer = source.field(entry, "answer", str, where, optional=True)
        samples.append(Sample(
            id=str(question_id),
            image=image_from_file(str(root / f"{image_id}.jpg")),
            question=question,
            answers=[answer] if answer is not None else [],
            extra={"image_id": str(image_id),
                   "full_answer": source.field(entry, "fullAnswer", str, where, optional=True)},
        ))
    return Dataset(name="gqa", task="vqa", split=split, samples=samples)
