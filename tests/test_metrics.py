"""Metrics against values worked out by hand on tiny cases.

Caption tests need Java (PTB tokenizer, METEOR); one METEOR process is shared by the module.
"""

import math
import os
import shutil

import pytest

from earlyexit.errors import ConfigError, DataError
from earlyexit.metrics import caption
from earlyexit.metrics.caption import CaptionScorer, caption_scores, cider_per_item
from earlyexit.metrics.dialog import dialog_scores, rank_of_ground_truth
from earlyexit.metrics.vqa import normalize_answer, vqa_accuracy, vqa_scores

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")


# ----------------------------------------------------------------------------- VQA

@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                    # final period removed, lower-cased
    ("3.5", "3.5"),                     # a period before a digit stays
    ("1,000", "1000"),                  # comma between digits: punctuation deleted, not spaced
    ("red,white", "red white"),         # a comma touching no space becomes a space
    ("red, white", "red white"),        # ", " present: the comma is deleted
    ("t-shirt", "t shirt"),
    ("What?!", "what"),
    ("two", "2"), ("None", "0"), ("Ten dogs", "10 dogs"),
    ("The cat", "cat"), ("an apple", "apple"), ("a", ""),
    ("dont", "don't"), ("isnt", "isn't"), ("yall", "y'all"),
    ("Im", "im"),                       # official table's key is "Im", matched after lower-casing
    ("  two\tdogs\n", "2 dogs"),
])
def test_normalize_answer_follows_the_official_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_leave_one_out_over_ten_answers():
    no, yes = "no", "yes"
    # 2 of 10 match: the 8 subsets without a match-holder lost keep both (2/3), the 2 others keep one.
    assert vqa_accuracy(yes, [yes] * 2 + [no] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    # 3 of 10: 7 subsets keep all three (capped at 1), 3 subsets keep two.
    assert vqa_accuracy(yes, [yes] * 3 + [no] * 7) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert vqa_accuracy(yes, [yes] * 4 + [no] * 6) == 1.0  # every subset keeps >= 3
    assert vqa_accuracy(yes, [yes] * 1 + [no] * 9) == pytest.approx((9 * 1 / 3 + 1 * 0) / 10)
    assert vqa_accuracy("maybe", [yes] * 5 + [no] * 5) == 0.0


def test_vqa_accuracy_normalises_both_sides():
    answers = ["2"] * 3 + ["Three"] * 7
    assert vqa_accuracy("Two.", answers) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("3", answers) == 1.0


def test_vqa_accuracy_with_fewer_answers():
    # Three identical answers: each leave-one-out subset holds two matches -> 2/3.
    assert vqa_accuracy("yes", ["yes"] * 3) == pytest.approx(2 / 3)
    # One answer (GQA): exact match after normalisation.
    assert vqa_accuracy("The Dog", ["dog"]) == 1.0
    assert vqa_accuracy("dogs", ["dog"]) == 0.0


def test_vqa_scores_overall_percent_and_per_answer_type():
    predictions = {1: "yes", 2: "two", 3: "blue"}
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["red"] * 10}
    types = {1: "yes/no", 2: "number", 3: "other"}
    two_of_ten = (8 * 2 / 3 + 2 * 1 / 3) / 10
    result = vqa_scores(predictions, answers, answer_types=types, per_item=True)
    assert result["overall"] == pytest.approx(100 * (1 + two_of_ten + 0) / 3)
    assert result["num_questions"] == 3
    assert result["per_answer_type"] == pytest.approx(
        {"yes/no": 100.0, "number": 100 * two_of_ten, "other": 0.0})
    assert result["per_item"] == pytest.approx({1: 1.0, 2: two_of_ten, 3: 0.0})
    assert "per_answer_type" not in vqa_scores(predictions, answers)


