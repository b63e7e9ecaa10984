"""InstructBLIP's image side, for any language model (a causal decoder like Vicuna, or an
encoder–decoder like FlanT5): how the image and the instruction become language-model input.

Image -> ViT -> Q-Former -> linear projection -> the `<image>` placeholders in front of the prompt,
as in BLIP-2, with one difference: the Q-Former reads the instruction too. Its learned queries and
the prompt's tokens (tokenized by the processor's own Q-Former tokenizer: `qformer_input_ids`,
`qformer_attention_mask`) attend to each other inside the Q-Former, so the same image gives other
features for another question. Those two inputs are the backend's `vision_input_names`: they
travel with `pixel_values` wherever image features are computed.

`InstructBlipImageSide` is a mixin placed before the language model's mixin and `Backend`; it
never touches the language model beyond its input embeddings, and names it (`language_model`) for
that mixin. A backend composes it as
    class InstructBlipVicunaBackend(InstructBlipImageSide, LlamaDecoderMethods, Backend)
    class InstructBlipFlanT5Backend(InstructBlipImageSide, T5DecoderMethods, Backend)
and loads with `load_instructblip` / builds tiny models with `tiny_instructblip`.
"""

from __future__ import annotations

from earlyexit.backends.blip2_vision import saturating_image_embeds, scatter_image_features
from earlyexit.core.model_folder import load_checkpoint
from earlyexit.data.images import to_rgb
from earlyexit.data.tokenizer import build_tokenizer
from earlyexit.errors import CheckpointError, ConfigError

QFORMER_INPUTS = ("qformer_input_ids", "qformer_attention_mask")


class InstructBlipImageSide:
    """Backend methods of InstructBLIP's image side (the class using it sets `model`, an
    `InstructBlipForConditionalGeneration`, and `processor`, an `InstructBlipProcessor`)."""

    vision_input_names = QFORMER_INPUTS

    @property
    def language_model(self):
        return self.model.language_model  # a causal LM or an encoder-decoder: the decoder mixin knows which

    def prepare_inputs(self, images, prompts=None):
        if self.processor is None:
            raise ConfigError("this model has no processor; load it from a folder that holds one")
        from PIL import Image


        prompts = prompts if prompts is not None else [""] * len(images)
        images = [to_rgb(image) if isinstance(image, Image.Image) else image for image in images]
        inputs = dict(self.processor(images=images, text=prompts, padding=True, return_tensors="pt"))
        return self.on_model({**inputs, **self.qformer_inputs(prompts)})

    def prompt_vision_inputs(self, prompts):
        return self.on_model(self.qformer_inputs(prompts))

    def qformer_inputs(self, prompts) -> dict:
        """The instruction as the Q-Former reads it, padded on the right whatever side the language
        model pads on: the Q-Former numbers positions from the left edge, so left padding (the
        processor's choice for a left-padding LM such as Vicuna) would shift a row's positions, and
        its image features, with the length of the other questions in its batch."""
        encoded = self.processor.qformer_tokenizer(list(prompts), padding=True, padding_side="right",
                                                   return_tensors="pt")
        return {k: encoded[k.removeprefix("qformer_")] for k in QFORMER_INPUTS}

    @property
    def vision_layers(self) -> int:
        return len(self.model.vision_model.encoder.layers)

    def image_features(self, pixel_values, saturation=None, qformer_input_ids=None, qformer_attention_mask=None):
        if qformer_input_ids is None:
            raise ConfigError("InstructBLIP's Q-Former reads the instruction: pass qformer_input_ids (and "
                              "qformer_attention_mask) as backend.prepare_inputs gives them")
        if saturation is None:
            features = self.model.get_image_features(pixel_values, qformer_input_ids=qformer_input_ids,
                                                     qformer_attention_mask=qformer_attention_mask, return_dict=True)
            return features.pooler_output, None

        image_embeds, depth = saturating_image_embeds(self.model, pixel_values, saturation)
        return instructed_queries(self.model, image_embeds, qformer_input_ids, qformer_attention_mask), depth

    def decoder_inputs_embeds(self, pixel_values, input_ids, image_features=None, **vision_inputs):
        features = image_features if image_features is not None else self.image_features(pixel_values,
                                                                                          **vision_inputs)[0]
        return scatter_image_features(self.model, input_ids, features)


