"""InstructBLIP with a FlanT5 language model (`instructblip-flant5`): how the family is wired.

transformers' `InstructBlipForConditionalGeneration` with a `T5ForConditionalGeneration`: the
image side (vision tower, a Q-Former that reads the instruction too, projection) is
`instructblip_vision`'s; the image's query outputs and the prompt go through the T5 encoder once,
at full depth, and tokens exit in the T5 decoder (`t5_decoder`, as for `blip2-flant5`). The prompt
is padded on the right (T5's encoder bias counts columns), and so is the Q-Former's copy of the
instruction, as the rows' own lengths would have it.
"""

from __future__ import annotations

from earlyexit import hookimpl
from earlyexit.backends.instructblip_vision import (InstructBlipImageSide, load_instructblip, tiny_instructblip,
                                                    tiny_instructblip_processor)
from earlyexit.backends.t5_decoder import (RIGHT, T5DecoderMethods, set_t5_generation_ids, t5_style_tokenizer,
                                           tiny_t5_config)
from earlyexit.core.backend import Backend
from earlyexit.data.tokenizer import DEFAULT_WORDS, build_tokenizer


class InstructBlipFlanT5Backend(InstructBlipImageSide, T5DecoderMethods, Backend):
    name = "instructblip-flant5"
    description = ("InstructBLIP with a FlanT5 encoder-decoder (InstructBlipForConditionalGeneration + T5; the "
                   "Q-Former reads the instruction), e.g. Salesforce/instructblip-flan-t5-xl; exits in the T5 decoder")

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32",
                        device: str = "cpu") -> InstructBlipFlanT5Backend:
        model, processor = load_instructblip(name_or_path, "t5", "InstructBLIP with a FlanT5 language model", dtype,
                                             device, padding_side=RIGHT)
        return cls(model, padded_on_the_right(processor))

    @classmethod
    def from_tiny_config(cls, seed: int = 0, num_query_tokens: int = 4, image_size: int = 16,
                         patch_size: int | None = None, vision_hidden: int = 32, vision_layers: int = 1,
                         qformer_layers: int = 1, words=None, encoder_init_std: float = 0.02,
                         **t5_shape) -> InstructBlipFlanT5Backend:
        """A small randomly initialised InstructBLIP-FlanT5 with word-level tokenizers (the language
        model's T5-style: an end token after every text) and a real processor; `t5_shape`:
        `t5_decoder.tiny_t5_config`'s (layers, widths, FlanT5's or original T5's kind, vocabulary)."""
        words = tuple(words or DEFAULT_WORDS)
        tokenizer = t5_style_tokenizer(build_tokenizer(words))
        processor = padded_on_the_right(tiny_instructblip_processor(tokenizer, image_size, num_query_tokens, words))
        model = tiny_instructblip(tiny_t5_config(processor.tokenizer, **t5_shape), processor, seed, num_query_tokens,
                                  image_size, patch_size, vision_hidden, vision_layers, qformer_layers,
                                  encoder_init_std)
        set_t5_generation_ids(model.language_model, processor.tokenizer)
        return cls(model, processor)


def padded_on_the_right(processor):
    """`processor` with both tokenizers padding on the right, whichever side it takes: the language
    model's tokenizer's when that one's config names a side, else the Q-Former tokenizer's own."""
    processor.tokenizer.padding_side = processor.qformer_tokenizer.padding_side = RIGHT
    return processor


@hookimpl
def earlyexit_register_backends():
    return [InstructBlipFlanT5Backend]
