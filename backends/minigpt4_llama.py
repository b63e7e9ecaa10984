"""MiniGPT-4 with a Llama/Vicuna decoder (`minigpt4-llama`): how the family is wired.

The model (`minigpt4_model`) composes BLIP-2's vision tower and Q-Former, MiniGPT-4's linear
projection and a `LlamaForCausalLM`; the image's projected queries fill the placeholder ids that
stand where MiniGPT-4's prompt template says `<ImageHere>`. The decoder's layer-by-layer methods
(RoPE, grouped-query K/V, RMSNorm read-out) are Llama's (`llama_decoder`).

Loading: a folder written by `save_pretrained`, or a recipe (a `.json` file) naming MiniGPT-4's
released parts:
    {"language_model": "vicuna-7b-v0",                Llama/Vicuna: folder or hub id
     "vision": "Salesforce/blip2-flan-t5-xxl",        BLIP-2: its vision tower, queries, Q-Former
     "projection_checkpoint": "prerained_minigpt4_7b.pth"}   MiniGPT-4's llama_proj
Relative paths in a recipe are read from the recipe's folder.

`with_new_image_side` puts a new, untrained image side (a frozen pretrained image encoder, a
Q-Former and the projection) in front of a pretrained Llama, which may be a GGUF file (dequantized
on load): the embedded model `smol` (`earlyexit.models.smol`) is built that way, and `--model smol`
names it here.
"""

from __future__ import annotations

import contextlib
import json
import os

from earlyexit import hookimpl
from earlyexit.backends.blip2_vision import saturating_query_features, tiny_image_side_configs
from earlyexit.backends.llama_decoder import LlamaDecoderMethods
from earlyexit.core.backend import Backend
from earlyexit.core.model_folder import hub_offline
from earlyexit.data.tokenizer import DEFAULT_WORDS, build_tokenizer
from earlyexit.errors import ConfigError, ModelNotAvailableError, first_line

RECIPE_KEYS = ("language_model", "vision", "projection_checkpoint")
TEMPLATE_WORDS = ("#", "human", "assistant", "<", ">", "/", "img")  # the tiny tokenizer spells the template
BLIP2_IMAGE_SIDE = ("vision_model.", "qformer.", "query_tokens")


