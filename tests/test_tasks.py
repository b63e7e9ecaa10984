"""The task as a registered object: lookup and its one-line error, each task's prompt, target,
references, scores and main metric on hand-built samples, what ranking refuses, and the
evaluation loop's gather across processes."""

import numpy as np
import pytest

import earlyexit.data
from earlyexit.bench.figures import _main_metric
from earlyexit.core.speculative import SpeculativeStats
from earlyexit.data import Dataset, Sample
from earlyexit.data.prompts import dialog_prompt, prompt_for, target_for
from earlyexit.data.tasks import RANKING_TAKES_NO_EXIT_VOCABULARY, TASKS, Task, task_of
from earlyexit.errors import ConfigError
from earlyexit.evaluation.calibrate import main_metric
from earlyexit.evaluation.loop import Share, empty_sides
from earlyexit.metrics.caption import cider_per_item


def no_image():
    raise AssertionError("no image is needed")


CAPTIONED = Sample("c1", no_image, captions=["a red circle", "one red circle", "a circle"])
OTHER = Sample("c2", no_image, captions=["two blue squares", "blue squares"])
QUESTION = Sample("q1", no_image, question="what color is it?", answers=["red", "red", "blue", "red", "blue"])
ROUND = Sample("d1", no_image, question="is it sunny?", answers=["yes"],
               extra={"caption": "a dog on a lawn.", "history": [("how many dogs?", "one"), ("is it white?", "yes")],
                      "options": ["yes", "no it is raining today", "maybe"], "gt_index": 0})


def dataset(task, *samples, split="val"):
    return Dataset("hand", task, split, list(samples))


