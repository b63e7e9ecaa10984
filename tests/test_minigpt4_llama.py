"""The `minigpt4-llama` backend: the composed MiniGPT-4 (BLIP-2 image side, projection, Llama)
through the engine. Exits off give the composed model's own tokens; the caches hold what one full
forward holds (RoPE on keys, grouped-query heads); trained exits run and are bound to their family;
projection checkpoints are read tensors-only; saved models reload to the same generations."""

import json

import pytest
import torch
from helpers import (assert_cache_matches_full_forward, assert_catchup_cache_is_one_full_forward_under_beams,
                     assert_catchup_gqa_cache_is_one_full_forward, assert_exit_slots_match_running_the_modules,
                     assert_propagate_projects_rotated_grouped_kv, assert_vocabulary_readout_is_those_columns,
                     fixed_exit, make_backend, make_images, no_eos, train_exits_then_reload)

from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.errors import CheckpointError, ConfigError, ModelNotAvailableError
from earlyexit.models.adapters import load_exits, save_exits
from earlyexit.training.batching import TrainingBatches

PROMPTS = ["a red circle", "what color is the small square on the left", ""]  # three lengths: left padding
SHAPES = {
    "mha": dict(num_layers=3, hidden_size=32, num_heads=4),
    "gqa": dict(num_layers=4, hidden_size=48, num_heads=6, num_kv_heads=2, num_query_tokens=6),
    "mqa": dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1, intermediate_size=96),
}


def tiny(**shape):
    return Minigpt4LlamaBackend.from_tiny_config(**shape)


@pytest.fixture(scope="module")
def gqa6():
    """Six layers with grouped-query attention (4 query heads share 2 key/value heads)."""
    return tiny(seed=1, num_layers=6, hidden_size=32, num_heads=4, num_kv_heads=2)


@pytest.fixture
def batch3(gqa6):
    return gqa6.prepare_inputs(make_images(3, seed=2), PROMPTS)


# -- exits off ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_beams", [1, 5])
def test_exits_off_gives_the_composed_models_own_tokens(registry, shape, num_beams):
    backend = tiny(seed=3, **shape)
    inputs = backend.prepare_inputs(make_images(3, seed=4), PROMPTS)
    assert (inputs["attention_mask"] == 0).any(), "the batch should need left padding"
    settings = dict(max_new_tokens=10, num_beams=num_beams, do_sample=False)
    expected = backend.plain_generate(**inputs, **settings)
    assert len({tuple(row) for row in expected[:, inputs["input_ids"].shape[1]:].tolist()}) > 1

    assert torch.equal(EarlyExitForCausalLM(backend).generate(**inputs, **settings), expected)
    # a threshold no exit can reach: exits are consulted but never taken
    cls = registry.strategy("confidence")
    model = EarlyExitForCausalLM(backend, cls(backend, [1], cls.Config(threshold=1.5)))
    assert torch.equal(model.generate(**inputs, **settings), expected)
    layers = model.last_trace.exit_layers
    assert ((layers == backend.num_layers) | (layers == -1)).all()


def test_the_prompt_follows_minigpt4s_template(gqa6):
    inputs = gqa6.prepare_inputs(make_images(2), ["two", "a red circle"])
    tokenizer, config = gqa6.processor.tokenizer, gqa6.model.config
    row = inputs["input_ids"][1]
    assert (row == config.image_token_id).sum() == config.num_query_tokens
    text = tokenizer.decode(row[row != config.image_token_id], skip_special_tokens=True)
    assert text.split() == "# # # human : < img > < / img > a red circle # # # assistant :".split()
    # every row ends at the same column (left padding) and training encodes the same prompt
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][0, 0]
    prompt = gqa6.prompt_ids("a red circle")
    assert prompt == row[inputs["attention_mask"][1].bool()].tolist()
    with pytest.raises(ConfigError, match="may not contain <ImageHere>"):
        gqa6.prepare_inputs(make_images(1), ["look <ImageHere>"])


# -- caches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("every", [2, 3])
def test_catchup_cache_equals_one_full_forward(registry, gqa6, batch3, every):
    assert_catchup_gqa_cache_is_one_full_forward(registry, gqa6, batch3, every)


def test_catchup_cache_equals_one_full_forward_under_beam_search(registry, gqa6, batch3):
    assert_catchup_cache_is_one_full_forward_under_beams(registry, gqa6, batch3)


