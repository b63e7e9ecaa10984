"""VisDial options in chunks: the same scores and ranks as all 100 rows in one batch with the image
given to every row (the old way), one image encoding per round, chunk sizes from a K/V budget."""

import pathlib

import pytest
import torch
from helpers import make_backend
from transformers import LogitsProcessorList

import earlyexit.evaluation.dialog as dialog
from earlyexit.core.engine import EarlyExitForCausalLM, cache_bytes_per_row
from earlyexit.data.prompts import dialog_prompt
from earlyexit.data.visdial import load_visdial
from earlyexit.errors import ConfigError
from earlyexit.evaluation.dialog import ForcedOptions, option_rows, option_scores
from earlyexit.metrics.dialog import rank_of_ground_truth

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "visdial"


@pytest.fixture(scope="module")
def backend():
    return make_backend(seed=21, num_layers=4, words=["yes", "no", "dog", "white", "two", "it", "is", "sunny", "a",
                                                      "on", "lawn", "photo", "how", "many", "people", "what"])


@pytest.fixture(scope="module")
def round1():
    sample = load_visdial(FIXTURES / "visdial_1.0_val.json", FIXTURES / "VisualDialog_val2018", "val")[1]
    assert len(sample.extra["options"]) == 100
    return sample


def all_rows_at_once(generate, backend, image, prompt, options):
    """The old way: every option a row of one batch, each with its own copy of the image."""
    tokenizer, eos = backend.processor.tokenizer, backend.language_model.generation_config.eos_token_id
    sequences = [tokenizer(" " + o, add_special_tokens=False)["input_ids"] + [eos] for o in options]
    inputs = backend.prepare_inputs([image] * len(options), [prompt] * len(options))
    forcing = ForcedOptions(sequences, filler=eos)
    with torch.no_grad():
        generate(**inputs, max_new_tokens=int(forcing.lengths.max()), do_sample=False, num_beams=1,
                 logits_processor=LogitsProcessorList([forcing]))
    return forcing.mean_log_probability()


@pytest.mark.parametrize("exits", [False, True])
def test_chunks_give_the_scores_and_ranks_of_one_batch(registry, backend, round1, exits):
    strategy = None
    if exits:
        cls = registry.strategy("confidence")
        strategy = cls(backend, [1, 2], cls.Config(threshold=0.2))
    model = EarlyExitForCausalLM(backend, strategy)
    image, prompt, options = round1.load_image(), dialog_prompt(round1), round1.extra["options"]
    reference = all_rows_at_once(model.generate, backend, image, prompt, options)
    truth = round1.extra["gt_index"]
    for rows in (7, 20, 100):
        scores, work = option_scores(model.generate, backend, image, prompt, options, rows=rows)
        assert scores == pytest.approx(reference, abs=1e-5) and work["rows"] == 100
        assert rank_of_ground_truth(scores, truth) == rank_of_ground_truth(reference, truth)
    if exits:  # the exits were taken: the scores are not the full model's
        full = all_rows_at_once(EarlyExitForCausalLM(backend, None).generate, backend, image, prompt, options)
        assert max(abs(a - b) for a, b in zip(reference, full)) > 1e-3


def test_a_round_encodes_its_image_once_and_generates_in_chunks(backend, round1, monkeypatch):
    encoded, preprocessed, chunks = [], [], []
    image_features, prepare_inputs = backend.image_features, backend.prepare_inputs
    monkeypatch.setattr(backend, "image_features", lambda pixels, *a, **k: encoded.append(len(pixels))
                        or image_features(pixels, *a, **k))
    monkeypatch.setattr(backend, "prepare_inputs", lambda images, *a: preprocessed.append(len(images))
                        or prepare_inputs(images, *a))
    model = EarlyExitForCausalLM(backend, None)

    def generate(**kwargs):
        chunks.append(kwargs["inputs_embeds"].shape[0])
        assert "pixel_values" not in kwargs  # the rows share the encoded prompt
        return model.generate(**kwargs)

    options = round1.extra["options"]
    option_scores(generate, backend, round1.load_image(), dialog_prompt(round1), options, rows=30)
    assert encoded == [1] and preprocessed == [1] and chunks == [30, 30, 30, 10]
    # the backbone's own language model reads the same embeddings (the full side of `measure_wall`)
    scores, _ = option_scores(backend.language_model.generate, backend, round1.load_image(), dialog_prompt(round1),
                              options[:5], rows=2)
    assert scores == pytest.approx(all_rows_at_once(model.generate, backend, round1.load_image(),
                                                    dialog_prompt(round1), options[:5]), abs=1e-5)


def test_chunk_rows_follow_the_kv_budget(backend, monkeypatch):
    assert option_rows(backend, 90) == dialog.OPTION_ROWS == 20
    per_row = cache_bytes_per_row(backend, 90, backend.num_layers)
    monkeypatch.setattr(dialog, "OPTION_KV_BYTES", 7 * per_row + 1)
    assert option_rows(backend, 90) == 7
    monkeypatch.setattr(dialog, "OPTION_KV_BYTES", per_row // 2)
    assert option_rows(backend, 90) == 1  # never fewer than one row
    assert option_rows(backend, 90, rows=50) == 50
    with pytest.raises(ConfigError, match="at least one row"):
        option_rows(backend, 90, rows=0)
