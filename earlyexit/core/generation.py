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


def synchronize(device) -> None:
    """Wait until `device` has run everything queued on it (CUDA launches return at once); a
    no-op on the CPU, where every op has finished when it returns."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def input_device(inputs: dict) -> torch.device:
    """The device of the first tensor in `inputs` (the CPU when there is none)."""
    return next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))


class FirstCall(LogitsProcessor):
    """Notes the time of the first logits-processor call: the end of the prompt pass, once the
    device has finished it (the host reaches the call as soon as the prompt pass is launched)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            synchronize(scores.device)
            self.at = time.perf_counter()
        return scores


def timed(generate_fn, inputs, settings_kwargs, warmup: int = 0):
    """(sequences, total seconds, prompt-pass seconds or None when the generator calls no
    logits processor) of one generation, after `warmup` untimed calls on the same inputs (the
    first call on a GPU pays for kernel selection and allocator growth). The clock is read only
    when the device has finished what came before."""
    for _ in range(warmup):
        generate_fn(**inputs, **settings_kwargs)
    device = input_device(inputs)
    stamp = FirstCall()
    synchronize(device)
    began = time.perf_counter()
    sequences = generate_fn(**inputs, **settings_kwargs, logits_processor=LogitsProcessorList([stamp]))
    synchronize(device)
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


def end_tokens(generation_config) -> set[int]:
    """The end-of-sequence token ids of a generation config, as a set (none when it has none)."""
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))


def count_tokens(sequences: torch.Tensor, prompt_length: int, eos_token_id) -> int:
    """Generated tokens up to and including each row's first end-of-sequence."""
    new = sequences[:, prompt_length:].cpu()
    return int((~after_end(new, eos_token_id)).sum())