def test_exit_transformer_slot_and_mixed_depths_stay_exact(registry, gqa6, batch3):
    free = registry.strategy("free")(gqa6, [2, 4], registry.strategy("free").Config(threshold=0.1))
    model = EarlyExitForCausalLM(gqa6, free, kv_policy="catchup")
    sequences = model.generate(**batch3, max_new_tokens=9, do_sample=False, **no_eos(gqa6))
    assert {2, 4, 6} <= set(model.last_trace.exit_layers.flatten().tolist()), "rows should leave at every depth"
    assert_exit_slots_match_running_the_modules(model, batch3, sequences, free.exit_transformers, atol=1e-4)
    assert_cache_matches_full_forward(model.last_cache, gqa6, batch3, sequences)


@pytest.mark.parametrize("stacked", [True, False], ids=["one-matmul", "layer-by-layer"])
def test_propagate_projects_rotated_grouped_kv_from_the_exit_state(registry, gqa6, batch3, stacked, monkeypatch):
    if not stacked:  # as for large models: fill_kv layer by layer
        monkeypatch.setattr("earlyexit.core.engine.STACKED_KV_BYTES", 0)
    assert_propagate_projects_rotated_grouped_kv(gqa6, fixed_exit(registry, gqa6, 2, 2), batch3, exit_depth=2)



@pytest.mark.parametrize("policy", ["catchup", "propagate", "skip"])
def test_batch_rows_match_rows_alone(registry, gqa6, policy):
    """Left-padded rows rotate by their own positions: each row generates alone what it does in the batch."""
    cls = registry.strategy("confidence")
    model = EarlyExitForCausalLM(gqa6, cls(gqa6, [2, 4], cls.Config(threshold=0.1)), kv_policy=policy)
    inputs = gqa6.prepare_inputs(make_images(3, seed=5), PROMPTS)
    settings = dict(max_new_tokens=8, do_sample=False, **no_eos(gqa6))
    prompt = inputs["input_ids"].shape[1]
    batch = model.generate(**inputs, **settings)[:, prompt:]
    layers = model.last_trace.exit_layers
    assert len({tuple(row) for row in layers[:, 1:].tolist()}) > 1, "rows should leave at different depths"
    for r in range(3):
        keep = inputs["attention_mask"][r].bool()
        one = {"pixel_values": inputs["pixel_values"][r:r + 1], "input_ids": inputs["input_ids"][r:r + 1, keep],
               "attention_mask": inputs["attention_mask"][r:r + 1, keep]}
        assert torch.equal(model.generate(**one, **settings)[0, int(keep.sum()):], batch[r])
        assert model.last_trace.exit_layers[0].tolist() == layers[r].tolist()


# -- trained exits and adapters -------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=SceneConfig(train=12, val=10, test=5),
                       cache_dir=tmp_path_factory.mktemp("scenes"))


def llama64(seed=21):
    return tiny(seed=seed, num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, image_size=64, patch_size=16,
                init_std=0.1)


# the tiny model is near uniform after a few steps: knobs low enough that trained exits are taken
@pytest.mark.parametrize("name,knob", [("free", {"threshold": 0.03}), ("deebert", {"entropy": 4.4})])
def test_strategy_trains_generates_and_its_adapter_stays_with_its_family(registry, scenes, tmp_path, name, knob):
    strategy = train_exits_then_reload(registry, llama64, name, knob, scenes, tmp_path)
    backend, cls = strategy.backend, type(strategy)
    ids, labels = TrainingBatches(backend, [scenes], batch_size=4).encode("a red", "circle")
    prompt = backend.prompt_ids("a red")  # training reads the template generation reads
    assert ids[:len(prompt)] == prompt and labels == [-100] * len(prompt) + ids[len(prompt):]

    opt = make_backend(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    with pytest.raises(CheckpointError, match="backend 'minigpt4-llama', not 'blip2-opt'"):
        load_exits(str(tmp_path / "exits"), opt, registry)
    save_exits(cls(opt, [1, 2], strategy.config), str(tmp_path / "opt-exits"))
    with pytest.raises(CheckpointError, match="backend 'blip2-opt', not 'minigpt4-llama'"):
        load_exits(str(tmp_path / "opt-exits"), backend, registry)
    with pytest.raises(CheckpointError, match="another backbone"):
        load_exits(str(tmp_path / "exits"), llama64(seed=99), registry)


def test_backbone_training_loss_and_vision_early_stop(gqa6):
    """`train backbone`'s step (the model's own loss) and MuE's vision stop work on this family."""
    inputs = gqa6.prepare_inputs(make_images(2), ["two", "a red circle"])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == gqa6.model.config.image_token_id, -100)
    loss = gqa6.model(**inputs, labels=labels).loss
    assert torch.isfinite(loss) and loss.requires_grad
    full, _ = gqa6.image_features(inputs["pixel_values"])
    never, depth = gqa6.image_features(inputs["pixel_values"], saturation=1.5)
    torch.testing.assert_close(never, full)
    assert depth.tolist() == [gqa6.vision_layers] * 2


