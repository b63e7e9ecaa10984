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
from earlyexit.backend import Backend
from earlyexit.errors import ConfigError

from .blip2_opt import Blip2OptBackend
from .t5_decoder import T5DecoderMethods


# The encoder's relative position bias counts columns, so padding between the image queries and the
# prompt would shift their distances: the prompt is padded on the right, as BLIP-2's T5 was trained
# (the decoder, which starts from its own start token, never sees the padding).
RIGHT = "right"


class Blip2FlanT5Backend(T5DecoderMethods, Backend):
    name = "blip2-flant5"
    description = ("BLIP-2 with a FlanT5 encoder-decoder (Blip2ForConditionalGeneration, T5), "
                   "e.g. Salesforce/blip2-flan-t5-xl; exits in the T5 decoder")
    text_model_type = "t5"

    # -- loading: BLIP-2's (hub id or folder, offline as a one-line error) ---------------------------
    @classmethod
    def load(cls, name_or_path: str, device: str | None = None, dtype: str | None = None) -> Blip2FlanT5Backend:
        from earlyexit import embedded

        if name_or_path == embedded.NAME:
            raise ConfigError(f"the embedded model {embedded.NAME!r} is BLIP-2 with OPT (--backend blip2-opt); for "
                              f"{cls.name} pass --model tiny-random, a folder written by save_pretrained or a hub id "
                              "such as Salesforce/blip2-flan-t5-xl")
        return super().load(name_or_path, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", device: str = "cpu") -> Blip2FlanT5Backend:
        backend = Blip2OptBackend.from_pretrained.__func__(cls, name_or_path, dtype=dtype, device=device)
        backend.processor.tokenizer.padding_side = RIGHT
        return backend

    @classmethod
    def from_tiny_config(cls, seed: int = 0, num_layers: int = 4, hidden_size: int = 32, num_heads: int = 4,
                         d_kv: int | None = None, d_ff: int | None = None, encoder_layers: int | None = None,
                         feed_forward_proj: str = "gated-gelu", tie_word_embeddings: bool = False,
                         relative_attention_num_buckets: int = 8, relative_attention_max_distance: int = 20,
                         num_query_tokens: int = 4, image_size: int = 16, patch_size: int | None = None,
                         vision_hidden: int = 32, vision_layers: int = 1, qformer_layers: int = 1,
                         init_factor: float = 2.0, vocab_size: int | None = None, words=None,
                         encoder_init_std: float = 0.02) -> Blip2FlanT5Backend:
        """A small randomly initialised BLIP-2 FlanT5 with a word-level T5-style tokenizer (an end
        token after every text) and a real processor. FlanT5 is `gated-gelu` with an untied head;
        `tie_word_embeddings=True` gives original T5's scaled, tied read-out. A `vocab_size` above
        the tokenizer's gives a real-sized LM head (benchmarks). The encoder has as many layers as the
        decoder unless `encoder_layers` says otherwise (transformers 5's own `generate` sizes the
        decoder's cache by the encoder's depth, so only symmetric models run there)."""
        import torch
        from tokenizers import processors
        from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

        from earlyexit.tiny import DEFAULT_WORDS, build_processor

        from .blip2_vision import tiny_image_side_configs

        processor = build_processor(image_size=image_size, num_query_tokens=num_query_tokens,
                                    words=words or DEFAULT_WORDS)
        tokenizer = processor.tokenizer
        tokenizer.padding_side = RIGHT
        # T5's tokenizer ends every text with </s> (and adds nothing in front)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", tokenizer.eos_token_id)])
        text = T5Config(
            vocab_size=max(vocab_size or 0, len(tokenizer)), d_model=hidden_size, d_kv=d_kv or hidden_size // num_heads,
            d_ff=d_ff or 2 * hidden_size, num_layers=encoder_layers or num_layers, num_decoder_layers=num_layers,
            num_heads=num_heads,
            relative_attention_num_buckets=relative_attention_num_buckets,
            relative_attention_max_distance=relative_attention_max_distance, dropout_rate=0.0,
            feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie_word_embeddings,
            initializer_factor=init_factor,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        vision, qformer = tiny_image_side_configs(vision_hidden, vision_layers, qformer_layers, image_size, patch_size,
                                                  encoder_init_std)
        config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                             text_config=text.to_dict(), num_query_tokens=num_query_tokens,
                             image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content))
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
        with torch.no_grad():  # transformers leaves the queries at zero (checkpoints bring them)
            model.query_tokens.normal_(0.0, encoder_init_std)
        model.language_model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.language_model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
        return cls(model, processor)

    # -- inputs: BLIP-2's (the image's queries fill the placeholders in front of the prompt) --------
    prepare_inputs = Blip2OptBackend.prepare_inputs
    vision_layers = Blip2OptBackend.vision_layers
    image_features = Blip2OptBackend.image_features
    decoder_inputs_embeds = Blip2OptBackend.decoder_inputs_embeds

    def plain_generate(self, **inputs_and_generate_kwargs):
        """The backbone's own `generate`, laid out as every family's: prompt ids, then the new
        tokens (transformers returns the decoder's start token and the new tokens)."""
        from earlyexit.engine import _behind_prompt

        return _behind_prompt(inputs_and_generate_kwargs["input_ids"], self.model.generate(
            **inputs_and_generate_kwargs)[:, 1:])

    @property
    def language_model(self):
        return self.model.language_model


@hookimpl
def earlyexit_register_backends():
    return [Blip2FlanT5Backend]
