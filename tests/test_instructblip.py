"""The `instructblip-vicuna` backend: InstructBLIP (a Q-Former that reads the instruction) with a
Llama decoder, through the engine. Exits off give transformers' own tokens; the instruction reaches
the Q-Former on every path that computes image features (generation, training batches, the vision
stop, speculative decoding); caches hold what one full forward holds (RoPE, grouped-query heads);
trained exits run and stay with their family; saved models reload to the same generations."""

import json
import math

import pytest
import torch
from helpers import (assert_cache_matches_full_forward, assert_catchup_cache_is_one_full_forward_under_beams,
                     assert_catchup_gqa_cache_is_one_full_forward, assert_propagate_projects_rotated_grouped_kv,
                     assert_the_instruction_reaches_the_q_former, fixed_exit, make_backend, make_images, no_eos,
                     train_exits_then_reload)

from earlyexit.backends.instructblip_vicuna import InstructBlipVicunaBackend
from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.errors import CheckpointError, ConfigError, ModelNotAvailableError
from earlyexit.models.adapters import load_exits, save_exits
from earlyexit.training.batching import TrainingBatches, language_model_step
from earlyexit.training.exits import train_exits

PROMPTS = ["a red circle", "what color is the small square on the left", ""]  # three lengths: padding
SHAPES = {
    "mha": dict(num_layers=3, hidden_size=32, num_heads=4),
    "gqa": dict(num_layers=4, hidden_size=48, num_heads=6, num_kv_heads=2, num_query_tokens=6, qformer_layers=2),
}


def tiny(**shape):
    return InstructBlipVicunaBackend.from_tiny_config(**shape)


@pytest.fixture(scope="module")
def gqa6():
    """Six layers with grouped-query attention (4 query heads share 2 key/value heads); a Q-Former
    initialised wide enough that the instruction visibly changes what it reads."""
    return tiny(seed=1, num_layers=6, hidden_size=32, num_heads=4, num_kv_heads=2, encoder_init_std=0.1)


@pytest.fixture
def batch3(gqa6):
    return gqa6.prepare_inputs(make_images(3, seed=2), PROMPTS)


# -- exits off ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_beams", [1, 5])
def test_exits_off_gives_transformers_own_tokens(registry, shape, num_beams):
    backend = tiny(seed=3, **shape)
    inputs = backend.prepare_inputs(make_images(3, seed=4), PROMPTS)
    assert (inputs["attention_mask"] == 0).any() and (inputs["qformer_attention_mask"] == 0).any(), \
        "the batch should need padding, in the prompt and in the instruction the Q-Former reads"
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


# -- the instruction reaches the Q-Former -----------------------------------------------------------
def test_the_instruction_changes_the_image_features_and_the_generation(gqa6, batch3):
    assert_the_instruction_reaches_the_q_former(gqa6, batch3, make_images(3, seed=2)[0])


def test_a_rows_image_features_do_not_depend_on_the_other_questions_in_its_batch(gqa6):
    # the Q-Former numbers positions from the left: its instruction is padded on the right even
    # though Vicuna's prompt is padded on the left
    image = make_images(1, seed=5)
    alone = gqa6.prepare_inputs(image, ["red"])
    batch = gqa6.prepare_inputs(image * 2, ["red", "how many blue squares are left of the circle"])
    assert gqa6.processor.tokenizer.padding_side == "left" and batch["qformer_attention_mask"][0, -1] == 0
    one = gqa6.image_features(alone["pixel_values"], **gqa6.vision_inputs(alone))[0]
    both = gqa6.image_features(batch["pixel_values"], **gqa6.vision_inputs(batch))[0]
    torch.testing.assert_close(both[0], one[0], rtol=1e-5, atol=1e-6)


