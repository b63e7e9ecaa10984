"""The `instructblip-flant5` backend: InstructBLIP's image side (a Q-Former that reads the instruction)
with a T5 encoder–decoder, through the engine. Exits off give transformers' own tokens (greedy and
beams, padded batches, two shapes); the instruction reaches the Q-Former; every decoder cache slot
holds what one full forward holds; trained exits run and stay with their family; saved models
reload to the same generations; the CLI and the loader behave."""

import json

import pytest
import torch
from transformers import LogitsProcessorList

from earlyexit.adapters import load_exits, save_exits
from earlyexit.backends.blip2_flant5 import Blip2FlanT5Backend
from earlyexit.backends.instructblip_flant5 import InstructBlipFlanT5Backend
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.engine import EarlyExitForCausalLM
from earlyexit.errors import CheckpointError, ConfigError, ModelNotAvailableError
from earlyexit.exit_training import train_exits
from helpers import assert_decoder_cache_matches_full_forward, fed_decoder_ids, make_images, new_tokens, no_eos

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


def fixed(registry, backend, layer, every):
    cls = registry.strategy("fixed")
    return cls(backend, [layer], cls.Config(every=every))


# -- exits off ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_beams", [1, 5])
def test_exits_off_gives_transformers_own_tokens(registry, shape, num_beams):
    backend = tiny(seed=3, **shape)
    inputs = backend.prepare_inputs(make_images(3, seed=4), PROMPTS)
    assert (inputs["attention_mask"] == 0).any() and (inputs["qformer_attention_mask"] == 0).any(), \
        "the batch should need padding, in the prompt and in the instruction the Q-Former reads"
    settings = dict(max_new_tokens=10, num_beams=num_beams, do_sample=False)
    own = backend.model.generate(**inputs, **settings)  # transformers: decoder start token, then the new tokens
    assert (own[:, 0] == backend.text_config.decoder_start_token_id).all()
    assert len({tuple(row) for row in own[:, 1:].tolist()}) > 1

    sequences = EarlyExitForCausalLM(backend).generate(**inputs, **settings)
    assert torch.equal(sequences[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])  # every family's layout
    assert torch.equal(new_tokens(sequences, inputs), own[:, 1:])
    assert torch.equal(backend.plain_generate(**inputs, **settings), sequences)
    # a threshold no exit can reach: exits are consulted but never taken
    cls = registry.strategy("confidence")
    model = EarlyExitForCausalLM(backend, cls(backend, [1], cls.Config(threshold=1.5)))
    assert torch.equal(model.generate(**inputs, **settings), sequences)
    layers = model.last_trace.exit_layers
    assert ((layers == backend.num_layers) | (layers == -1)).all() and (layers == backend.num_layers).any()


# -- the instruction reaches the Q-Former; both copies of the prompt are padded on the right ---------
def test_the_instruction_reaches_the_q_former(t5_6, batch3):
    asked = t5_6.prepare_inputs(make_images(3, seed=2)[:1] * 2, ["a red circle", "how many shapes"])
    two, _ = t5_6.image_features(asked["pixel_values"], **t5_6.vision_inputs(asked))
    assert (two[0] - two[1]).abs().max() > 1e-2, "another instruction should give other features for the same image"

    # the language model's prompt kept, only the Q-Former's instructions swapped between rows
    swapped = {**batch3, "qformer_input_ids": batch3["qformer_input_ids"].flip(0),
               "qformer_attention_mask": batch3["qformer_attention_mask"].flip(0)}
    settings = dict(max_new_tokens=8, do_sample=False, **no_eos(t5_6))
    original = EarlyExitForCausalLM(t5_6).generate(**batch3, **settings)
    changed = EarlyExitForCausalLM(t5_6).generate(**swapped, **settings)
    assert not torch.equal(new_tokens(changed, batch3), new_tokens(original, batch3))
    assert torch.equal(changed, t5_6.plain_generate(**swapped, **settings))

    without = {k: v for k, v in batch3.items() if not k.startswith("qformer_")}
    with pytest.raises(ConfigError, match="reads the instruction"):
        EarlyExitForCausalLM(t5_6).generate(**without, max_new_tokens=2)


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


