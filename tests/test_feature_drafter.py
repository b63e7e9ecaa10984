"""The feature drafter (EAGLE family) and the hybrid (corpus first, feature otherwise): greedy
speculative decoding with them is the full model's own tokens, row for row, and the drafter's
own cache, built a round at a time, holds what one pass over the whole sequence computes."""

import pytest
import torch
from helpers import SAMPLING, make_backend, make_images, seeded_plain_samples
from test_drafters import PROMPTS, assert_drafter_matches, chi_square_p, own_tokens

from earlyexit.core.drafter import load_drafter, save_drafter
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.core.generation import unpadded_rows
from earlyexit.core.speculative import BatchedDraftVerifyDecoder, DraftVerifyDecoder
from earlyexit.data.scenes import SceneConfig, load_scenes
from earlyexit.data.tasks import task_of
from earlyexit.drafters.feature import FeatureDrafter, HybridDrafter
from earlyexit.errors import ConfigError, CorruptAdapterError
from earlyexit.training.drafters import backbone_token_outputs

QUIET = dict(log=lambda *_: None)
SMALL = dict(epochs=6, vocabulary=64, learning_rate=3e-3, draft_length=3)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_scenes("train", task="caption", config=SceneConfig(train=24, val=4, test=4),
                       cache_dir=tmp_path_factory.mktemp("scenes"))


def fitted(cls, backend, scenes, **config):
    outputs, _ = backbone_token_outputs(backend, scenes, batch_size=8, max_new_tokens=10)
    drafter = cls(backend, cls.Config(**{**SMALL, **config}))
    drafter.fit(outputs, samples=scenes, **QUIET)
    return drafter


@pytest.fixture(scope="module")
def opt():
    return make_backend(seed=3, num_layers=4)


@pytest.fixture(scope="module")
def feature(opt, scenes):
    return fitted(FeatureDrafter, opt, scenes)


@pytest.fixture(scope="module")
def hybrid(opt, scenes):
    return fitted(HybridDrafter, opt, scenes)


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("which", ["feature", "hybrid"])
def test_feature_drafts_are_verified_into_the_full_models_tokens(request, opt, rows, which):
    drafter = request.getfixturevalue(which)
    inputs = opt.prepare_inputs(make_images(rows, seed=21), PROMPTS[:rows])  # rows of different lengths
    stats = assert_drafter_matches(opt, drafter, inputs)
    assert stats.drafted > 0


class Recording(DraftVerifyDecoder):
    """Records each round's (drafts, accepted)."""

    def _accept(self, cache, tokens, drafts, verified, budget, eos, stats):
        before = stats.accepted
        kept = DraftVerifyDecoder._accept(cache, tokens, drafts, verified, budget, eos, stats)
        self.rounds.append((len(drafts), stats.accepted - before))
        return kept


def test_rounds_where_nothing_and_everything_is_accepted_are_exact(opt, scenes, hybrid):
    # the scenes' own images: the corpus holds their captions, so whole rounds are accepted; random
    # images under odd prompts leave it to the feature drafter of a micro model, often wrong

    own = opt.prepare_inputs([s.load_image() for s in scenes.samples[:4]],
                             [task_of(scenes).prompt(s, opt) for s in scenes.samples[:4]])
    odd = opt.prepare_inputs(make_images(4, seed=25), PROMPTS[4:])
    from_corpus, from_feature = hybrid.from_corpus, hybrid.from_feature
    decoder = Recording(EarlyExitForCausalLM(opt), hybrid)
    decoder.rounds = []
    for inputs in (own, odd):
        got = decoder.generate(**inputs, max_new_tokens=10)
        _, tokens = own_tokens(opt, inputs, 10)
        prompt = inputs["input_ids"].shape[1]
        for r, want in enumerate(tokens):
            assert got[r, prompt:prompt + len(want)].tolist() == want
    assert hybrid.from_corpus > from_corpus and hybrid.from_feature > from_feature  # both drafted
    assert any(drafts and accepted == drafts for drafts, accepted in decoder.rounds)  # all kept
    assert any(drafts and accepted == 0 for drafts, accepted in decoder.rounds)  # none kept


def test_the_drafters_own_cache_is_one_pass_over_the_whole_sequence(opt, feature):
    """Each round the drafter crops its own drafts and takes in the verified states; the state it
    drafts from must equal its layer run once over the final sequence, teacher forced."""
    inputs = opt.prepare_inputs(make_images(1, seed=22), ["a red circle"])
    seen = []
    draft = feature.draft

    def spy(state, position, count):
        seen.append((position, state[-1].clone()))
        return draft(state, position, count)

    feature.draft = spy
    try:
        model = EarlyExitForCausalLM(opt)
        sequence = DraftVerifyDecoder(model, feature).generate(**inputs, max_new_tokens=12)
    finally:
        del feature.draft
    assert len(seen) > 2
    # the whole sequence in one prompt pass: its top states and embedded inputs at every position
    prompt = inputs["input_ids"].shape[1]
    embeds = opt.decoder_inputs_embeds(inputs["pixel_values"], inputs["input_ids"])
    new = sequence[:, prompt:-1]
    embeds = torch.cat([embeds, opt.language_model.get_input_embeddings()(new)], 1)
    model.keep_states = True
    with torch.no_grad():
        model.prompt_pass(embeds, torch.ones(embeds.shape[:2], dtype=torch.long), model.new_cache())
        top, embedded = model.kept_top[0], model.kept_inputs[0]
        feature.start()
        at = torch.arange(top.shape[0])
        last = opt.embed(sequence[:, -1:], None, at[-1:][None] + 1)[0]
        whole = feature._run(top, torch.cat([embedded[1:], last]), at)
    for position, state in seen:  # the predicted state after position - 1: row position - 1 of the pass
        assert torch.allclose(state, whole[position - 1], atol=1e-4), position