def instructed_queries(model, image_embeds, qformer_input_ids, qformer_attention_mask=None):
    """The Q-Former's queries, side by side with the instruction's tokens, read the
    (post-layernormed) image embeddings; the query outputs are projected to the language model's
    width. What `get_image_features` does after the vision tower, for a tower stopped early."""
    import torch

    rows = image_embeds.shape[0]
    queries = model.query_tokens.expand(rows, -1, -1)
    if qformer_attention_mask is None:
        qformer_attention_mask = torch.ones_like(qformer_input_ids)
    query_mask = torch.ones(queries.shape[:-1], dtype=qformer_attention_mask.dtype, device=queries.device)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    mask = torch.cat([query_mask, qformer_attention_mask], 1)  # queries and instruction attend to each other
    output = model.qformer(input_ids=qformer_input_ids, attention_mask=mask, query_embeds=queries,
                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, return_dict=True)[0]
    return model.language_projection(output[:, :queries.shape[1]])


# -- loading ---------------------------------------------------------------------------------------
def load_instructblip(name_or_path: str, text_type: str, family: str, dtype: str, device: str,
                      padding_side: str = "left") -> tuple:
    """(model, processor) of an InstructBLIP checkpoint (hub id or local folder) whose language
    model is of `text_type` (`llama`, `t5`); `family` names it in errors; the language model's
    tokenizer pads on `padding_side`. Offline and unreadable checkpoints are one-line errors."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    model, processor, name_or_path = load_checkpoint(name_or_path, "instructblip", text_type, family,
                                                     InstructBlipForConditionalGeneration, InstructBlipProcessor,
                                                     dtype, device=device)
    # transformers falls back to the language model's tokenizer when the Q-Former's is missing:
    # ids the Q-Former's embeddings were not trained for (or cannot even index)
    if len(processor.qformer_tokenizer) > model.config.qformer_config.vocab_size:
        raise CheckpointError(f"{name_or_path}: the Q-Former's tokenizer ({len(processor.qformer_tokenizer)} tokens) "
                              f"does not fit its {model.config.qformer_config.vocab_size} embeddings (a missing "
                              "qformer_tokenizer folder?); save the processor again or pass another folder")
    processor.tokenizer.padding_side = padding_side
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.to(device).eval(), processor


# -- tiny models -----------------------------------------------------------------------------------
def tiny_instructblip_processor(tokenizer, image_size: int, num_query_tokens: int, words):
    """An `InstructBlipProcessor` around the language model's `tokenizer` (it gains `<image>`), a
    word-level Q-Former tokenizer and a BLIP image processor."""
    from transformers import InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil


    qformer_tokenizer = build_tokenizer(words)
    images = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return InstructBlipProcessor(image_processor=images, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                                 num_query_tokens=num_query_tokens)


def tiny_instructblip(text_config, processor, seed: int, num_query_tokens: int, image_size: int,
                      patch_size: int | None, vision_hidden: int, vision_layers: int, qformer_layers: int,
                      encoder_init_std: float):
    """A small randomly initialised `InstructBlipForConditionalGeneration` around `text_config`
    (any language model transformers' InstructBLIP takes), matching `processor`."""
    import torch
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig)

    qformer_tokenizer = processor.qformer_tokenizer
    vision = InstructBlipVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                                      num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                                      patch_size=patch_size or image_size // 2, initializer_range=encoder_init_std)
    qformer = InstructBlipQFormerConfig(vocab_size=len(qformer_tokenizer), pad_token_id=qformer_tokenizer.pad_token_id,
                                        hidden_size=vision_hidden, num_hidden_layers=qformer_layers,
                                        num_attention_heads=4, intermediate_size=4 * vision_hidden,
                                        encoder_hidden_size=vision_hidden, initializer_range=encoder_init_std,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                text_config=text_config.to_dict(), num_query_tokens=num_query_tokens,
                                image_token_index=processor.tokenizer.convert_tokens_to_ids(
                                    processor.image_token.content))
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers leaves the queries at zero (checkpoints bring them): identical
        model.query_tokens.normal_(0.0, encoder_init_std)  # queries would read the image identically
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model
