"""The `instructblip-flant5` backend: InstructBLIP's image side (a Q-Former that reads the instruction)
with a T5 encoder–decoder, through the engine. Exits off give transformers' own tokens (greedy and
beams, padded batches, two shapes); the instruction reaches the Q-Former; every decoder cache slot
holds what one full forward holds; trained exits run and stay with their family; saved models
reload to the same generations; the CLI and the loader behave."""

import json

import pytest
import torch
from helpers import (assert_decoder_cache_matches_full_forward, assert_encoder_decoder_exits_off_match_transformers,
                     assert_teacher_forcing_gives_the_models_own_loss, assert_the_instruction_reaches_the_q_former,
                     fed_decoder_ids, fixed, make_images, new_tokens, no_eos, train_exits_then_reload)

from earlyexit.backends.blip2_flant5 import Blip2FlanT5Backend
from earlyexit.backends.instructblip_flant5 import InstructBlipFlanT5Backend
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.errors import CheckpointError, ConfigError, ModelNotAvailableError
from earlyexit.models.adapters import load_exits
from earlyexit.models.loading import load_backend
from earlyexit.training.batching import TrainingBatches

PROMPTS = ["a red circle", "what color is the small square on the left", ""]  # three lengths: padding
SHAPES = {  # FlanT5's kind (gated-gelu, untied head) and original T5's (relu, tied head scaled by d_model**-0.5)
    "flant5": dict(num_layers=3, hidden_size=32, num_heads=4),
    "t5-tied": dict(num_layers=2, hidden_size=48, num_heads=6, d_kv=12, d_ff=80, feed_forward_proj="relu",
                    tie_word_embeddings=True, init_factor=3.0, num_query_tokens=6, qformer_layers=2),
}


def tiny(**shape):
    return InstructBlipFlanT5Backend.from_tiny_config(**shape)


@pytest.fixture(scope="module")
def t5_6():
    """Six decoder layers in float64 (cache comparisons then show the engine's arithmetic is the full
    model's); a Q-Former initialised wide enough that the instruction visibly changes what it reads."""
    backend = tiny(seed=1, num_layers=6, hidden_size=32, num_heads=4, encoder_init_std=0.1)
    backend.model.to(torch.float64)
    return backend


@pytest.fixture
def batch3(t5_6):
    return t5_6.prepare_inputs(make_images(3, seed=2), PROMPTS)


# -- exits off ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_beams", [1, 5])
def test_exits_off_gives_transformers_own_tokens(registry, shape, num_beams):
    backend = tiny(seed=3, **shape)
    inputs = backend.prepare_inputs(make_images(3, seed=4), PROMPTS)
    assert (inputs["attention_mask"] == 0).any() and (inputs["qformer_attention_mask"] == 0).any(), \
        "the batch should need padding, in the prompt and in the instruction the Q-Former reads"
    settings = dict(max_new_tokens=10, num_beams=num_beams, do_sample=False)
    assert_encoder_decoder_exits_off_match_transformers(registry, backend, inputs, settings)


# -- the instruction reaches the Q-Former; both copies of the prompt are padded on the right ---------
def test_the_instruction_reaches_the_q_former(t5_6, batch3):
    assert_the_instruction_reaches_the_q_former(t5_6, batch3, make_images(3, seed=2)[0])


def test_rows_are_padded_on_the_right_and_generate_alone_what_they_do_in_the_batch(registry, t5_6, batch3):
    tokenizer = t5_6.processor.tokenizer
    for mask in (batch3["attention_mask"], batch3["qformer_attention_mask"]):  # ones, then zeros
        assert torch.equal(mask, mask.sort(1, descending=True).values) and not mask[:, -1].all()
    assert t5_6.prompt_ids(PROMPTS[1]) == batch3["input_ids"][1].tolist()
    assert batch3["input_ids"][1, -1] == tokenizer.eos_token_id  # T5's tokenizer ends the text with </s>
    model = EarlyExitForCausalLM(t5_6, fixed(registry, t5_6, 2, 2))
    settings = dict(max_new_tokens=6, do_sample=False, **no_eos(t5_6))
    batch = new_tokens(model.generate(**batch3, **settings), batch3)
    for r in range(3):
        keep, ask = batch3["attention_mask"][r].bool(), batch3["qformer_attention_mask"][r].bool()
        one = {"pixel_values": batch3["pixel_values"][r:r + 1], "input_ids": batch3["input_ids"][r:r + 1, keep],
               "attention_mask": batch3["attention_mask"][r:r + 1, keep],
               "qformer_input_ids": batch3["qformer_input_ids"][r:r + 1, ask],
               "qformer_attention_mask": batch3["qformer_attention_mask"][r:r + 1, ask]}
        assert torch.equal(new_tokens(model.generate(**one, **settings), one)[0], batch[r])


# -- caches ---------------------------------------------------------------------------------------
def test_catchup_cache_equals_one_full_forward(registry, t5_6, batch3):
    model = EarlyExitForCausalLM(t5_6, fixed(registry, t5_6, 2, 2), kv_policy="catchup")
    sequences = model.generate(**batch3, max_new_tokens=9, do_sample=False, **no_eos(t5_6))
    layers = model.last_trace.exit_layers
    assert (layers == 2).any() and (layers == 6).any()
    assert sum(r.catchup_positions for r in model.last_trace.steps) > 0
    ids = fed_decoder_ids(t5_6, sequences, batch3)
    assert assert_decoder_cache_matches_full_forward(model.last_cache, t5_6, batch3, ids) > 0  # deep layers lag


