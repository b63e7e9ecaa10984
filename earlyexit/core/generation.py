"""What every caller of `generate` shares: the new tokens' text, counting tokens up to the end
of sequence, timing a generation with its prompt pass, and a padded batch taken apart row by row."""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from earlyexit.core.accounting import after_end


def decode_new_tokens(backend, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    texts = backend.processor.tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
    return [text.strip() for text in texts]


class FirstCall(LogitsProcessor):
    """Notes the time of the first logits-processor call: the end of the prompt pass."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def timed(generate_fn, inputs, settings_kwargs):
    """(sequences, total seconds, prompt-pass seconds or None when the generator calls no
    logits processor) of one generation."""
    stamp = FirstCall()
    began = time.perf_counter()
    sequences = generate_fn(**inputs, **settings_kwargs, logits_processor=LogitsProcessorList([stamp]))
    ended = time.perf_counter()
    return sequences, ended - began, (stamp.at - began) if stamp.at is not None else None


def unpadded_rows(inputs: dict):
    """Each row of a left-padded batch as a batch of one without its padding; the other inputs
    (`pixel_values`, a family's other vision inputs) travel as that row of theirs."""
    for r in range(inputs["input_ids"].shape[0]):
        keep = inputs["attention_mask"][r].bool()
        row = {k: v[r:r + 1] for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        yield {**row, "input_ids": inputs["input_ids"][r:r + 1, keep],
               "attention_mask": inputs["attention_mask"][r:r + 1, keep]}


def count_tokens(sequences: torch.Tensor, prompt_length: int, eos_token_id) -> int:
    """Generated tokens up to and including each row's first end-of-sequence."""
    new = sequences[:, prompt_length:].cpu()
    return int((~after_end(new, eos_token_id)).sum())