@pytest.mark.parametrize("predictions, answers, types, fragment", [
    ({1: "a"}, {2: ["a"]}, None, "question 1 "),
    ({1: "a", 2: "b"}, {1: ["a"]}, None, "question 2 "),
    ({1: 3}, {1: ["3"]}, None, "question 1:"),
    ({7: "a"}, {7: []}, None, "question 7:"),
    ({7: "a"}, {7: "a"}, None, "question 7:"),
    ({7: "a"}, {7: ["a"]}, {}, "question 7 has no answer type"),
    ({}, {}, None, "no VQA predictions"),
])
def test_vqa_scores_rejects_bad_input(predictions, answers, types, fragment):
    with pytest.raises(DataError, match=fragment):
        vqa_scores(predictions, answers, answer_types=types)


# ----------------------------------------------------------------------------- VisDial

def test_dialog_scores_by_hand():
    ranks = [1, 2, 5, 10, 11, 100]
    result = dialog_scores(ranks)
    assert result["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 11 + 1 / 100) / 6)
    assert result["R@1"] == pytest.approx(1 / 6)
    assert result["R@5"] == pytest.approx(3 / 6)
    assert result["R@10"] == pytest.approx(4 / 6)
    assert result["mean_rank"] == pytest.approx((1 + 2 + 5 + 10 + 11 + 100) / 6)


def test_rank_of_ground_truth_and_tie_rule():
    assert rank_of_ground_truth([0.1, 0.9, 0.5, 0.8], gt_index=2) == 3
    assert rank_of_ground_truth([0.1, 0.9, 0.5, 0.8], gt_index=1) == 1
    tied = [0.5, 0.9, 0.5, 0.5]
    assert rank_of_ground_truth(tied, 0) == 4                       # pessimistic: 1 better + 2 tied
    assert rank_of_ground_truth(tied, 0, ties="optimistic") == 2    # only the better one counts
    assert rank_of_ground_truth([0.0] * 100, 37) == 100             # constant scores: worst rank
    np = pytest.importorskip("numpy")
    assert rank_of_ground_truth(np.array([3.0, 1.0, 2.0]), np.int64(1)) == 3


def test_dialog_rejects_bad_input():
    for ranks in ([], [0], [1, 2.0], [True]):
        with pytest.raises(DataError):
            dialog_scores(ranks)
    with pytest.raises(DataError, match="index 3"):
        rank_of_ground_truth([1.0, 2.0, 3.0], 3)
    with pytest.raises(DataError, match="NaN"):
        rank_of_ground_truth([1.0, math.nan], 0)
    with pytest.raises(ConfigError, match="tie rule"):
        rank_of_ground_truth([1.0], 0, ties="average")


# ----------------------------------------------------------------------------- captions

@pytest.mark.parametrize("predictions, references, fragment", [
    ({1: "a cat"}, {2: ["a cat"]}, "id 1 has a prediction"),
    ({1: "a cat", 2: "a dog"}, {1: ["a cat"]}, "id 2 has a prediction"),
    ({"img9": None}, {"img9": ["a cat"]}, "'img9'"),
    ({"img9": "a cat"}, {"img9": []}, "'img9'"),
    ({"img9": "a cat"}, {"img9": "a cat"}, "'img9'"),
    ({"img9": "a cat"}, {"img9": ["a cat", 5]}, "'img9'"),
    ({}, {}, "no captions"),
])
def test_caption_inputs_are_validated_before_java(predictions, references, fragment):
    with pytest.raises(DataError, match=fragment):
        caption_scores(predictions, references)


def test_missing_java_names_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", os.devnull)
    with pytest.raises(ConfigError, match="Java.*install"):
        cider_per_item({1: "a cat"}, {1: ["a cat"]})


@pytest.fixture(scope="module")
def scorer():
    if shutil.which("java") is None:
        pytest.skip("Java is not installed")
    with CaptionScorer() as shared:
        yield shared


# Image 1 is a bad caption, image 2 a good one; PTB tokenisation lower-cases and drops the ".".
PREDICTIONS = {1: "a cat a cat", 2: "A dog runs on the grass."}
REFERENCES = {1: ["a cat sat on the mat", "the cat is on the mat today"],
              2: ["a dog is running on grass", "the dog runs"]}


def test_bleu_by_hand(scorer):
    result = scorer.score(PREDICTIONS, REFERENCES, per_item=True)
    # Image 1: unigrams a x2, cat x2, each clipped to 1 -> 2/4; length 4, closest ref length 6
    # (|6-4| < |7-4|), so brevity penalty exp(1 - 6/4).
    assert result["per_item"][1]["BLEU-1"] == pytest.approx(2 / 4 * math.exp(1 - 6 / 4))
    # Corpus BLEU sums counts: image 2 matches all 6 unigrams (ref length 6 is closest to 6).
    # Unigrams (2 + 6) / (4 + 6); brevity penalty exp(1 - (6 + 6) / (4 + 6)).
    brevity = math.exp(1 - 12 / 10)
    assert result["BLEU-1"] == pytest.approx(8 / 10 * brevity)
    # Bigrams: image 1 "a cat" (clipped to 1 of 2) of 3; image 2 "a dog", "dog runs" of 5.
    assert result["BLEU-2"] == pytest.approx(math.sqrt(8 / 10 * 3 / 8) * brevity)
    # No trigram matches: only pycocoevalcap's 1e-15 smoothing keeps BLEU-3 above 0.
    assert 0 < result["BLEU-3"] < 1e-4


def rouge_l(precision, recall, beta=1.2):
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def test_rouge_l_by_hand(scorer):
    predictions = dict(PREDICTIONS, quirk="man riding horse on beach")
    references = dict(REFERENCES, quirk=["man riding", "a man is riding a brown horse on the sandy beach"])
    items = scorer.score(predictions, references, per_item=True)["per_item"]
    # Image 1: LCS "a cat" with ref 1 (P 2/4, R 2/6), "cat" with ref 2 (P 1/4, R 1/7).
    assert items[1]["ROUGE-L"] == pytest.approx(rouge_l(2 / 4, 2 / 6))
    # Image 2: LCS "a dog on grass" with ref 1 (P 4/6, R 4/6), "dog runs" with ref 2 (P 2/6, R 2/3).
    assert items[2]["ROUGE-L"] == pytest.approx(rouge_l(4 / 6, 4 / 6))
    # pycocoevalcap takes max precision and max recall separately, maybe from different refs:
    # P 5/5 from ref 2, R 2/2 from ref 1 -> 1.0.
    assert items["quirk"]["ROUGE-L"] == pytest.approx(1.0)


def test_meteor_prefers_a_perfect_match(scorer):
    reference = "a man riding a horse on the beach"
    items = scorer.score({"good": reference, "poor": "a plate of food"},
                         {"good": [reference], "poor": [reference]}, per_item=True)["per_item"]
    assert items["good"]["METEOR"] > 0.9
    assert items["good"]["METEOR"] > items["poor"]["METEOR"]


@needs_java
def test_cider_by_hand():
    # Vocabularies are disjoint across images, so every n-gram has document frequency 1 and
    # weight tf * log(3): a caption equal to a reference has cosine 1 for each n it has.
    result = cider_per_item(
        {"A": "red apple on table", "B": "blue car in street", "C": "two small dogs"},
        {"A": ["red apple on table"], "B": ["blue car in street", "green bus near park"],
         "C": ["two small dogs"]})
    assert result["A"] == pytest.approx(10 * (1 + 1 + 1 + 1) / 4)
    assert result["B"] == pytest.approx(10 * ((1 + 1 + 1 + 1) / 4 + 0) / 2)  # mean over 2 refs
    assert result["C"] == pytest.approx(10 * (1 + 1 + 1 + 0) / 4)            # no 4-grams
    # One image alone: idf = log(1) - log(1) = 0 for every n-gram, so CIDEr is 0.
    assert cider_per_item({"A": "red apple on table"}, {"A": ["red apple on table"]}) == {"A": 0.0}


@needs_java
def test_cider_same_pair_same_score_and_worse_caption_lower():
    refs = ["a dog runs on the grass", "a brown dog running in a field"]
    other = ["a red car parked on the street"]
    references = {1: refs, 2: refs, 3: other}
    same = cider_per_item({1: "a dog running on grass", 2: "a dog running on grass",
                           3: "a car on the street"}, references)
    assert same[1] == pytest.approx(same[2])
    worse = cider_per_item({1: "a dog running on grass", 2: "a plate of food",
                            3: "a car on the street"}, references)
    assert worse[2] < worse[1]


def test_spice_skipped_with_a_reason_and_never_downloaded(scorer, monkeypatch):
    from pycocoevalcap.spice import spice as spice_module

    def no_download():
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(spice_module, "get_stanford_models", no_download)
    monkeypatch.setattr(caption, "_SPICE_JARS", ("absent-corenlp.jar",))
    result = scorer.score(PREDICTIONS, REFERENCES)
    assert "SPICE" not in result
    assert "absent-corenlp.jar" in result["skipped"]["SPICE"]
    assert set(caption.METRIC_KEYS) <= set(result)
    with pytest.raises(ConfigError, match="SPICE"):
        CaptionScorer(spice=True)


def test_spice_result_keys_when_available(scorer, monkeypatch):
    from pycocoevalcap.spice import spice as spice_module

    class FakeSpice:  # stands in for the Java SPICE scorer, which needs the CoreNLP jars
        def compute_score(self, gts, res):
            return 0.25, [{"All": {"f": 0.5}}, {"All": {"f": 0.0}}]

    monkeypatch.setattr(caption, "spice_unavailable_reason", lambda: None)
    monkeypatch.setattr(spice_module, "Spice", FakeSpice)
    result = scorer.score(PREDICTIONS, REFERENCES, per_item=True)
    assert result["SPICE"] == 0.25 and result["skipped"] == {}
    assert result["per_item"][1]["SPICE"] == 0.5 and result["per_item"][2]["SPICE"] == 0.0


def _meteor_children() -> set[int]:
    """Pids of this process's child processes running the METEOR jar (Linux /proc)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmd:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                command = cmd.read()
        except OSError:
            continue
        if parent == os.getpid() and b"meteor" in command.lower():
            pids.add(int(entry))
    return pids


@needs_java
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to list child processes")
def test_caption_scores_one_shot_leaves_no_java_process():
    before = _meteor_children()
    result = caption_scores(PREDICTIONS, REFERENCES, spice=False)
    assert set(caption.METRIC_KEYS) <= set(result)
    assert result["skipped"] == {"SPICE": "not requested (spice=False)"}
    assert _meteor_children() == before


# -- scene grounding ------------------------------------------------------------------------------
def test_caption_grounding_against_hand_counts():
    from earlyexit.metrics.grounding import blind_baseline, caption_grounding

    scenes = {"a": [{"shape": "circle", "color": "red"}, {"shape": "cross", "color": "red"}],
              "b": [{"shape": "star", "color": "blue"}]}
    captions = {"a": "two red crosses and a blue circle",  # red, blue: 1 of 2; cross, circle: 2 of 2; two: true
                "b": "a picture with three shapes"}  # no colour or shape; three: false
    result = caption_grounding(captions, scenes)
    assert result["color"] == {"mention_rate": 0.5, "precision": 0.5}
    assert result["shape"] == {"mention_rate": 0.5, "precision": 1.0}
    assert result["number"] == {"mention_rate": 1.0, "precision": 0.5}
    assert caption_grounding({"b": "a shape"}, scenes)["shape"]["precision"] is None
    blind = blind_baseline(["a red star", "a red circle and a blue star", "two red shapes"], scenes)
    assert blind["color"] == {"guess": "red", "precision": 0.5}
    assert blind["shape"] == {"guess": "star", "precision": 0.5}
    assert blind["number"] == {"guess": "two", "precision": 0.5}  # scene a: two objects, two red ones