class Minigpt4LlamaBackend(LlamaDecoderMethods, Backend):
    name = "minigpt4-llama"
    description = ("MiniGPT-4: BLIP-2 vision tower and Q-Former, a projection, a Llama/Vicuna decoder "
                   "(LlamaForCausalLM); a saved folder or a recipe .json of the released parts")

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", device: str = "cpu") -> Minigpt4LlamaBackend:
        import torch

        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.backends.minigpt4_model import CONFIG_FILE, MiniGPT4ForConditionalGeneration, MiniGPT4Processor

        if os.path.isfile(os.path.join(name_or_path, CONFIG_FILE)):
            model = MiniGPT4ForConditionalGeneration.from_pretrained(name_or_path, getattr(torch, dtype))
            processor = MiniGPT4Processor.from_pretrained(name_or_path)
            model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
            return cls(model.to(device), processor)
        if name_or_path.endswith(".json") and os.path.isfile(name_or_path):
            return cls.compose(**read_recipe(name_or_path), dtype=dtype, device=device)
        raise ConfigError(f"{name_or_path!r} is neither a MiniGPT-4 folder (written by save_pretrained) nor a recipe "
                          f".json naming {', '.join(RECIPE_KEYS)}; see `earlyexit list` and the backend's docs")

    @classmethod
    def compose(cls, language_model: str, vision: str, projection_checkpoint: str, prompt_template: str | None = None,
                dtype: str = "float32", device: str = "cpu") -> Minigpt4LlamaBackend:
        """MiniGPT-4 from its released parts: Llama/Vicuna weights (hub id or folder), a BLIP-2
        checkpoint's vision tower, queries and Q-Former, and MiniGPT-4's projection `.pth`."""
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, LlamaForCausalLM

        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.backends.minigpt4_model import (IMAGE_PLACEHOLDER, PROMPT_TEMPLATE, MiniGPT4Config,
                                                       MiniGPT4ForConditionalGeneration, MiniGPT4Processor)

        offline = hub_offline()
        if not os.path.isfile(projection_checkpoint):  # the cheapest mistake first, before any download
            raise ConfigError(f"projection checkpoint {projection_checkpoint!r} does not exist; pass MiniGPT-4's "
                              "released .pth (e.g. prerained_minigpt4_7b.pth)")
        text_config = load_config(language_model, "llama", "the Llama/Vicuna language model", offline)
        blip2_config = load_config(vision, "blip-2", "the BLIP-2 vision tower and Q-Former", offline)
        with unavailable_as_error(language_model):
            tokenizer = AutoTokenizer.from_pretrained(language_model, local_files_only=offline)
            llama = LlamaForCausalLM.from_pretrained(language_model, config=text_config, dtype=getattr(torch, dtype),
                                                     local_files_only=offline)
        with unavailable_as_error(vision):
            image_processor = AutoImageProcessor.from_pretrained(vision, local_files_only=offline)
            image_side = read_blip2_image_side(vision, offline)
        # Llama's byte-fallback tokenizer never emits <unk>, so its (existing) embedding row can
        # stand for the image positions; the text around <ImageHere> is tokenized on its own.
        vocab = tokenizer.get_vocab()
        image_token_id = vocab[IMAGE_PLACEHOLDER] if IMAGE_PLACEHOLDER in vocab else tokenizer.unk_token_id
        if image_token_id is None:
            raise ConfigError(f"{language_model}: the tokenizer has neither {IMAGE_PLACEHOLDER} nor an unknown "
                              "token to stand for the image positions")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == image_token_id:
            tokenizer.pad_token = tokenizer.eos_token  # Llama ships without one; padding is masked anyway
        tokenizer.padding_side = "left"
        config = MiniGPT4Config(vision_config=blip2_config.vision_config.to_dict(),
                                qformer_config=blip2_config.qformer_config.to_dict(),
                                num_query_tokens=blip2_config.num_query_tokens, image_token_id=image_token_id)
        model = MiniGPT4ForConditionalGeneration.to_load(config, llama)
        model.load_image_side(image_side, vision, with_projection=False)
        model.load_projection_checkpoint(projection_checkpoint)
        model.check_loaded(vision)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        processor = MiniGPT4Processor(image_processor, tokenizer, config.num_query_tokens, image_token_id,
                                      prompt_template or PROMPT_TEMPLATE)
        return cls(model.to(getattr(torch, dtype)).to(device).eval(), processor)

    @classmethod
    def from_tiny_config(cls, seed: int = 0, num_layers: int = 4, hidden_size: int = 32, num_heads: int = 4,
                         num_kv_heads: int | None = None, intermediate_size: int | None = None,
                         num_query_tokens: int = 4, image_size: int = 16, patch_size: int | None = None,
                         vision_hidden: int = 32, vision_layers: int = 1, qformer_layers: int = 1,
                         init_std: float = 0.2, vocab_size: int | None = None, words=None,
                         encoder_init_std: float = 0.02) -> Minigpt4LlamaBackend:
        """A small randomly initialised MiniGPT-4 with a word-level tokenizer. `num_kv_heads` below
        `num_heads` gives grouped-query attention; a `vocab_size` above the tokenizer's gives a
        real-sized LM head (benchmarks)."""
        import torch
        from tokenizers import AddedToken
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.backends.minigpt4_model import (IMAGE_PLACEHOLDER, MiniGPT4Config,
                                                       MiniGPT4ForConditionalGeneration, MiniGPT4Processor)

        tokenizer = build_tokenizer(tuple(words or DEFAULT_WORDS) + TEMPLATE_WORDS)
        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True)], special_tokens=True)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        text = LlamaConfig(
            vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden_size, num_hidden_layers=num_layers,
            intermediate_size=intermediate_size or 4 * hidden_size, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=256, initializer_range=init_std,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        )
        vision, qformer = tiny_image_side_configs(vision_hidden, vision_layers, qformer_layers, image_size, patch_size,
                                                  encoder_init_std)
        config = MiniGPT4Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                num_query_tokens=num_query_tokens, image_token_id=image_token_id)
        torch.manual_seed(seed)
        model = MiniGPT4ForConditionalGeneration(config, LlamaForCausalLM(text)).eval()
        with torch.no_grad():  # identical queries would read the image identically
            model.query_tokens.normal_(0.0, encoder_init_std)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        images = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
        return cls(model, MiniGPT4Processor(images, tokenizer, num_query_tokens, image_token_id))

    @classmethod
    def with_new_image_side(cls, language_model: str, image_encoder: str = "efficientnet-lite0", image_size: int = 128,
                            num_query_tokens: int = 8, qformer_hidden: int = 384, qformer_layers: int = 2,
                            qformer_heads: int = 6, encoder_blocks: int | None = None,
                            prompt_template: str | None = None, seed: int = 0,
                            dtype: str = "float32", device: str = "cpu") -> Minigpt4LlamaBackend:
        """MiniGPT-4 around a pretrained Llama (`language_model`: a folder, or a `.gguf` file,
        dequantized to `dtype`) with a new image side: the image encoder (`efficientnet-lite0`:
        its ImageNet weights, its map after `encoder_blocks` blocks or its last; `blip2`: a small
        random ViT, for tests), then a Q-Former of `num_query_tokens` queries and the projection,
        both untrained."""
        import torch
        from transformers import Blip2QFormerConfig
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.backends.minigpt4_model import (IMAGE_PLACEHOLDER, PROMPT_TEMPLATE, EfficientNetLiteFeatures,
                                                       MiniGPT4Config, MiniGPT4ForConditionalGeneration,
                                                       MiniGPT4Processor)

        llama, tokenizer = load_llama(language_model, getattr(torch, dtype))
        vocab = tokenizer.get_vocab()
        image_token_id = vocab.get(IMAGE_PLACEHOLDER, tokenizer.unk_token_id)
        if image_token_id is None:
            raise ConfigError(f"{language_model}: the tokenizer has neither {IMAGE_PLACEHOLDER} nor an unknown "
                              "token to stand for the image positions")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == image_token_id:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked; it only must not be the image id
        tokenizer.padding_side = "left"
        if image_encoder == EfficientNetLiteFeatures.name:
            vision_config = {"image_size": image_size, "blocks": encoder_blocks}
            encoder_width = EfficientNetLiteFeatures(encoder_blocks).width
            # EfficientNet-Lite takes pixels scaled to [-1, 1]
            images = BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        elif image_encoder == "blip2":
            vision, _ = tiny_image_side_configs(qformer_hidden, 1, 1, image_size, None, 0.02)
            vision_config, encoder_width = vision.to_dict(), qformer_hidden
            images = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
        else:
            raise ConfigError(f"unknown image encoder {image_encoder!r}; choose efficientnet-lite0 or blip2")
        qformer = Blip2QFormerConfig(hidden_size=qformer_hidden, num_hidden_layers=qformer_layers,
                                     num_attention_heads=qformer_heads, intermediate_size=4 * qformer_hidden,
                                     encoder_hidden_size=encoder_width)
        config = MiniGPT4Config(vision_config=vision_config, qformer_config=qformer.to_dict(),
                                num_query_tokens=num_query_tokens, image_token_id=image_token_id,
                                image_encoder=image_encoder)
        torch.manual_seed(seed)
        model = MiniGPT4ForConditionalGeneration(config, llama)
        with torch.no_grad():  # identical queries would read the image identically
            model.query_tokens.normal_(0.0, 0.02)
        if image_encoder == EfficientNetLiteFeatures.name:
            model.vision_model.load_imagenet_weights()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        processor = MiniGPT4Processor(images, tokenizer, num_query_tokens, image_token_id,
                                      prompt_template or PROMPT_TEMPLATE)
        return cls(model.to(getattr(torch, dtype)).to(device).eval(), processor)

    # -- inputs --------------------------------------------------------------------------------
    def prepare_inputs(self, images, prompts=None):
        if self.processor is None:
            raise ConfigError("this model has no processor; load it from a folder that holds one")
        prompts = prompts if prompts is not None else [""] * len(images)
        return self.on_model(self.processor(images=images, text=prompts))

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.processor.prompt_ids(prompt)

    @property
    def vision_layers(self) -> int:
        encoder = getattr(self.model.vision_model, "encoder", None)  # a convolutional encoder has no layers to stop
        return len(encoder.layers) if encoder is not None else 0

    def image_features(self, pixel_values, saturation=None):
        if saturation is None:
            return self.model.get_image_features(pixel_values), None

        return saturating_query_features(self.model, pixel_values, saturation)

    def decoder_inputs_embeds(self, pixel_values, input_ids, image_features=None):
        return self.model.embed_inputs(pixel_values, input_ids, image_features)

    # -- the language model --------------------------------------------------------------------
    @property
    def language_model(self):
        return self.model.language_model