def test_training_batches_carry_the_instruction_as_prepare_inputs_does(gqa6, batch3, scenes):
    batches = TrainingBatches(gqa6, [scenes], batch_size=3)
    rows = [batches.encode(prompt, "circle") for prompt in PROMPTS]
    batch = batches.collate(rows, batch3["pixel_values"], PROMPTS)
    for name in ("qformer_input_ids", "qformer_attention_mask"):
        assert torch.equal(batch[name], batch3[name])
    for r, prompt in enumerate(PROMPTS):  # the language model's prompt as generation reads it
        assert gqa6.prompt_ids(prompt) == batch3["input_ids"][r][batch3["attention_mask"][r].bool()].tolist()
    # the features training sees are generation's
    embeds = gqa6.decoder_inputs_embeds(batch["pixel_values"], batch["input_ids"], **gqa6.vision_inputs(batch))
    features, _ = gqa6.image_features(batch3["pixel_values"], **gqa6.vision_inputs(batch3))
    queries = gqa6.model.config.num_query_tokens
    torch.testing.assert_close(embeds[:, :queries], features)
    # backbone fine-tuning (`train backbone`): the model's own loss on such a batch
    step = batches(0)
    assert {"qformer_input_ids", "qformer_attention_mask"} <= set(step)

    class Engine:
        def optimize(self, group, loss):
            assert loss.requires_grad
            return float(loss.detach())

    assert torch.isfinite(torch.tensor(language_model_step(gqa6.model)(step, Engine())["loss"]))


def test_data_parallel_shards_keep_each_rows_instruction(gqa6, vqa):
    """DeepSpeed's ranks take rows [rank::world] of every input: a row's features are the same on
    its rank as in the global batch."""
    import types

    from earlyexit.training.deepspeed import DeepSpeedEngine

    batch = TrainingBatches(gqa6, [vqa], batch_size=4)(0)
    assert len({tuple(row) for row in batch["qformer_input_ids"].tolist()}) > 1  # a question per row
    features, _ = gqa6.image_features(batch["pixel_values"], **gqa6.vision_inputs(batch))
    for rank in (0, 1):
        shard = DeepSpeedEngine.shard(types.SimpleNamespace(rank=rank, world_size=2), batch)
        assert set(shard) == set(batch)
        mine, _ = gqa6.image_features(shard["pixel_values"], **gqa6.vision_inputs(shard))
        torch.testing.assert_close(mine, features[rank::2], atol=1e-5, rtol=0)


def test_vision_tower_stops_early_with_the_instruction_read():
    import copy

    backend = tiny(seed=5, num_layers=2, vision_layers=2)
    inputs = backend.prepare_inputs(make_images(2, seed=3), ["a red circle", "two"])
    vision = backend.vision_inputs(inputs)
    full, _ = backend.image_features(inputs["pixel_values"], **vision)
    never, depth = backend.image_features(inputs["pixel_values"], saturation=1.5, **vision)  # a cosine never reaches it
    torch.testing.assert_close(never, full, atol=1e-5, rtol=0)
    assert depth.tolist() == [2, 2]
    first, depth = backend.image_features(inputs["pixel_values"], saturation=-1.0, **vision)  # every image stops at 1
    assert depth.tolist() == [1, 1]
    truncated = copy.deepcopy(backend.model)
    truncated.vision_model.encoder.layers = truncated.vision_model.encoder.layers[:1]
    expected = truncated.get_image_features(inputs["pixel_values"], return_dict=True, **vision).pooler_output
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)
    # MuE's vision stop through the engine reads the instruction too
    from earlyexit.strategies.mue import MueStrategy as mue

    # no decoder exit (a cosine never reaches 1.5), the vision tower stops after one layer
    model = EarlyExitForCausalLM(backend, mue(backend, [1], mue.Config(gamma=1.5, vision_gamma=-1.0, layerwise=False)))
    got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    embeds = backend.decoder_inputs_embeds(inputs["pixel_values"], inputs["input_ids"], expected)
    reference = backend.language_model.generate(inputs_embeds=embeds, input_ids=inputs["input_ids"],
                                                attention_mask=inputs["attention_mask"], max_new_tokens=4,
                                                do_sample=False)
    assert torch.equal(got, reference) and model.last_trace.vision_layers.tolist() == [1, 1]