# -- checkpoints ----------------------------------------------------------------------------------
class Planted:
    """Unpickling this creates `path` (what an attacker's code would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_projection_checkpoint_is_read_tensors_only(gqa6, tmp_path):
    projection = gqa6.model.language_projection
    weight = torch.randn_like(projection.weight)
    bias = torch.randn_like(projection.bias)
    good = tmp_path / "prerained_minigpt4.pth"
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": bias}, "epoch": 3}, good)
    backend = tiny(seed=1, num_layers=6, hidden_size=32, num_heads=4, num_kv_heads=2)
    backend.model.load_projection_checkpoint(str(good))
    assert torch.equal(backend.model.language_projection.weight, weight)
    assert torch.equal(backend.model.language_projection.bias, bias)

    marker = tmp_path / "marker"
    planted = tmp_path / "planted.pth"
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": bias, "x": Planted(str(marker))}}, planted)
    with pytest.raises(CheckpointError, match="holds more than tensors") as refused:
        backend.model.load_projection_checkpoint(str(planted))
    assert "\n" not in str(refused.value) and "io.open" in str(refused.value)
    assert not marker.exists()
    assert torch.equal(backend.model.language_projection.weight, weight)  # nothing of it was loaded

    torch.save({"model": {"llama_proj.weight": weight[:, :3], "llama_proj.bias": bias}}, tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match="projects"):
        backend.model.load_projection_checkpoint(str(tmp_path / "narrow.pth"))
    torch.save({"model": {}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="holds no llama_proj"):
        backend.model.load_projection_checkpoint(str(tmp_path / "empty.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        backend.model.load_projection_checkpoint(str(tmp_path / "junk.pth"))


def test_save_pretrained_round_trip_gives_identical_generations(registry, gqa6, batch3, tmp_path):
    folder = tmp_path / "minigpt4"
    gqa6.save_pretrained(str(folder))
    loaded = registry.backend("minigpt4-llama").load(str(folder))
    assert loaded.model.config == gqa6.model.config
    assert loaded.processor.prompt_template == gqa6.processor.prompt_template
    reloaded_inputs = loaded.prepare_inputs(make_images(3, seed=2), PROMPTS)
    assert all(torch.equal(reloaded_inputs[k], batch3[k]) for k in batch3)
    for num_beams in (1, 3):
        settings = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False)
        assert torch.equal(loaded.plain_generate(**batch3, **settings), gqa6.plain_generate(**batch3, **settings))
    strategy = fixed_exit(registry, loaded, 2, 2)
    expected = EarlyExitForCausalLM(gqa6, fixed_exit(registry, gqa6, 2, 2)).generate(**batch3, max_new_tokens=8)
    assert torch.equal(EarlyExitForCausalLM(loaded, strategy).generate(**batch3, max_new_tokens=8), expected)


def write_released_parts(tmp_path, gqa6):
    """MiniGPT-4's parts as released, in miniature: a BLIP-2 folder, a Llama folder and a .pth."""
    blip2 = make_backend(seed=5, num_query_tokens=gqa6.model.config.num_query_tokens)
    blip2.save_pretrained(str(tmp_path / "blip2"))
    gqa6.language_model.save_pretrained(str(tmp_path / "vicuna"))
    gqa6.processor.tokenizer.save_pretrained(str(tmp_path / "vicuna"))
    projection = torch.nn.Linear(32, gqa6.text_config.hidden_size)
    weights = {"llama_proj.weight": projection.weight.detach(), "llama_proj.bias": projection.bias.detach()}
    torch.save({"model": weights}, tmp_path / "minigpt4.pth")
    recipe = {"language_model": "vicuna", "vision": "blip2", "projection_checkpoint": "minigpt4.pth"}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    return blip2, projection


