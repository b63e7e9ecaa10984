"""BLIP-2 with a FlanT5 language model (`blip2-flant5`): how the family is wired.

Image -> ViT -> Q-Former (`num_query_tokens` queries) -> linear projection -> the embeddings of
the `<image>` placeholder tokens the processor puts in front of the prompt -> the T5 *encoder*,
which reads queries and prompt once, at full depth. The T5 decoder then generates from
`decoder_start_token_id`, attending over the encoder's output; its layers are where tokens exit
(`t5_decoder`: cross-attention K/V static per slot, the relative position bias shared by every
layer, RMSNorm and the LM head as read-out). The image side and the loader are BLIP-2's, shared
with `blip2-opt`.
"""

from __future__ import annotations

from earlyexit import hookimpl
from earlyexit.backends.blip2_opt import Blip2OptBackend
from earlyexit.backends.blip2_vision import tiny_blip2
from earlyexit.backends.t5_decoder import (RIGHT, T5DecoderMethods, set_t5_generation_ids, t5_style_tokenizer,
                                           tiny_t5_config)
from earlyexit.core.backend import Backend
from earlyexit.data.tokenizer import DEFAULT_WORDS, build_processor


class Blip2FlanT5Backend(T5DecoderMethods, Backend):
    name = "blip2-flant5"
    description = ("BLIP-2 with a FlanT5 encoder-decoder (Blip2ForConditionalGeneration, T5), "
                   "e.g. Salesforce/blip2-flan-t5-xl; exits in the T5 decoder")
    text_model_type = "t5"

    # -- loading: BLIP-2's (hub id or folder, offline as a one-line error) ---------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", device: str = "cpu") -> Blip2FlanT5Backend:
        backend = Blip2OptBackend.from_pretrained.__func__(cls, name_or_path, dtype=dtype, device=device)
        backend.processor.tokenizer.padding_side = RIGHT
        return backend

    @classmethod
    def from_tiny_config(cls, seed: int = 0, num_query_tokens: int = 4, image_size: int = 16,
                         patch_size: int | None = None, vision_hidden: int = 32, vision_layers: int = 1,
                         qformer_layers: int = 1, words=None, encoder_init_std: float = 0.02,
                         **t5_shape) -> Blip2FlanT5Backend:
        """A small randomly initialised BLIP-2 FlanT5 with a word-level T5-style tokenizer (an end
        token after every text) and a real processor; `t5_shape`: `t5_decoder.tiny_t5_config`'s
        (layers, widths, FlanT5's or original T5's kind, vocabulary size)."""
        processor = build_processor(image_size=image_size, num_query_tokens=num_query_tokens,
                                    words=words or DEFAULT_WORDS)
        tokenizer = t5_style_tokenizer(processor.tokenizer)
        text = tiny_t5_config(tokenizer, **t5_shape)
        model = tiny_blip2(text, processor, seed, num_query_tokens, image_size, patch_size, vision_hidden,
                           vision_layers, qformer_layers, encoder_init_std)
        set_t5_generation_ids(model.language_model, tokenizer)
        return cls(model, processor)

    # -- inputs: BLIP-2's (the image's queries fill the placeholders in front of the prompt) --------
    prepare_inputs = Blip2OptBackend.prepare_inputs
    vision_layers = Blip2OptBackend.vision_layers
    image_features = Blip2OptBackend.image_features
    decoder_inputs_embeds = Blip2OptBackend.decoder_inputs_embeds

    @property
    def language_model(self):
        return self.model.language_model


@hookimpl
def earlyexit_register_backends():
    return [Blip2FlanT5Backend]