def test_speculative_decoding_reads_the_instruction(registry, gqa6, batch3):
    from earlyexit.core.speculative import SelfSpeculativeDecoder

    model = EarlyExitForCausalLM(gqa6, fixed_exit(registry, gqa6, 2, 1))
    got = SelfSpeculativeDecoder(model, draft_exit=0, draft_length=3).generate(**batch3, max_new_tokens=6)
    prompt = batch3["input_ids"].shape[1]
    expected = gqa6.plain_generate(**batch3, max_new_tokens=6, do_sample=False, **no_eos(gqa6))
    eos = gqa6.language_model.generation_config.eos_token_id
    for r in range(3):  # lossless: the full model's greedy tokens, up to its end of sequence
        tokens = expected[r, prompt:].tolist()
        tokens = tokens[:tokens.index(eos) + 1] if eos in tokens else tokens
        assert got[r, prompt:prompt + len(tokens)].tolist() == tokens


# -- caches ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("every", [2, 3])
def test_catchup_cache_equals_one_full_forward(registry, gqa6, batch3, every):
    assert_catchup_gqa_cache_is_one_full_forward(registry, gqa6, batch3, every)


def test_catchup_cache_equals_one_full_forward_under_beam_search(registry, gqa6, batch3):
    assert_catchup_cache_is_one_full_forward_under_beams(registry, gqa6, batch3)


@pytest.mark.parametrize("stacked", [True, False], ids=["one-matmul", "layer-by-layer"])
def test_propagate_projects_rotated_grouped_kv_from_the_exit_state(registry, gqa6, batch3, stacked, monkeypatch):
    if not stacked:  # as for large models: fill_kv layer by layer
        monkeypatch.setattr("earlyexit.core.engine.STACKED_KV_BYTES", 0)
    assert_propagate_projects_rotated_grouped_kv(gqa6, fixed_exit(registry, gqa6, 2, 2), batch3, exit_depth=2)



# -- trained exits and adapters -------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("exit_train", config=SceneConfig(train=12, val=10, test=5),
                       cache_dir=tmp_path_factory.mktemp("scenes"))


def vicuna64(seed=21):
    return tiny(seed=seed, num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, image_size=64, patch_size=16,
                init_std=0.1)


def test_free_trains_generates_and_its_adapter_stays_with_its_family(registry, scenes, tmp_path):
    strategy = train_exits_then_reload(registry, vicuna64, "free", {"threshold": 0.03}, scenes, tmp_path)
    backend, cls = strategy.backend, type(strategy)

    # the same Llama decoder shape under another family's image side is another backbone
    minigpt4 = Minigpt4LlamaBackend.from_tiny_config(seed=21, num_layers=4, hidden_size=32, num_heads=4,
                                                     num_kv_heads=2, image_size=64, patch_size=16, init_std=0.1)
    with pytest.raises(CheckpointError, match="backend 'instructblip-vicuna', not 'minigpt4-llama'"):
        load_exits(str(tmp_path / "exits"), minigpt4, registry)
    opt = make_backend(seed=21, num_layers=4, image_size=64, patch_size=16, init_std=0.1)
    save_exits(cls(opt, [1, 2], strategy.config), str(tmp_path / "opt-exits"))
    with pytest.raises(CheckpointError, match="backend 'blip2-opt', not 'instructblip-vicuna'"):
        load_exits(str(tmp_path / "opt-exits"), backend, registry)
    with pytest.raises(CheckpointError, match="another backbone"):
        load_exits(str(tmp_path / "exits"), vicuna64(seed=99), registry)