def test_recipe_composes_the_released_parts(registry, gqa6, batch3, tmp_path):
    blip2, projection = write_released_parts(tmp_path, gqa6)
    backend = registry.backend("minigpt4-llama").load(str(tmp_path / "recipe.json"))
    composed, source = backend.model.state_dict(), blip2.model.state_dict()
    for name in [n for n in source if n.startswith(("vision_model.", "qformer.", "query_tokens"))]:
        assert torch.equal(composed[name], source[name]), name
    assert torch.equal(composed["language_projection.weight"], projection.weight)
    assert all(torch.equal(composed["language_model." + n], t) for n, t in gqa6.language_model.state_dict().items())
    inputs = backend.prepare_inputs(make_images(3, seed=2), PROMPTS)
    assert torch.equal(inputs["input_ids"], batch3["input_ids"])
    settings = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(EarlyExitForCausalLM(backend).generate(**inputs, **settings),
                       backend.plain_generate(**inputs, **settings))


def test_recipe_refuses_a_planted_projection_and_unreachable_weights(registry, gqa6, tmp_path, monkeypatch):
    write_released_parts(tmp_path, gqa6)
    marker = tmp_path / "marker"
    torch.save({"model": {"llama_proj.weight": Planted(str(marker))}}, tmp_path / "minigpt4.pth")
    cls = registry.backend("minigpt4-llama")
    with pytest.raises(CheckpointError, match="holds more than tensors") as refused:
        cls.load(str(tmp_path / "recipe.json"))
    assert "\n" not in str(refused.value) and not marker.exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    recipe = {"language_model": "lmsys/vicuna-7b-v1.1", "vision": "blip2", "projection_checkpoint": "minigpt4.pth"}
    (tmp_path / "hub.json").write_text(json.dumps(recipe))
    with pytest.raises(ModelNotAvailableError, match="not available offline") as unavailable:
        cls.load(str(tmp_path / "hub.json"))
    assert "\n" not in str(unavailable.value)
    with pytest.raises(ConfigError, match="neither a MiniGPT-4 folder"):
        cls.load(str(tmp_path / "blip2"))
    with pytest.raises(ConfigError, match="does not exist"):
        cls.compose(str(tmp_path / "vicuna"), str(tmp_path / "blip2"), str(tmp_path / "missing.pth"))


def test_cli_generate_on_a_saved_folder_and_tiny_random(registry, gqa6, tmp_path, capsys):
    from earlyexit.cli import main

    gqa6.save_pretrained(str(tmp_path / "model"))
    make_images(1, seed=6)[0].save(tmp_path / "image.png")
    argv = ["generate", "--backend", "minigpt4-llama", "--image", str(tmp_path / "image.png"), "--prompt", "a red",
            "--max-new-tokens", "5", "--json"]
    assert main(argv + ["--model", str(tmp_path / "model"), "--strategy", "fixed", "--exit-layers", "2",
                        "--option", "every=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    inputs = gqa6.prepare_inputs(make_images(1, seed=6), ["a red"])
    strategy = registry.strategy("fixed")(gqa6, [2], registry.strategy("fixed").Config(every=2))
    expected = EarlyExitForCausalLM(gqa6, strategy).generate(**inputs, max_new_tokens=5, do_sample=False)
    assert result["token_ids"] == expected[0, inputs["input_ids"].shape[1]:].tolist()
    assert result["exit_layers"] == [6, 6, 2, 6, 2]  # the first token comes from the full-depth prompt pass
    assert main(argv + ["--model", "tiny-random"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 12


def test_the_memory_bound_counts_only_the_kv_heads_a_grouped_query_model_stores():
    from earlyexit.core.engine import cache_bytes_per_row

    full = Minigpt4LlamaBackend.from_tiny_config(seed=0, num_layers=2, hidden_size=32, num_heads=4)
    grouped = Minigpt4LlamaBackend.from_tiny_config(seed=0, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=1)
    vocab = full.text_config.vocab_size * 4
    # 10 positions x 4 bytes x (2 slots x K and V x kv width + the hidden state) + the logits
    assert cache_bytes_per_row(full, 10, 2) == 10 * 4 * (2 * 2 * 32 + 32) + vocab
    assert cache_bytes_per_row(grouped, 10, 2) == 10 * 4 * (2 * 2 * 8 + 32) + vocab


def test_a_vocabulary_read_out_is_those_columns_of_the_full_one(gqa6):
    assert_vocabulary_readout_is_those_columns(gqa6)