def test_llama_with_grouped_query_attention(scenes):
    from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend

    backend = Minigpt4LlamaBackend.from_tiny_config(seed=4, num_layers=4, hidden_size=48, num_heads=6,
                                                    num_kv_heads=2, num_query_tokens=6)
    for cls in (FeatureDrafter, HybridDrafter):
        drafter = fitted(cls, backend, scenes)
        for rows in (1, 5):
            inputs = backend.prepare_inputs(make_images(rows, seed=23), PROMPTS[:rows])
            assert assert_drafter_matches(backend, drafter, inputs, 10).drafted > 0


def test_a_t5_backbone_is_refused_in_one_line():
    from earlyexit.backends.blip2_flant5 import Blip2FlanT5Backend

    backend = Blip2FlanT5Backend.from_tiny_config(seed=2, num_layers=3, hidden_size=32, num_heads=4)
    with pytest.raises(ConfigError, match="decoder-only backbone.*--drafter corpus"):
        FeatureDrafter(backend)


def test_saved_alone_and_loaded_it_drafts_the_same(registry, opt, feature, hybrid, tmp_path):
    inputs = opt.prepare_inputs(make_images(3, seed=24), PROMPTS[:3])
    for drafter in (feature, hybrid):
        folder = tmp_path / drafter.name
        folder.mkdir()
        save_drafter(drafter, str(folder))
        again = load_drafter(registry, f"{drafter.name}:{folder}", opt)
        model = EarlyExitForCausalLM(opt)
        first = DraftVerifyDecoder(model, drafter)
        second = DraftVerifyDecoder(model, again)
        assert torch.equal(first.generate(**inputs, max_new_tokens=10), second.generate(**inputs, max_new_tokens=10))
        assert first.last_stats == second.last_stats  # the same drafts, accepted alike
    other = make_backend(seed=3, num_layers=4, hidden_size=48)  # another backbone's width
    with pytest.raises(CorruptAdapterError, match="not this backbone's feature drafter"):
        load_drafter(registry, f"feature:{tmp_path / 'feature'}", other)
    (tmp_path / "feature" / "feature_drafter.safetensors").write_bytes(b"not tensors")
    with pytest.raises(CorruptAdapterError, match="not this backbone's feature drafter"):
        load_drafter(registry, f"feature:{tmp_path / 'feature'}", opt)


def test_it_learns_the_backbones_next_tokens(opt, scenes):
    """Training lowers the drafter's loss and raises how often its first draft is the backbone's token."""
    logs = []
    untrained = fitted(FeatureDrafter, opt, scenes, epochs=1, learning_rate=1e-9)
    drafter = FeatureDrafter(opt, FeatureDrafter.Config(**{**SMALL, "epochs": 12}))
    outputs, _ = backbone_token_outputs(opt, scenes, batch_size=8, max_new_tokens=10)
    drafter.fit(outputs, samples=scenes, log=logs.append)
    losses = [float(line.rsplit("loss ", 1)[1]) for line in logs if "loss" in line]
    assert losses[-1] < losses[0]

    inputs = opt.prepare_inputs([s.load_image() for s in scenes.samples[:8]],
                                [task_of(scenes).prompt(s, opt) for s in scenes.samples[:8]])
    rates = []
    for used in (untrained, drafter):
        decoder = DraftVerifyDecoder(EarlyExitForCausalLM(opt), used)
        decoder.generate(**inputs, max_new_tokens=10)
        rates.append(decoder.last_stats.acceptance_rate)
    assert rates[1] > rates[0]


def test_nothing_to_learn_from_is_one_line(opt, scenes):
    drafter = FeatureDrafter(opt, FeatureDrafter.Config(**SMALL))
    with pytest.raises(ConfigError, match="nothing to learn from"):
        drafter.fit([[]] * len(scenes), samples=scenes, **QUIET)
    with pytest.raises(ConfigError, match="samples"):
        drafter.fit([[1, 2]], **QUIET)