class WordTokenizer:
    """One token per word (and none for special tokens): prompts' lengths by hand."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split())))}


class ShortContext:
    """What `fitting_prompt` reads of a backend: a tokenizer, a context length, image tokens."""

    def __init__(self, positions, image_tokens=2):
        self.processor = type("Processor", (), {"tokenizer": WordTokenizer()})()
        self.text_config = type("TextConfig", (), {"max_position_embeddings": positions})()
        self.model = type("Model", (), {"config": type("Config", (), {"num_query_tokens": image_tokens})()})()


def test_every_task_name_is_registered_once_and_found_by_name_data_set_or_itself():
    assert tuple(TASKS) == earlyexit.data.TASKS  # the names `Dataset.task` may hold
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name
        assert task_of(name) is task and task_of(dataset(name)) is task and task_of(task) is task


def test_an_unknown_task_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        task_of("captioning")
    assert str(caught.value) == "unknown task 'captioning'; known tasks: caption, vqa, dialog"
    with pytest.raises(ConfigError) as caught:
        task_of(dataset("ranking"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data set hand: unknown task 'ranking'")
    assert "caption, vqa, dialog" in message


def test_captioning_reads_nothing_and_writes_a_reference():
    task = task_of("caption")
    assert task.prompt(CAPTIONED) == "" and task.prompt(CAPTIONED, ShortContext(4), room=3) == ""
    assert task.target(CAPTIONED) == "a red circle"
    drawn = {task.target(CAPTIONED, np.random.default_rng(seed)) for seed in range(20)}
    assert drawn == set(CAPTIONED.captions)
    assert task.outputs == "captions" and not task.ranks and not task.needs_answers
    assert (task.main_metric, task.table_metric) == ("CIDEr", "CIDEr")
    items = task.training_items(dataset("caption", CAPTIONED, OTHER))
    assert [s.captions for s in items] == [[c] for c in CAPTIONED.captions + OTHER.captions]
    task.check(dataset("caption", Sample("x", no_image), split="test"))  # nothing to refuse


def test_quick_caption_scores_are_the_mean_cider_of_the_predicted_samples():
    data = dataset("caption", CAPTIONED, OTHER, Sample("unscored", no_image, captions=["a green star"]))
    predictions = {"c1": "a red circle", "c2": "blue squares"}
    per_item = cider_per_item(predictions, {"c1": CAPTIONED.captions, "c2": OTHER.captions})
    assert task_of("caption").score(data, predictions, quick=True) == {"CIDEr": sum(per_item.values()) / 2}


def test_vqa_asks_the_question_and_writes_the_most_frequent_answer():
    task = task_of("vqa")
    assert task.prompt(QUESTION) == "Question: what color is it? Answer:"
    assert task.target(QUESTION) == "red" == task.target(QUESTION, np.random.default_rng(0))
    assert task.outputs == "answers" and not task.ranks and task.needs_answers
    assert (task.main_metric, task.table_metric) == ("overall", "accuracy")
    quality = task.score(dataset("vqa", QUESTION), {"q1": "red"})
    # VQA accuracy: min(1, matches among the other answers / 3), averaged over leaving each answer out
    assert quality["overall"] == pytest.approx(100 * (3 * 2 / 3 + 2 * 1) / 5) and quality["num_questions"] == 1
    with pytest.raises(ConfigError, match="^hand/test has no answers to score against; pick a split with annotations$"):
        task.check(dataset("vqa", QUESTION, Sample("q2", no_image, question="why?"), split="test"))


def test_a_dialog_round_keeps_the_history_that_fits_beside_its_longest_option():
    task = task_of("dialog")
    assert task.prompt(ROUND) == dialog_prompt(ROUND)  # no backend: all of the history
    full = dialog_prompt(ROUND)
    words = len(full.split())
    # room for the whole prompt beside 1 + 5 tokens ("no it is raining today" and EOS), two image tokens
    assert task.prompt(ROUND, ShortContext(2 + words + 6), beside=ROUND.extra["options"]) == full
    assert task.prompt(ROUND, ShortContext(2 + words + 5), beside=ROUND.extra["options"]) == dialog_prompt(ROUND, 1)
    assert task.prompt(ROUND, ShortContext(2 + words + 3), room=3) == full  # `room` tokens when nothing is beside
    with pytest.raises(ConfigError, match="do not fit the model's context of 4 positions"):
        task.prompt(ROUND, ShortContext(4), beside=ROUND.extra["options"])
    assert task.target(ROUND) == "yes" and task.outputs == "answers"


def test_dialog_is_ranked_and_scored_by_the_ground_truths_ranks():
    task = task_of("dialog")
    assert task.ranks and (task.main_metric, task.table_metric) == ("MRR", "MRR")
    rounds = [ROUND, Sample("d2", no_image, extra={"gt_index": 1}), Sample("d3", no_image, extra={"gt_index": 2})]
    quality = task.score(dataset("dialog", *rounds), {"d1": 1, "d2": 2, "d3": 20})
    assert quality["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 20) / 3) and quality["R@1"] == pytest.approx(1 / 3)
    assert quality["R@10"] == pytest.approx(2 / 3) and quality["mean_rank"] == pytest.approx(23 / 3)
    assert quality["rounds"] == 3 and "ties last" in quality["scoring"]


@pytest.mark.parametrize("split, decode, beams, message", [
    ("test", "early-exit", 1, "hand/test has no ground-truth answers to rank against; use --split val"),
    ("val", "speculative", 1, "VisDial is scored by ranking answer options, not by decoding; drop --decode speculative"),
    ("val", "early-exit", 2, "VisDial is scored by ranking answer options, not by beam search; drop --num-beams"),
])
def test_ranking_refuses_what_it_cannot_do_in_one_line(split, decode, beams, message):
    unranked = Sample("d9", no_image, extra={"gt_index": None})
    rounds = [ROUND] + ([unranked] if split == "test" else [])
    with pytest.raises(ConfigError) as caught:
        task_of("dialog").check(dataset("dialog", *rounds, split=split), decode, beams)
    assert str(caught.value) == message


def test_generating_tasks_leave_decoding_to_the_decoders_and_take_an_exit_vocabulary():
    for name in ("caption", "vqa"):
        TASKS[name].check(dataset(name, CAPTIONED if name == "caption" else QUESTION), "speculative", 4)
        TASKS[name].refuse_exit_vocabulary()


def test_only_ranking_refuses_an_exit_vocabulary_with_the_one_message():
    with pytest.raises(ConfigError) as caught:
        task_of("dialog").refuse_exit_vocabulary()
    assert str(caught.value) == RANKING_TAKES_NO_EXIT_VOCABULARY
    assert RANKING_TAKES_NO_EXIT_VOCABULARY.startswith("--exit-vocabulary restricts generated tokens; VisDial ranks")


def test_main_metrics_of_calibration_and_of_figures_keep_their_names():
    assert [main_metric(name) for name in TASKS] == ["CIDEr", "overall", "MRR"]  # quality keys
    assert [_main_metric({"task": name}) for name in TASKS] == ["CIDEr", "accuracy", "MRR"]  # table names


@pytest.mark.parametrize("sample, name", [(CAPTIONED, "caption"), (QUESTION, "vqa"), (ROUND, "dialog")])
def test_name_keyed_builders_agree_with_the_tasks(sample, name):
    rng = (np.random.default_rng(3), np.random.default_rng(3))
    assert prompt_for(sample, name) == TASKS[name].prompt(sample)
    assert target_for(sample, name, rng[0]) == TASKS[name].target(sample, rng[1])


def test_shares_of_several_processes_merge_in_rank_order_each_counted_once():
    shares = []
    for rank in range(2):
        share = Share({"predictions": {f"s{rank}": f"text {rank}"}}, traces=[f"trace {rank}"],
                      records=[f"record {rank}"], stats=SpeculativeStats(rounds=2 + rank, drafted=4, accepted=3,
                                                                          tokens=5))
        share.sides["early"].update(seconds=1.5, prompt_seconds=0.5, tokens=10 + rank, rows=2)
        shares.append(share)
    merged = Share.merged(shares)
    assert merged.columns == {"predictions": {"s0": "text 0", "s1": "text 1"}}
    assert merged.traces == ["trace 0", "trace 1"] and merged.records == ["record 0", "record 1"]
    assert (merged.stats.rounds, merged.stats.drafted, merged.stats.accepted, merged.stats.tokens) == (5, 8, 6, 10)
    assert merged.sides == {**empty_sides(), "early": {"seconds": 3.0, "prompt_seconds": 1.0, "tokens": 21, "rows": 4}}
    assert Share.merged([Share({"ranks": {"d": 1}})]).stats is None  # nothing speculative: no stats
