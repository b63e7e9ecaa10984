"""What drafters learn from: the frozen backbone's own greedy outputs, as token ids."""

from __future__ import annotations

import torch

from earlyexit.core.generation import end_tokens
from earlyexit.data.tasks import task_of
from earlyexit.training.exits import shared_work


def backbone_token_outputs(backend, dataset, batch_size: int = 32, max_new_tokens: int = 20,
                           progress: bool = False) -> tuple[list[list[int]], list[bool]]:
    """The backbone's greedy tokens after each sample's prompt, cut after the first end token,
    and whether each ended there (rather than at `max_new_tokens`). Several processes share the
    batches (`shared_work`), so every rank gets the same lists."""
    task = task_of(dataset)
    ends = end_tokens(backend.language_model.generation_config)

    @torch.no_grad()
    def write(batch, index: int) -> list[tuple[list[int], bool]]:
        inputs = backend.prepare_inputs([s.load_image() for s in batch],
                                        [task.prompt(s, backend, room=max_new_tokens) for s in batch])
        sequences = backend.plain_generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        outputs = []
        for row in sequences[:, inputs["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in ends), None)
            outputs.append((row[:end + 1], True) if end is not None else (row, False))
        return outputs

    pairs = shared_work(dataset.samples, write, batch_size, "backbone tokens", progress)
    return [tokens for tokens, _ in pairs], [ended for _, ended in pairs]