def load_llama(language_model: str, dtype):
    """(LlamaForCausalLM, tokenizer) from a folder or hub id, or from a `.gguf` file (which holds
    both: transformers dequantizes its weights to `dtype`)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not language_model.endswith(".gguf"):
        offline = hub_offline()
        config = load_config(language_model, "llama", "the Llama language model", offline)
        with unavailable_as_error(language_model):
            tokenizer = AutoTokenizer.from_pretrained(language_model, local_files_only=offline)
            llama = LlamaForCausalLM.from_pretrained(language_model, config=config, dtype=dtype,
                                                     local_files_only=offline)
        return llama, tokenizer
    if not os.path.isfile(language_model):
        raise ConfigError(f"GGUF file {language_model!r} does not exist; name a .gguf file or a model folder")
    folder, file = os.path.split(os.path.abspath(language_model))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
        llama = LlamaForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype, local_files_only=True)
    except ImportError as error:
        raise ConfigError(f"reading a GGUF language model needs the `smol` extra (gguf, accelerate): pip install "
                          f"'earlyexit-vlm[smol]' ({first_line(error)})") from None
    except (OSError, ValueError, KeyError) as error:
        raise ModelNotAvailableError(f"{language_model}: not a Llama GGUF transformers can read "
                                     f"({first_line(error)})") from None
    # the weights are dequantized: nothing of the quantizer must reach save_pretrained
    llama.hf_quantizer = None
    if hasattr(llama.config, "quantization_config"):
        del llama.config.quantization_config
    return llama, tokenizer


def read_recipe(path: str) -> dict:
    try:
        with open(path) as handle:
            recipe = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"recipe {path} is unreadable ({error})") from None
    if not isinstance(recipe, dict) or any(not isinstance(recipe.get(k), str) for k in RECIPE_KEYS):
        raise ConfigError(f"recipe {path} must be a JSON object naming {', '.join(RECIPE_KEYS)} (strings)")
    unknown = set(recipe) - set(RECIPE_KEYS) - {"prompt_template"}
    if unknown:
        raise ConfigError(f"recipe {path} has unknown keys {sorted(unknown)}; it takes {', '.join(RECIPE_KEYS)} "
                          "and prompt_template")
    folder = os.path.dirname(os.path.abspath(path))
    for key in RECIPE_KEYS:  # relative paths that exist next to the recipe; anything else is a hub id
        beside = os.path.join(folder, recipe[key])
        if not os.path.isabs(recipe[key]) and os.path.exists(beside):
            recipe[key] = beside
    return recipe


@contextlib.contextmanager
def unavailable_as_error(name: str):
    """Loading errors of a hub id or folder (not cached, unreachable, incomplete: transformers
    and huggingface_hub raise OSError for each) as one-line ModelNotAvailableError."""
    try:
        yield
    except OSError as error:
        if os.path.isdir(name):
            raise ModelNotAvailableError(f"{name}: could not be loaded ({first_line(error)})") from error
        raise ModelNotAvailableError(
            f"model {name!r} is not available offline and the hub cannot be reached; download it on a "
            "connected machine and name its local folder instead (set HF_HUB_OFFLINE=1 to fail at once)") from error


def load_config(name: str, model_type: str, role: str, offline: bool):
    from transformers import AutoConfig

    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if not os.path.isdir(name) and looks_like_path:
        raise ConfigError(f"folder {name!r} ({role}) does not exist; name a folder or a hub id")
    with unavailable_as_error(name):
        config = AutoConfig.from_pretrained(name, local_files_only=offline)
    if config.model_type != model_type:
        raise ConfigError(f"{name} is a {config.model_type} model, but {role} must be {model_type}")
    return config


def read_blip2_image_side(source: str, offline: bool) -> dict:
    """The vision tower, queries and Q-Former tensors of a BLIP-2 checkpoint (hub id or folder),
    read from its safetensors files without loading its language model."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from safetensors import safe_open

    def fetch(filename):
        if os.path.isdir(source):
            path = os.path.join(source, filename)
            return path if os.path.isfile(path) else None
        try:
            return hf_hub_download(source, filename, local_files_only=offline)
        except RemoteEntryNotFoundError:
            return None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        with open(index) as handle:
            weight_map = json.load(handle)["weight_map"]
        files = sorted({f for key, f in weight_map.items() if key.startswith(BLIP2_IMAGE_SIDE)})
    else:
        files = ["model.safetensors"]
    state = {}
    for filename in files:
        path = fetch(filename)
        if path is None:
            raise ModelNotAvailableError(f"{source} holds no {filename}; MiniGPT-4 reads BLIP-2's safetensors weights")
        with safe_open(path, "pt") as weights:
            state.update({key: weights.get_tensor(key) for key in weights.keys() if key.startswith(BLIP2_IMAGE_SIDE)})
    if not state:
        raise ModelNotAvailableError(f"{source} holds no BLIP-2 vision tower or Q-Former weights")
    return state


@hookimpl
def earlyexit_register_backends():
    return [Minigpt4LlamaBackend]
