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


def fixed(registry, backend, layer, every):
    """The `fixed` strategy: leave at `layer` on every `every`-th token."""
    cls = registry.strategy("fixed")
    return cls(backend, [layer], cls.Config(every=every))


def new_tokens(sequences, inputs):
    """What generation added behind the prompt (every family's layout: prompt ids, then new tokens)."""
    return sequences[:, inputs["input_ids"].shape[1]:]


def assert_the_instruction_reaches_the_q_former(backend, batch, image):
    """InstructBLIP: two instructions give other image features for the same `image`; swapping only
    the Q-Former's instructions between the rows of `batch` (prompts padded) changes the engine's
    generation, which stays the backbone's own; without them the engine refuses in one line."""
    import pytest

    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.errors import ConfigError

    asked = backend.prepare_inputs([image, image], ["a red circle", "how many shapes"])
    torch.testing.assert_close(asked["pixel_values"][0], asked["pixel_values"][1])
    two, _ = backend.image_features(asked["pixel_values"], **backend.vision_inputs(asked))
    assert (two[0] - two[1]).abs().max() > 1e-2, "another instruction should give other features for the same image"

    # the language model's prompt kept, only the Q-Former's instructions swapped between rows
    swapped = {**batch, "qformer_input_ids": batch["qformer_input_ids"].flip(0),
               "qformer_attention_mask": batch["qformer_attention_mask"].flip(0)}
    settings = dict(max_new_tokens=8, do_sample=False, **no_eos(backend))
    original = EarlyExitForCausalLM(backend).generate(**batch, **settings)
    changed = EarlyExitForCausalLM(backend).generate(**swapped, **settings)
    assert not torch.equal(changed, original)
    assert torch.equal(changed, backend.plain_generate(**swapped, **settings))

    without = {k: v for k, v in batch.items() if not k.startswith("qformer_")}
    with pytest.raises(ConfigError, match="reads the instruction"):
        EarlyExitForCausalLM(backend).generate(**without, max_new_tokens=2)


def train_exits_then_reload(registry, build, name, options, scenes, folder):
    """Train `name`'s exits (layers 1 and 2) on `build()`, a tiny backbone taking 64-pixel images,
    and check: the exits move, the backbone does not, some token leaves early, and the adapter saved
    in `folder` reloads onto a fresh `build()` to the same tokens and exit layers. Returns the
    trained strategy."""
    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.models.adapters import load_exits, save_exits
    from earlyexit.training.exits import train_exits

    backend = build()
    backbone = {n: p.detach().clone() for n, p in backend.model.state_dict().items()}
    cls = registry.strategy(name)
    strategy = cls(backend, [1, 2], cls.Config(epochs=1, batch_size=4, learning_rate=1e-3, **options))
    before = {n: p.detach().clone() for n, p in strategy.exit_modules().state_dict().items()}
    losses = train_exits(strategy, backend, scenes, str(folder / "run"), progress=False)
    assert losses and all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in losses)
    after = strategy.exit_modules().state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before), "training should move the exits"
    assert all(torch.equal(backbone[n], t) for n, t in backend.model.state_dict().items())  # frozen backbone

    inputs = backend.prepare_inputs(make_images(2, size=64), ["", "a red"])
    settings = dict(max_new_tokens=6, do_sample=False, **no_eos(backend))
    model = EarlyExitForCausalLM(backend, strategy)
    expected = model.generate(**inputs, **settings)
    expected_layers = model.last_trace.exit_layers
    assert (expected_layers[:, 1:] < backend.num_layers).any(), "some token should leave early"

    save_exits(strategy, str(folder / "exits"), backbone_name="micro")
    reloaded = load_exits(str(folder / "exits"), build(), registry)
    model = EarlyExitForCausalLM(reloaded.backend, reloaded)
    assert torch.equal(model.generate(**inputs, **settings), expected)
    assert torch.equal(model.last_trace.exit_layers, expected_layers)
    return strategy


