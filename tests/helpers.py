"""Shared test helpers (tiny models, images, reference computations)."""

import numpy as np
import torch
from PIL import Image


def make_backend(**kwargs):
    from earlyexit.backends.blip2_opt import Blip2OptBackend

    return Blip2OptBackend.from_tiny_config(**kwargs)


def make_images(count, seed=0, size=20):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def no_eos(backend):
    """Generation kwargs that forbid end-of-sequence, so every row runs to max_new_tokens."""
    return {"bad_words_ids": [[backend.language_model.generation_config.eos_token_id]]}


def full_forward_cache(backend, inputs, sequences, drop_last=True):
    """K/V of one plain full forward over prompt + generated tokens (all but the last, which
    generation never feeds back, unless `drop_last` is False)."""
    from transformers import DynamicCache

    prompt_length = inputs["input_ids"].shape[1]
    rows = sequences.shape[0]
    repeat = rows // inputs["input_ids"].shape[0]
    pixel_values = inputs["pixel_values"].repeat_interleave(repeat, 0)
    prompt_ids = inputs["input_ids"].repeat_interleave(repeat, 0)
    embeds = backend.decoder_inputs_embeds(pixel_values, prompt_ids)
    new_ids = sequences[:, prompt_length:sequences.shape[1] - int(drop_last)]
    embeds = torch.cat([embeds, backend.language_model.get_input_embeddings()(new_ids)], dim=1)
    mask = torch.cat([inputs["attention_mask"].repeat_interleave(repeat, 0),
                      torch.ones_like(new_ids)], dim=1)
    cache = DynamicCache()
    with torch.no_grad():
        backend.language_model(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True)
    return cache, mask