def test_catchup_cache_equals_one_full_forward_under_beam_search(registry, t5_6, batch3):
    from test_kv_policies import CacheSnapshots

    model = EarlyExitForCausalLM(t5_6, fixed(registry, t5_6, 3, 2), kv_policy="catchup")
    cache = model.new_cache()
    snapshots = CacheSnapshots(cache)
    model.generate(**batch3, max_new_tokens=6, num_beams=3, do_sample=False, cache=cache,
                   logits_processor=LogitsProcessorList([snapshots]), **no_eos(t5_6))
    assert (model.last_trace.exit_layers == 3).any()
    for running, snapshot in snapshots.snapshots[1:]:  # running: the decoder ids, beams in cache row order
        assert_decoder_cache_matches_full_forward(snapshot, t5_6, batch3, running)


# -- trained exits and adapters -------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=SceneConfig(train=12, val=10, test=5),
                       cache_dir=tmp_path_factory.mktemp("scenes"))


T5_64 = dict(num_layers=4, hidden_size=32, num_heads=4, image_size=64, patch_size=16)


def test_free_trains_generates_and_its_adapter_stays_with_its_family(registry, scenes, tmp_path):
    backend = tiny(seed=21, **T5_64)
    backbone = {n: p.detach().clone() for n, p in backend.model.state_dict().items()}
    cls = registry.strategy("free")
    strategy = cls(backend, [1, 2], cls.Config(epochs=1, batch_size=4, learning_rate=1e-3, threshold=0.03))
    before = {n: p.detach().clone() for n, p in strategy.exit_modules().state_dict().items()}
    losses = train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False)
    assert losses and all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in losses)
    after = strategy.exit_modules().state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before), "training should move the exits"
    assert all(torch.equal(backbone[n], t) for n, t in backend.model.state_dict().items())  # frozen backbone

    inputs = backend.prepare_inputs(make_images(2, size=64), ["", "a red"])
    settings = dict(max_new_tokens=6, do_sample=False, **no_eos(backend))
    model = EarlyExitForCausalLM(backend, strategy)
    expected = model.generate(**inputs, **settings)
    expected_layers = model.last_trace.exit_layers
    assert (expected_layers[:, 1:] < backend.num_layers).any(), "some token should leave early"

    save_exits(strategy, str(tmp_path / "exits"), backbone_name="micro")
    reloaded = load_exits(str(tmp_path / "exits"), tiny(seed=21, **T5_64), registry)
    model = EarlyExitForCausalLM(reloaded.backend, reloaded)
    assert torch.equal(model.generate(**inputs, **settings), expected)
    assert torch.equal(model.last_trace.exit_layers, expected_layers)
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


def test_loading_refuses_another_family_and_an_unreachable_hub_in_one_line(registry, tmp_path, monkeypatch):
    cls = registry.backend("instructblip-flant5")
    registry.backend("instructblip-vicuna").from_tiny_config(seed=5, num_layers=1).save_pretrained(
        str(tmp_path / "vicuna"))
    with pytest.raises(ConfigError, match="instructblip/llama model, not InstructBLIP with a FlanT5"):
        cls.load(str(tmp_path / "vicuna"))
    with pytest.raises(ConfigError, match="tiny-random"):  # the embedded `tiny` is BLIP-2 with OPT
        cls.load("tiny")
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


def test_list_names_the_family(capsys, monkeypatch):
    from earlyexit.cli import main

    monkeypatch.setenv("EARLYEXIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert main(["list", "--json"]) == 0
    entry = next(e for e in json.loads(capsys.readouterr().out) if e["name"] == "instructblip-flant5")
    assert entry["kind"] == "backend" and "InstructBLIP" in entry["description"] and "FlanT5" in entry["description"]