# -- trained exits and adapters -------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=SceneConfig(train=12, val=10, test=5),
                       cache_dir=tmp_path_factory.mktemp("scenes"))


def test_training_batches_carry_the_instruction_and_teacher_forcing_gives_the_models_loss(t5_6, batch3, scenes):
    batches = TrainingBatches(t5_6, [scenes], batch_size=3)
    batch = batches.collate([batches.encode(prompt, "circle") for prompt in PROMPTS], batch3["pixel_values"], PROMPTS)
    for name in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
        assert torch.equal(batch[name], batch3[name])  # the encoder's prompt and the Q-Former's, as generation's
    assert_teacher_forcing_gives_the_models_own_loss(t5_6, batch)


T5_64 = dict(num_layers=4, hidden_size=32, num_heads=4, image_size=64, patch_size=16)


def test_free_trains_generates_and_its_adapter_stays_with_its_family(registry, scenes, tmp_path):
    train_exits_then_reload(registry, lambda: tiny(seed=21, **T5_64), "free", {"threshold": 0.03}, scenes, tmp_path)
    # the same T5 under BLIP-2's image side is another backbone
    blip2 = Blip2FlanT5Backend.from_tiny_config(seed=21, **T5_64)
    with pytest.raises(CheckpointError, match="backend 'instructblip-flant5', not 'blip2-flant5'"):
        load_exits(str(tmp_path / "exits"), blip2, registry)


# -- loading and the CLI --------------------------------------------------------------------------
def test_save_pretrained_round_trip_gives_identical_generations(registry, t5_6, batch3, tmp_path):
    folder = tmp_path / "instructblip-flant5"
    t5_6.save_pretrained(str(folder))
    loaded = registry.backend("instructblip-flant5").from_pretrained(str(folder), dtype="float64")  # as saved
    saved = t5_6.model.state_dict()
    assert all(torch.equal(saved[n], t) for n, t in loaded.model.state_dict().items()) and len(saved) > 100
    assert loaded.processor.tokenizer.padding_side == "right"
    inputs = loaded.prepare_inputs(make_images(3, seed=2), PROMPTS)
    assert set(inputs) == set(batch3) and all(torch.equal(inputs[k], batch3[k]) for k in batch3)
    for num_beams in (1, 3):
        settings = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False)
        assert torch.equal(loaded.plain_generate(**inputs, **settings), t5_6.plain_generate(**batch3, **settings))
    expected = EarlyExitForCausalLM(t5_6, fixed(registry, t5_6, 2, 2)).generate(**batch3, max_new_tokens=8)
    assert torch.equal(EarlyExitForCausalLM(loaded, fixed(registry, loaded, 2, 2)).generate(**inputs, max_new_tokens=8),
                       expected)
    # a language model tokenizer whose config names no side (the processor then applies the Q-Former's own)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "padding_side"}))
    loaded = registry.backend("instructblip-flant5").load(str(folder))
    inputs = loaded.prepare_inputs(make_images(3, seed=2), PROMPTS)
    assert all(torch.equal(inputs[k], batch3[k]) for k in batch3 if k != "pixel_values")


def test_loading_refuses_another_family_and_an_unreachable_hub_in_one_line(registry, tmp_path, monkeypatch):
    cls = registry.backend("instructblip-flant5")
    registry.backend("instructblip-vicuna").from_tiny_config(seed=5, num_layers=1).save_pretrained(
        str(tmp_path / "vicuna"))
    with pytest.raises(ConfigError, match="instructblip/llama model, not InstructBLIP with a FlanT5"):
        cls.load(str(tmp_path / "vicuna"))
    with pytest.raises(ConfigError, match="tiny-random"):  # the embedded `tiny` is BLIP-2 with OPT
        load_backend(cls, "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotAvailableError, match="not available offline") as unavailable:
        cls.load("Salesforce/instructblip-flan-t5-xl")
    assert "\n" not in str(unavailable.value)


def test_cli_generate_on_tiny_random_gives_the_engines_tokens(registry, tmp_path, capsys):
    from earlyexit.cli import main

    image = make_images(1, seed=6)[0]
    image.save(tmp_path / "image.png")
    assert main(["generate", "--backend", "instructblip-flant5", "--model", "tiny-random", "--image",
                 str(tmp_path / "image.png"), "--prompt", "a red", "--max-new-tokens", "4", "--num-beams", "2",
                 "--strategy", "fixed", "--exit-layers", "3", "--option", "every=2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    backend = InstructBlipFlanT5Backend.load("tiny-random")
    inputs = backend.prepare_inputs([image], ["a red"])
    expected = EarlyExitForCausalLM(backend, fixed(registry, backend, 3, 2)).generate(
        **inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    assert result["num_layers"] == 12 and len(result["token_ids"]) >= 3
    assert result["token_ids"] == new_tokens(expected, inputs)[0].tolist()[:len(result["token_ids"])]
    assert result["exit_layers"][:3] == [12, 12, 3]  # the first token comes from the full-depth prompt pass