# -- encoder-decoder (T5) caches --------------------------------------------------------------------
def assert_encoder_decoder_exits_off_match_transformers(registry, backend, inputs, settings):
    """With exits off, and with exits consulted but never taken, an encoder-decoder backend's engine
    gives the tokens of transformers' own `generate` (which returns the decoder's start token, then the
    new tokens) behind the prompt's ids, as every family's; so does `plain_generate`."""
    from earlyexit.core.engine import EarlyExitForCausalLM

    own = backend.model.generate(**inputs, **settings)
    assert (own[:, 0] == backend.text_config.decoder_start_token_id).all()
    assert len({tuple(row) for row in own[:, 1:].tolist()}) > 1
    sequences = EarlyExitForCausalLM(backend).generate(**inputs, **settings)
    assert torch.equal(sequences[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(new_tokens(sequences, inputs), own[:, 1:])
    assert torch.equal(backend.plain_generate(**inputs, **settings), sequences)
    cls = registry.strategy("confidence")  # a threshold no exit can reach
    model = EarlyExitForCausalLM(backend, cls(backend, [1], cls.Config(threshold=1.5)))
    assert torch.equal(model.generate(**inputs, **settings), sequences)
    layers = model.last_trace.exit_layers
    assert ((layers == backend.num_layers) | (layers == -1)).all() and (layers == backend.num_layers).any()


def assert_teacher_forcing_gives_the_models_own_loss(backend, batch, atol=1e-9):
    """Exit training's teacher-forced features of a training `batch`, read out at full depth, give
    exactly the loss of the model's own forward on that batch."""
    from earlyexit.training.features import backbone_features

    with torch.no_grad():
        loss = backend.model(**batch).loss
        features = backbone_features(backend, batch)
    where = features.targets != -100
    by_hand = torch.nn.functional.cross_entropy(features.final_logits[:, :-1][where], features.targets[where])
    torch.testing.assert_close(by_hand, loss, atol=atol, rtol=0)


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
    from earlyexit.training.loop import PlainEngine

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


def rms_norm_by_hand(norm, x):
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def rope_by_hand(x, positions, theta):
    """Rotate (rows, heads, 1, dim) by each row's position: pairs (i, i + dim/2) turn by
    position / theta^(2i/dim)."""
    dim = x.shape[-1]
    angle = positions[:, None].double() / theta ** (torch.arange(0, dim, 2).double() / dim)
    cos, sin = angle.cos().repeat(1, 2).float(), angle.sin().repeat(1, 2).float()
    turned = torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], -1)
    return x * cos[:, None, None] + turned * sin[:, None, None]


def assert_propagate_projects_rotated_grouped_kv(backend, strategy, inputs, exit_depth: int) -> None:
    """Under `propagate`, the K/V a Llama-family cache holds for a token that left after
    `exit_depth` layers are every deeper layer's RMSNorm + K/V projection of the exit state,
    keys rotated by the row's own position (left padding), grouped-query heads as stored."""
    from earlyexit.core.engine import EarlyExitForCausalLM

    model = EarlyExitForCausalLM(backend, strategy, kv_policy="propagate")
    states = []  # output of the last layer run before the exit, per forward
    hook = model.layers[exit_depth - 1].register_forward_hook(lambda m, a, out: states.append(out))
    try:
        model.generate(**inputs, max_new_tokens=7, do_sample=False, **no_eos(backend))
    finally:
        hook.remove()
    cache, config = model.last_cache, backend.text_config
    rows, prompt = inputs["input_ids"].shape
    exited = [t for t, r in enumerate(model.last_trace.steps) if r.depth == exit_depth]
    assert exited
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    assert heads < config.num_attention_heads
    for t in exited:
        column = prompt + t - 1  # step t feeds the token generated at step t-1
        positions = cache.positions[:, column]
        assert (positions > 0).all() and len(set(positions.tolist())) > 1  # per-row positions (left padding)
        exit_state = states[t][:, -1:]
        for j in range(exit_depth, backend.num_layers):
            layer = model.layers[j]
            x = rms_norm_by_hand(layer.input_layernorm, exit_state)
            keys = (x @ layer.self_attn.k_proj.weight.t()).view(rows, 1, heads, dim).transpose(1, 2)
            values = (x @ layer.self_attn.v_proj.weight.t()).view(rows, 1, heads, dim).transpose(1, 2)
            keys = rope_by_hand(keys, positions, config.rope_parameters["rope_theta"])
            torch.testing.assert_close(cache.layers[j].keys[:, :, column:column + 1], keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.layers[j].values[:, :, column:column + 1], values, atol=1e-5, rtol=1e-5)