BUILT_IN = ("confidence", "deebert", "fixed", "free", "leebert", "mue", "pabee")
EAGER = {"confidence": 0.02, "free": 0.02, "deebert": 10.0, "mue": -1.0}


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_strategy_trains_and_generates_on_this_family(registry, scenes, tmp_path, name):
    backend = vicuna64()
    backbone = {n: p.detach().clone() for n, p in backend.model.state_dict().items()}
    cls = registry.strategy(name)
    trains = "epochs" in cls.Config.__dataclass_fields__
    options = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3} if trains else {}
    strategy = cls(backend, [2] if name == "fixed" else [1, 2], cls.Config(**options))
    if strategy.needs_training:
        trained = torch.nn.ModuleList(strategy.training_modules().values())
        before = [p.detach().clone() for p in trained.parameters()]
        losses = train_exits(strategy, backend, scenes, str(tmp_path / "run"), progress=False)
        assert losses and all(math.isfinite(v) for step in losses for v in step.values() if isinstance(v, float))
        after = torch.nn.ModuleList(strategy.training_modules().values()).parameters()
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), "training should move the exits"
    assert all(torch.equal(backbone[n], t) for n, t in backend.model.state_dict().items())
    if strategy.knob:  # an eager setting of its rule (the tiny model is near uniform), so tokens leave early
        grid = strategy.calibration_grid()
        strategy.set_knob(EAGER.get(name, min(grid) if strategy.knob_safer == "higher" else max(grid)))
    inputs = backend.prepare_inputs(make_images(3, seed=8, size=64), PROMPTS)
    model = EarlyExitForCausalLM(backend, strategy, kv_policy="catchup")
    sequences = model.generate(**inputs, max_new_tokens=5, do_sample=False, **no_eos(backend))
    layers = model.last_trace.exit_layers
    assert set(layers.flatten().tolist()) <= {1, 2, backend.num_layers} and (layers[:, 0] == backend.num_layers).all()
    assert (layers[:, 1:] < backend.num_layers).any(), "some token should leave early"
    if strategy.backbone_layers() is None:  # the engine ran the backbone's own layers: caches are exact
        assert_cache_matches_full_forward(model.last_cache, backend, inputs, sequences)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return load_scenes("test", task="vqa", config=SceneConfig(train=4, val=4, test=4),
                       cache_dir=tmp_path_factory.mktemp("vqa"))


def test_eval_with_speculative_decoding_gives_the_full_models_answers(registry, vqa):
    """`eval`: questions (the instruction differs per row) through the early-exit engine and
    self-speculative decoding, which splits the batch into rows: each keeps its own instruction."""
    from earlyexit.evaluation.common import EvalSettings
    from earlyexit.evaluation.evaluate import evaluate

    backend = vicuna64(seed=8)
    settings = EvalSettings(batch_size=4, max_new_tokens=4, measure_wall=False, progress=False, quick_metrics=True)
    full = evaluate(backend, None, vqa, settings)
    assert len({s.question for s in vqa}) > 1
    strategy = fixed_exit(registry, backend, 2, 1)
    speculative = evaluate(backend, strategy, vqa, settings, decode="speculative", draft_exit=0)
    assert speculative["predictions"] == full["predictions"]
    early = evaluate(backend, strategy, vqa, settings)
    assert early["speed"]["layer_speedup"] > 1 and early["predictions"] != full["predictions"]


def test_train_backbone_cli_moves_the_q_former(tmp_path, capsys):
    from earlyexit.cli import main

    vicuna64(seed=8).save_pretrained(str(tmp_path / "micro"))
    assert main(["train", "backbone", "--backend", "instructblip-vicuna", "--model", str(tmp_path / "micro"),
                 "--data", "scenes", "--steps", "2", "--batch-size", "2", "--warmup-steps", "0", "--learning-rate",
                 "1e-2", "--output", str(tmp_path / "tuned")]) == 0, capsys.readouterr().err
    tuned = InstructBlipVicunaBackend.load(str(tmp_path / "tuned" / "model"))
    original = InstructBlipVicunaBackend.load(str(tmp_path / "micro"))
    moved = [not torch.equal(a, b) for a, b in zip(tuned.model.qformer.embeddings.parameters(),
                                                   original.model.qformer.embeddings.parameters())]
    assert any(moved), "fine-tuning should move the Q-Former's word embeddings: it reads the instruction"


