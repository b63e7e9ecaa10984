"""InstructBLIP with a Vicuna (Llama) language model (`instructblip-vicuna`): how the family is wired.

transformers' `InstructBlipForConditionalGeneration` with a `LlamaForCausalLM`: the image side
(vision tower, a Q-Former that reads the instruction too, projection) is `instructblip_vision`'s;
the decoder's layer-by-layer methods (RoPE, grouped-query K/V, RMSNorm read-out) are Llama's
(`llama_decoder`). The prompt is BLIP-2's layout: `num_query_tokens` image placeholders, then the
tokenized prompt (BOS first).
"""

from __future__ import annotations

from earlyexit import hookimpl
from earlyexit.backends.instructblip_vision import (InstructBlipImageSide, load_instructblip, tiny_instructblip,
                                                    tiny_instructblip_processor)
from earlyexit.backends.llama_decoder import LlamaDecoderMethods
from earlyexit.core.backend import Backend
from earlyexit.data.tokenizer import DEFAULT_WORDS, build_tokenizer


class InstructBlipVicunaBackend(InstructBlipImageSide, LlamaDecoderMethods, Backend):
    name = "instructblip-vicuna"
    description = ("InstructBLIP with a Vicuna/Llama decoder (InstructBlipForConditionalGeneration + "
                   "LlamaForCausalLM; the Q-Former reads the instruction), e.g. Salesforce/instructblip-vicuna-7b")

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32",
                        device: str = "cpu") -> InstructBlipVicunaBackend:
        return cls(*load_instructblip(name_or_path, "llama", "InstructBLIP with a Llama/Vicuna decoder", dtype, device))

    @classmethod
    def from_tiny_config(cls, seed: int = 0, num_layers: int = 4, hidden_size: int = 32, num_heads: int = 4,
                         num_kv_heads: int | None = None, intermediate_size: int | None = None,
                         num_query_tokens: int = 4, image_size: int = 16, patch_size: int | None = None,
                         vision_hidden: int = 32, vision_layers: int = 1, qformer_layers: int = 1,
                         init_std: float = 0.2, vocab_size: int | None = None, words=None,
                         encoder_init_std: float = 0.02) -> InstructBlipVicunaBackend:
        """A small randomly initialised InstructBLIP-Vicuna with word-level tokenizers and a real
        processor. `num_kv_heads` below `num_heads` gives grouped-query attention; a `vocab_size`
        above the tokenizer's gives a real-sized LM head (benchmarks)."""
        from transformers import LlamaConfig


        words = tuple(words or DEFAULT_WORDS)
        processor = tiny_instructblip_processor(build_tokenizer(words), image_size, num_query_tokens, words)
        tokenizer = processor.tokenizer
        text = LlamaConfig(
            vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden_size, num_hidden_layers=num_layers,
            intermediate_size=intermediate_size or 4 * hidden_size, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=256, initializer_range=init_std,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        )
        model = tiny_instructblip(text, processor, seed, num_query_tokens, image_size, patch_size, vision_hidden,
                                  vision_layers, qformer_layers, encoder_init_std)
        return cls(model, processor)


@hookimpl
def earlyexit_register_backends():
    return [InstructBlipVicunaBackend]
