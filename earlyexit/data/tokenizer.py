"""Tiny offline building blocks for tests and benchmarks: a word-level tokenizer and a BLIP-2
processor around it, made with `tokenizers` and saved/loaded through the ordinary HF API."""

from __future__ import annotations

# Enough words for readable tiny captions; the embedded data set brings its own vocabulary.
DEFAULT_WORDS = (
    "a an the of and with on in at to is are there one two three four five red green blue yellow "
    "purple orange black white gray small large big tiny circle square triangle star cross ring "
    "left right top bottom middle center above below next near behind front image picture photo "
    "shows showing contains containing shape shapes object objects color colors what how many "
    "where which question answer yes no"
).split()


PUNCTUATION = ["?", ":", ",", ".", "'"]


def build_tokenizer(words=DEFAULT_WORDS):
    """A lower-casing word-level tokenizer (punctuation split off) with OPT's special-token ids
    (<s>=0, <pad>=1, </s>=2, <unk>=3); a BOS is added in front of every text, as OPT's does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    words = {w.lower() for w in words} | set(PUNCTUATION)
    vocab = {token: i for i, token in enumerate(specials + sorted(words - set(specials)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # single spaces, no space before "?"
    core.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def build_processor(image_size: int = 16, num_query_tokens: int = 4, words=DEFAULT_WORDS):
    """A `Blip2Processor` (image processor + tokenizer) that adds the `<image>` placeholders."""
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    images = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor=images, tokenizer=build_tokenizer(words), num_query_tokens=num_query_tokens)
