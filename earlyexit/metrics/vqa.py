"""VQA accuracy with the official answer normalisation (VQAv2 / OK-VQA / VizWiz / GQA).

Normalisation follows `vqaEval.py` of the official VQA evaluation (GT-Vision-Lab/VQA),
quirks included, so numbers are comparable with published ones:

- newlines and tabs become spaces; the text is stripped;
- punctuation in `_PUNCTUATION` is deleted when it touches a space or when the text holds a
  comma between digits ("1,000" -> "1000"), otherwise replaced by a space ("t-shirt" -> "t shirt");
- a period not followed by a digit is deleted ("yes." -> "yes", "3.5" stays);
- lower-casing; number words zero..ten (and "none") become digits; articles a/an/the go;
- the official contractions table ("dont" -> "don't"). Its keys are matched after
  lower-casing, so the few keys with capitals ("Im", "Ive", "Id've") never fire: "im" stays "im".

Scoring: a question with answers a_1..a_n scores the mean over the n leave-one-out subsets of
min(#answers in the subset equal to the prediction / 3, 1) — the official "10 choose 9" rule.
The same rule is used for any n >= 2 (so with fewer than 4 answers full credit is out of reach,
as in the official script); with a single answer (GQA) it is an exact match after normalisation.

Unlike the official script, which normalises the human answers only for punctuation and only
when they disagree (its released annotations are already normalised), both sides here always
go through `normalize_answer`. On the official annotations the two agree except where the
official script compares a normalised prediction with an unnormalised unanimous answer (e.g. ten
times "t-shirt" never matches any prediction there); on raw answers (GQA, VizWiz, new data)
normalising both sides avoids counting "Two" against "2" as a miss.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from earlyexit.errors import DataError
from earlyexit.metrics import check_same_ids

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!"]  # note: no "." (own rule) and no "'" (contractions)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern, verbatim: "(?!<=\d)" is a lookahead (not a lookbehind), so in effect
# every period that is not followed by a digit is removed.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script passes re.UNICODE (= 32) where `sub` expects `count`: at most 32 periods go.
_PERIOD_COUNT = 32
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _strip_punctuation(text: str) -> str:
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The decision looks at the original text, the replacement acts on the running one.
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (see the module docstring for the rules)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def _accuracy_of_normalized(prediction: str, answers: Sequence[str]) -> float:
    if len(answers) == 1:
        return float(prediction == answers[0])
    matches = sum(answer == prediction for answer in answers)
    # Leaving out answer i leaves `matches - 1` matches if answer i matched, else `matches`.
    total = 0.0
    for answer in answers:
        others_matching = matches - 1 if answer == prediction else matches
        total += min(others_matching / 3.0, 1.0)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one prediction against the human answers, in [0, 1] (not percent)."""
    if not isinstance(prediction, str):
        raise DataError(f"VQA prediction must be a string, got {type(prediction).__name__}")
    _check_answers("<question>", answers)
    return _accuracy_of_normalized(normalize_answer(prediction),
                                   [normalize_answer(answer) for answer in answers])


def _check_answers(question_id, answers) -> None:
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise DataError(f"question {question_id!r}: answers must be a non-empty list of strings")
    if not all(isinstance(answer, str) for answer in answers):
        raise DataError(f"question {question_id!r}: every answer must be a string")


def vqa_scores(predictions: Mapping, samples_answers: Mapping,
               answer_types: Mapping | None = None, per_item: bool = False) -> dict:
    """Official-style VQA accuracy over a set of questions.

    predictions: question id -> predicted answer; samples_answers: question id -> human answers
    (the same ids); answer_types (optional): question id -> type such as "yes/no", "number",
    "other". Returns {"overall": accuracy in percent (0-100, like the official tool, unrounded),
    "num_questions": n} plus "per_answer_type" {type: percent} when types are given and
    "per_item" {id: accuracy in [0, 1]} when per_item=True.
    """
    check_same_ids(predictions, samples_answers, "question", "VQA prediction", "answers")
    if answer_types is not None:
        missing = [qid for qid in predictions if qid not in answer_types]
        if missing:
            raise DataError(f"question {missing[0]!r} has no answer type: give a type for every "
                            "question or pass answer_types=None")
    per_question = {}
    for qid, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise DataError(f"question {qid!r}: prediction must be a string, "
                            f"got {type(prediction).__name__}")
        answers = samples_answers[qid]
        _check_answers(qid, answers)
        per_question[qid] = _accuracy_of_normalized(
            normalize_answer(prediction), [normalize_answer(answer) for answer in answers])

    result = {"overall": 100.0 * sum(per_question.values()) / len(per_question),
              "num_questions": len(per_question)}
    if answer_types is not None:
        by_type: dict[str, list[float]] = {}
        for qid, accuracy in per_question.items():
            by_type.setdefault(answer_types[qid], []).append(accuracy)
        result["per_answer_type"] = {kind: 100.0 * sum(values) / len(values)
                                     for kind, values in by_type.items()}
    if per_item:
        result["per_item"] = per_question
    return result