@pytest.mark.parametrize("cls", [DraftVerifyDecoder, BatchedDraftVerifyDecoder], ids=["row by row", "the batch at once"])
def test_seeded_sampling_with_the_feature_drafter_draws_what_the_full_model_draws(opt, feature, cls):
    """Sampled speculative decoding hands the drafter the sampled token's state each round; the
    tokens are distributed as the full model's own sampling (chi-square per position)."""
    rows = 600
    inputs, prompt, plain = seeded_plain_samples(opt, rows, image_seed=26)
    decoder = cls(EarlyExitForCausalLM(opt), feature)
    torch.manual_seed(1)
    drawn = decoder.generate(**inputs, **SAMPLING)[:, prompt:]
    assert decoder.last_stats.drafted >= rows and decoder.last_stats.accepted > 0
    for position in (1, 2, 3):
        assert chi_square_p(plain[:, position].tolist(), drawn[:, position].tolist()) > 1e-3


# -- a batch drafts at once ---------------------------------------------------------------------------
class Spied:
    """Records each `draft_batch` call's states, positions and counts (what every row drafts from)."""

    def __init__(self, drafter):
        self.drafter, self.calls, self.original = drafter, [], drafter.draft_batch

    def __enter__(self):
        def spy(state, position, counts, first_logits=None):
            self.calls.append((state.clone(), position.clone(), list(counts)))
            return self.original(state, position, counts, first_logits)

        self.drafter.draft_batch = spy
        return self

    def __exit__(self, *error):
        del self.drafter.draft_batch

    def by_row(self, rows: int) -> list[list]:
        """Row r's (position, state) at every round it drafted in."""
        out = [[] for _ in range(rows)]
        for state, position, counts in self.calls:
            for r in range(len(counts)):
                if counts[r] > 0:
                    out[r if len(counts) > 1 else 0].append((int(position[r]), state[r]))
        return out


@pytest.mark.parametrize("which", ["feature", "hybrid"])
def test_a_batch_drafts_together_what_each_row_drafts_alone(request, opt, which):
    """One drafter cache for the whole batch (rows of different lengths, left-padded prompts,
    ragged acceptance): every row drafts from the state it has alone, so it drafts, and keeps,
    what it does alone; and the batch never falls back to decoding row by row."""
    drafter = request.getfixturevalue(which)
    feature = drafter if which == "feature" else drafter.feature
    inputs = opt.prepare_inputs(make_images(6, seed=27), PROMPTS[:6])
    model = EarlyExitForCausalLM(opt)
    together = BatchedDraftVerifyDecoder(model, drafter)
    assert together.batches
    together._one = None  # the row-by-row path: calling it would fail
    with Spied(feature) as batched:
        batch = together.generate(**inputs, max_new_tokens=12)
    del together._one
    alone_states = []
    for row in unpadded_rows(inputs):
        with Spied(feature) as one:
            DraftVerifyDecoder(model, drafter).generate(**row, max_new_tokens=12)
        alone_states.append(one.by_row(1)[0])
    rows = DraftVerifyDecoder(model, drafter).generate(**inputs, max_new_tokens=12)
    assert torch.equal(batch, rows)
    assert together.last_stats.drafted > 0 and 0 < together.last_stats.accepted < together.last_stats.drafted
    for r, states in enumerate(batched.by_row(6)):
        assert [p for p, _ in states] == [p for p, _ in alone_states[r]], r
        for (_, got), (_, want) in zip(states, alone_states[r]):
            assert torch.allclose(got, want[0] if want.dim() > 1 else want, atol=1e-4), r
    alone = DraftVerifyDecoder(model, drafter)
    alone.generate(**inputs, max_new_tokens=12)
    assert together.last_stats == alone.last_stats  # the same drafts, accepted alike


def test_chained_drafts_enter_at_their_own_positions(opt, scenes, feature):
    """A chained draft is embedded at the position it would take (OPT's learned positions tell):
    where the full model kept it, its embedding is the one the full model itself gives there."""
    inputs = opt.prepare_inputs([scenes.samples[0].load_image()], [task_of(scenes).prompt(scenes.samples[0], opt)])
    chained, run, drafting = [], feature._run, [False]

    def spy(tops, inputs, positions, real=None):
        if drafting[0]:
            chained.append((inputs[0, 0].clone(), int(positions[0, 0])))
        return run(tops, inputs, positions, real)

    draft_batch = feature.draft_batch

    def drafts(*args, **kwargs):
        drafting[0] = True
        try:
            return draft_batch(*args, **kwargs)
        finally:
            drafting[0] = False

    feature._run, feature.draft_batch = spy, drafts
    try:
        model = EarlyExitForCausalLM(opt)
        sequence = DraftVerifyDecoder(model, feature).generate(**inputs, max_new_tokens=12)
    finally:
        del feature._run, feature.draft_batch
    prompt = inputs["input_ids"].shape[1]
    embeds = opt.decoder_inputs_embeds(inputs["pixel_values"], inputs["input_ids"])
    embeds = torch.cat([embeds, opt.language_model.get_input_embeddings()(sequence[:, prompt:])], 1)
    model.keep_states = True
    with torch.no_grad():
        model.prompt_pass(embeds, torch.ones(embeds.shape[:2], dtype=torch.long), model.new_cache())
    embedded = model.kept_inputs[0]  # the full model's own embedded input at every position
    kept = [p for x, p in chained if p + 1 < len(embedded) and torch.allclose(x, embedded[p + 1], atol=1e-6)]
    assert chained and kept, "no chained draft was embedded as the full model embeds it where it was kept"
