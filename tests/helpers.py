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
    vision = {k: v.repeat_interleave(repeat, 0) for k, v in backend.vision_inputs(inputs).items()}
    embeds = backend.decoder_inputs_embeds(pixel_values, prompt_ids, **vision)
    new_ids = sequences[:, prompt_length:sequences.shape[1] - int(drop_last)]
    embeds = torch.cat([embeds, backend.language_model.get_input_embeddings()(new_ids)], dim=1)
    mask = torch.cat([inputs["attention_mask"].repeat_interleave(repeat, 0),
                      torch.ones_like(new_ids)], dim=1)
    cache = DynamicCache()
    with torch.no_grad():
        # positions from the mask, as generation has them (Llama's forward alone would count pads)
        backend.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=backend.position_ids(mask),
                               cache=cache, use_cache=True)
    return cache, mask


def assert_cache_matches_full_forward(cache, backend, inputs, sequences, drop_last=True, atol=1e-4):
    """Every layer holds, per row, a prefix of positions (catch-up) whose K/V equal one full
    forward's; returns how many positions lag behind in total."""
    reference, mask = full_forward_cache(backend, inputs, sequences, drop_last)
    lagging = 0
    for r in range(sequences.shape[0]):
        for j in range(backend.num_layers):
            held = int(cache.held[r, j])
            lagging += cache.total_length - held
            real = mask[r, :held].bool()  # pad positions' own states are never read
            for name in ("keys", "values"):
                got = getattr(cache.layers[j], name)[r, :, :held].transpose(0, 1)[real]
                want = getattr(reference.layers[j], name)[r, :, :held].transpose(0, 1)[real]
                torch.testing.assert_close(got, want, atol=atol, rtol=0)
    return lagging


def new_tokens(sequences, inputs):
    """What generation added behind the prompt (every family's layout: prompt ids, then new tokens)."""
    return sequences[:, inputs["input_ids"].shape[1]:]


# -- encoder-decoder (T5) caches --------------------------------------------------------------------
def full_forward_self_attention(backend, inputs, decoder_ids):
    """Self-attention K/V of every decoder layer of an encoder-decoder backend after one plain
    transformers forward over `decoder_ids` (rows: the inputs' rows repeated evenly, as beams are;
    the backend's vision inputs go with the pixels)."""
    from transformers import DynamicCache, EncoderDecoderCache

    repeat = decoder_ids.shape[0] // inputs["input_ids"].shape[0]
    rows = {k: v.repeat_interleave(repeat, 0) for k, v in inputs.items()}
    embeds = backend.decoder_inputs_embeds(rows["pixel_values"], rows["input_ids"], **backend.vision_inputs(rows))
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        backend.language_model(inputs_embeds=embeds, attention_mask=rows["attention_mask"],
                               decoder_input_ids=decoder_ids, cache=cache, use_cache=True)
    return cache.self_attention_cache


def assert_decoder_cache_matches_full_forward(cache, backend, inputs, decoder_ids, atol=1e-9):
    """Every decoder layer holds, per row, a prefix of positions whose K/V equal one full forward's;
    returns how many positions lag behind in total."""
    reference = full_forward_self_attention(backend, inputs, decoder_ids)
    lagging = 0
    for r in range(decoder_ids.shape[0]):
        for j in range(backend.num_layers):
            held = int(cache.held[r, j])
            assert held >= 1
            lagging += cache.total_length - held
            for name in ("keys", "values"):
                torch.testing.assert_close(getattr(cache.layers[j], name)[r, :, :held],
                                           getattr(reference.layers[j], name)[r, :, :held], atol=atol, rtol=0)
    return lagging


def fed_decoder_ids(backend, sequences, inputs):
    """The decoder ids generation fed: start token, then every new token but the last."""
    new = new_tokens(sequences, inputs)[:, :-1]
    start = torch.full_like(new[:, :1], backend.text_config.decoder_start_token_id)
    return torch.cat([start, new], 1)


def make_tiny_clip(folder):
    """A tiny random CLIP (character-level BPE tokenizer) saved as a hub-style local folder."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "?,.":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.BPEDecoder(suffix="</w>")
    tokenizer = CLIPTokenizerFast(tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))


def assert_exit_slots_match_running_the_modules(model, inputs, sequences, modules, atol):
    """Each attending exit module's cache slot holds, per row and for every position the layer
    at its depth holds, exactly what running the module over the full forward's hidden states
    at that depth writes (keys and values)."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    backend, cache = model.backend, model.last_cache
    _, mask = full_forward_cache(backend, inputs, sequences)
    ids = inputs["input_ids"]
    embeds = torch.cat([backend.decoder_inputs_embeds(inputs["pixel_values"], ids, **backend.vision_inputs(inputs)),
                        backend.language_model.get_input_embeddings()(sequences[:, ids.shape[1]:-1])], 1)
    with torch.no_grad():
        positions = backend.position_ids(mask)
        hidden = backend.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                        output_hidden_states=True).hidden_states
        for e, (module, depth) in enumerate(zip(modules, model.strategy.exit_layers)):
            reference = DynamicCache()
            layer_mask = create_causal_mask(config=backend.text_config, inputs_embeds=hidden[depth],
                                            attention_mask=mask, cache=None)
            backend.run_layer(module, hidden[depth], attention_mask=layer_mask, position_ids=positions, cache=reference)
            slot = backend.num_layers + e
            for r in range(sequences.shape[0]):
                held = int(cache.held[r, depth])  # the slot holds at least what layer `depth` holds
                real = mask[r, :held].bool()
                for name in ("keys", "values"):
                    got = getattr(cache.layers[slot], name)[r, :, :held].transpose(0, 1)[real]
                    want = getattr(reference.layers[slot], name)[r, :, :held].transpose(0, 1)[real]
                    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def spy_engine_class():
    from earlyexit.training import PlainEngine

    class SpyEngine(PlainEngine):
        """Records, for each optimiser step, which groups' parameters changed."""

        def __init__(self, groups, config):
            super().__init__(groups, config)
            self.calls = []

        def optimize(self, group, loss):
            before = {g: {n: p.detach().clone() for n, p in params.items()} for g, params in self.groups.items()}
            value = super().optimize(group, loss)
            changed = {g for g, params in self.groups.items()
                       if any(not torch.equal(before[g][n], p) for n, p in params.items())}
            self.calls.append((group, changed))
            return value

    return SpyEngine


SpyEngine = spy_engine_class()


def launcher_env(**extra) -> dict:
    """The environment for a child torch.distributed launch: one thread per process and none of
    this process's rank variables."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