def fixed_exit(registry, backend, layer: int, every: int):
    """The `fixed` strategy: leave at `layer` on every `every`-th token."""
    cls = registry.strategy("fixed")
    return cls(backend, [layer], cls.Config(every=every))


def assert_catchup_gqa_cache_is_one_full_forward(registry, backend, inputs, every: int) -> None:
    """Greedy with `fixed` exits at layer 2 under `catchup` on a grouped-query model of 6 layers:
    rows leave at 2 and go the full depth, caught-up positions are filled, the cache holds the K/V
    heads only, and every layer's cache equals one full forward."""
    from earlyexit.core.engine import EarlyExitForCausalLM

    model = EarlyExitForCausalLM(backend, fixed_exit(registry, backend, 2, every), kv_policy="catchup")
    sequences = model.generate(**inputs, max_new_tokens=9, do_sample=False, **no_eos(backend))
    layers = model.last_trace.exit_layers
    assert (layers == 2).any() and (layers == backend.num_layers).any()
    assert sum(r.catchup_positions for r in model.last_trace.steps) > 0
    assert model.last_cache.layers[0].keys.shape[1] == backend.text_config.num_key_value_heads
    assert_cache_matches_full_forward(model.last_cache, backend, inputs, sequences)


def assert_catchup_cache_is_one_full_forward_under_beams(registry, backend, inputs) -> None:
    """3 beams with `fixed` exits at layer 3: at every step, the cache (in beam order) equals one
    full forward of the running sequences."""
    from test_kv_policies import CacheSnapshots
    from transformers import LogitsProcessorList

    from earlyexit.core.engine import EarlyExitForCausalLM

    model = EarlyExitForCausalLM(backend, fixed_exit(registry, backend, 3, 2), kv_policy="catchup")
    cache = model.new_cache()
    snapshots = CacheSnapshots(cache)
    model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False, cache=cache,
                   logits_processor=LogitsProcessorList([snapshots]), **no_eos(backend))
    assert (model.last_trace.exit_layers == 3).any()
    for running, snapshot in snapshots.snapshots[1:]:
        assert_cache_matches_full_forward(snapshot, backend, inputs, running, drop_last=False)


def assert_vocabulary_readout_is_those_columns(backend) -> None:
    """`backend.logits(h, vocabulary)` is the full read-out's columns for those tokens, and its
    parameter count is the head's rows for them plus the pre-head part."""
    dtype = next(backend.language_model.parameters()).dtype
    hidden = torch.randn(3, backend.text_config.hidden_size, dtype=dtype)
    vocabulary = torch.tensor([7, 2, 30, 11])
    with torch.no_grad():
        torch.testing.assert_close(backend.logits(hidden, vocabulary), backend.logits(hidden)[:, vocabulary])
    head = backend.language_model.lm_head.weight
    assert backend.head_param_count(4) == backend.head_param_count() - head.numel() + 4 * head.shape[1]


def speculative_matches(backend, strategy, inputs, draft_exit, draft_length, max_new_tokens=12):
    """Self-speculative decoding over `strategy`'s exits gives the plain backbone's tokens, row
    for row; returns the decoder's statistics."""
    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.core.speculative import SelfSpeculativeDecoder

    expected = backend.plain_generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    decoder = SelfSpeculativeDecoder(EarlyExitForCausalLM(backend, strategy), draft_exit, draft_length)
    got = decoder.generate(**inputs, max_new_tokens=max_new_tokens)
    prompt = inputs["input_ids"].shape[1]
    for r in range(expected.shape[0]):
        want = expected[r, prompt:]
        assert torch.equal(got[r, prompt:prompt + len(want)], want)
    return decoder.last_stats


SAMPLING = dict(max_new_tokens=4, do_sample=True, temperature=0.7, top_k=0)


def seeded_plain_samples(backend, rows: int, image_seed: int):
    """`rows` copies of one image under the prompt "a", and the full model's own sampled tokens
    after it (`SAMPLING`, torch seed 0): (inputs, prompt length, those tokens)."""
    inputs = backend.prepare_inputs(make_images(1, seed=image_seed) * rows, ["a"] * rows)
    prompt = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    return inputs, prompt, backend.plain_generate(**inputs, **SAMPLING)[:, prompt:]