# -- loading --------------------------------------------------------------------------------------
def test_save_pretrained_round_trip_gives_identical_generations(registry, gqa6, batch3, tmp_path):
    folder = tmp_path / "instructblip"
    gqa6.save_pretrained(str(folder))
    loaded = registry.backend("instructblip-vicuna").load(str(folder))
    saved = gqa6.model.state_dict()
    assert all(torch.equal(saved[n], t) for n, t in loaded.model.state_dict().items()) and len(saved) > 100
    assert loaded.model.config.image_token_id == gqa6.model.config.image_token_id
    reloaded_inputs = loaded.prepare_inputs(make_images(3, seed=2), PROMPTS)
    assert set(reloaded_inputs) == set(batch3) and all(torch.equal(reloaded_inputs[k], batch3[k]) for k in batch3)
    for num_beams in (1, 3):
        settings = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False)
        assert torch.equal(loaded.plain_generate(**batch3, **settings), gqa6.plain_generate(**batch3, **settings))
    expected = EarlyExitForCausalLM(gqa6, fixed_exit(registry, gqa6, 2, 2)).generate(**batch3, max_new_tokens=8)
    reloaded = EarlyExitForCausalLM(loaded, fixed_exit(registry, loaded, 2, 2))
    assert torch.equal(reloaded.generate(**batch3, max_new_tokens=8), expected)


def test_loading_refuses_another_family_and_an_unreachable_hub_in_one_line(registry, gqa6, tmp_path, monkeypatch):
    import shutil

    cls = registry.backend("instructblip-vicuna")
    gqa6.save_pretrained(str(tmp_path / "no-qformer-tokenizer"))
    shutil.rmtree(tmp_path / "no-qformer-tokenizer" / "qformer_tokenizer")  # transformers would use the Llama one
    fitting = gqa6.model.config.qformer_config.vocab_size
    wrong = len(gqa6.processor.tokenizer)
    with pytest.raises(CheckpointError, match=f"\\({wrong} tokens\\) does not fit its {fitting} embeddings") as refused:
        cls.load(str(tmp_path / "no-qformer-tokenizer"))
    assert "\n" not in str(refused.value)
    make_backend(seed=5).save_pretrained(str(tmp_path / "blip2"))
    with pytest.raises(ConfigError, match="blip-2/opt model, not InstructBLIP"):
        cls.load(str(tmp_path / "blip2"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotAvailableError, match="not available offline") as unavailable:
        cls.load("Salesforce/instructblip-vicuna-7b")
    assert "\n" not in str(unavailable.value)


def test_cli_generate_on_a_saved_folder_and_tiny_random(registry, gqa6, tmp_path, capsys):
    from earlyexit.cli import main

    gqa6.save_pretrained(str(tmp_path / "model"))
    make_images(1, seed=6)[0].save(tmp_path / "image.png")
    argv = ["generate", "--backend", "instructblip-vicuna", "--image", str(tmp_path / "image.png"), "--prompt",
            "a red", "--max-new-tokens", "5", "--json"]
    assert main(argv + ["--model", str(tmp_path / "model"), "--strategy", "fixed", "--exit-layers", "2",
                        "--option", "every=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    inputs = gqa6.prepare_inputs(make_images(1, seed=6), ["a red"])
    expected = EarlyExitForCausalLM(gqa6, fixed_exit(registry, gqa6, 2, 2)).generate(**inputs, max_new_tokens=5,
                                                                               do_sample=False)
    assert result["token_ids"] == expected[0, inputs["input_ids"].shape[1]:].tolist()
    assert result["exit_layers"] == [6, 6, 2, 6, 2]  # the first token comes from the full-depth prompt pass
    assert main(argv + ["--model", "tiny-random"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 12
