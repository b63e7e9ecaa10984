"""Drafters: the suffix index returns the longest match, and speculative decoding with any
drafter gives the full model's tokens, row for row, whatever the drafts are."""

import pytest
import torch
from helpers import SAMPLING, make_backend, make_images, seeded_plain_samples

from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.core.speculative import (BatchedDraftVerifyDecoder, DraftVerifyDecoder, SelfSpeculativeDecoder,
                                        speculative_decoder)
from earlyexit.drafters.corpus import CorpusDrafter
from earlyexit.drafters.suffix_index import SuffixIndex
from earlyexit.errors import ConfigError

PROMPTS = ["a red circle", "two", "what color is the small square", "", "a", "the big blue one on the left",
           "x y", "what"]  # eight lengths: left padding differs per row


# -- the suffix index ---------------------------------------------------------------------------
@pytest.fixture
def index():
    built = SuffixIndex(depth=6)
    for sequence in ([1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 9], [7, 2, 3, 4]):
        built.add(sequence)
    return built


def test_the_longest_suffix_the_corpus_holds_is_matched(index):
    assert index.longest_match([9, 9, 2, 3])[0] == 2  # [2, 3]; [9, 2, 3] never occurs
    assert index.longest_match([7, 2])[0] == 3  # the start marker, 7, 2: a sequence's beginning
    assert index.longest_match([8]) == (0, None)
    assert index.longest_match([1, 2, 3], max_match=2)[0] == 2


def test_the_continuation_follows_the_longest_match_not_a_shorter_one(index):
    # after [2, 3] the corpus goes on with 4 twice and 9 once; after [START, 1, 2, 3] 4 and 9 once each
    assert index.continuation([7, 2, 3], 1)[0] == [4]  # [START, 7, 2, 3] -> 4 only
    drafts, shares = index.continuation([1], 3)
    assert drafts == [2, 3, 4] and shares == [1.0, 2 / 3, 0.5]  # 3 of 3 go on with 2; then 3 (2 of 3); tie 4/9
    assert index.continuation([8], 3) == ([], [])


def test_drafting_stops_where_the_corpus_share_falls_below_tau(index):
    assert index.continuation([1], 3, stop_below=0.6)[0] == [2, 3]  # 4 has share 0.5
    assert index.continuation([1, 2], 3, stop_below=0.7)[0] == []  # 3 has share 2/3


def test_past_the_stored_depth_the_match_is_sought_again():
    index = SuffixIndex(depth=3)
    index.add([1, 2, 3, 4, 5, 6])
    assert index.continuation([1, 2], 4)[0] == [3, 4, 5, 6]  # each hop re-matches on the tokens so far


def test_a_bad_drafter_config_is_refused():
    with pytest.raises(ConfigError, match="draft_length"):
        CorpusDrafter.Config(draft_length=0)
    with pytest.raises(ConfigError, match="stop_below"):
        CorpusDrafter.Config(stop_below=1.5)
    with pytest.raises(ConfigError, match="stop_below"):
        CorpusDrafter.Config(stop_below=float("nan"))


# -- speculative decoding with a corpus drafter is the full model ----------------------------------
def own_tokens(backend, inputs, max_new_tokens):
    eos = backend.language_model.generation_config.eos_token_id
    sequences = backend.plain_generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    outputs = []
    for row in sequences[:, inputs["input_ids"].shape[1]:].tolist():
        outputs.append(row[:row.index(eos) + 1] if eos in row else row)
    return sequences, outputs


def assert_drafter_matches(backend, drafter, inputs, max_new_tokens=12):
    expected = backend.plain_generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    decoder = speculative_decoder(EarlyExitForCausalLM(backend), drafter)
    assert isinstance(decoder, BatchedDraftVerifyDecoder)
    got = decoder.generate(**inputs, max_new_tokens=max_new_tokens)
    prompt = inputs["input_ids"].shape[1]
    for r in range(expected.shape[0]):
        want = expected[r, prompt:]
        eos = backend.language_model.generation_config.eos_token_id
        want = want[:(want == eos).nonzero()[0, 0] + 1] if (want == eos).any() else want
        assert got[r, prompt:prompt + len(want)].tolist() == want.tolist(), r
    return decoder.last_stats


def corpus_drafter(backend, outputs, **config):
    drafter = CorpusDrafter(backend, CorpusDrafter.Config(**config))
    drafter.fit(outputs, log=lambda *_: None)
    return drafter


@pytest.fixture(scope="module")
def opt():
    return make_backend(seed=3, num_layers=4)


@pytest.mark.parametrize("rows", [1, 8])
def test_corpus_drafts_of_the_models_own_outputs_are_accepted_and_exact(opt, rows):
    inputs = opt.prepare_inputs(make_images(rows, seed=5), PROMPTS[:rows])
    _, outputs = own_tokens(opt, inputs, 12)
    stats = assert_drafter_matches(opt, corpus_drafter(opt, outputs, draft_length=4), inputs)
    assert stats.drafted > 0 and stats.accepted > stats.drafted / 2


@pytest.mark.parametrize("rows", [1, 8])
def test_corpus_drafts_that_are_always_wrong_cost_nothing_but_time(opt, rows):
    inputs = opt.prepare_inputs(make_images(rows, seed=6), PROMPTS[:rows])
    _, outputs = own_tokens(opt, inputs, 12)
    never = min(set(range(opt.text_config.vocab_size)) - {t for o in outputs for t in o})
    wrong = [[t, never, never, never] for t in range(opt.text_config.vocab_size)]  # every token matches, then `never`
    stats = assert_drafter_matches(opt, corpus_drafter(opt, wrong, draft_length=3), inputs)
    assert stats.drafted > 0 and stats.accepted == 0


def test_corpus_drafts_of_other_images_and_early_stops_are_exact(opt):
    _, outputs = own_tokens(opt, opt.prepare_inputs(make_images(8, seed=11), PROMPTS), 12)
    inputs = opt.prepare_inputs(make_images(4, seed=12), PROMPTS[:4])
    for config in (dict(draft_length=1), dict(draft_length=6), dict(draft_length=4, stop_below=0.6)):
        assert_drafter_matches(opt, corpus_drafter(opt, outputs, **config), inputs)


def test_a_corpus_drafter_saves_and_loads_alone(opt, tmp_path):
    drafter = corpus_drafter(opt, [[1, 2, 3], [4, 5]], draft_length=2)
    drafter.save(str(tmp_path))
    again = CorpusDrafter(opt, drafter.config)
    again.load(str(tmp_path))
    assert again.outputs == [[1, 2, 3], [4, 5]] and again.index.continuation([1], 2)[0] == [2, 3]
    (tmp_path / "corpus.json").write_text('{"outputs": [["a"]]}')
    with pytest.raises(Exception, match="not a corpus drafter"):
        again.load(str(tmp_path))


# -- the other families --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["minigpt4-gqa", "blip2-flant5"])
def test_corpus_drafting_is_exact_on_the_outside_shaped_families(family):
    if family == "minigpt4-gqa":
        from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend
        backend = Minigpt4LlamaBackend.from_tiny_config(seed=2, num_layers=4, hidden_size=48, num_heads=6,
                                                        num_kv_heads=2, num_query_tokens=6)
    else:
        from earlyexit.backends.blip2_flant5 import Blip2FlanT5Backend
        backend = Blip2FlanT5Backend.from_tiny_config(seed=2, num_layers=3, hidden_size=32, num_heads=4)
    inputs = backend.prepare_inputs(make_images(3, seed=7), PROMPTS[:3])
    _, outputs = own_tokens(backend, inputs, 10)
    stats = assert_drafter_matches(backend, corpus_drafter(backend, outputs, draft_length=3), inputs, 10)
    assert stats.accepted > 0
    other = backend.prepare_inputs(make_images(3, seed=8), PROMPTS[3:6])
    assert_drafter_matches(backend, corpus_drafter(backend, outputs, draft_length=3), other, 10)


# -- the exit drafter stops early too -------------------------------------------------------------
@pytest.mark.parametrize("stop_below", [0.0, 0.5, 0.99])
def test_exit_drafts_stopped_early_are_still_the_full_model(registry, opt, stop_below):
    strategy = registry.strategy("confidence")(opt, [1, 2])
    inputs = opt.prepare_inputs(make_images(3, seed=13), PROMPTS[:3])
    expected = opt.plain_generate(**inputs, max_new_tokens=10, do_sample=False)
    decoder = SelfSpeculativeDecoder(EarlyExitForCausalLM(opt, strategy), 0, 4, stop_below=stop_below)
    got = decoder.generate(**inputs, max_new_tokens=10)
    prompt = inputs["input_ids"].shape[1]
    eos = opt.language_model.generation_config.eos_token_id
    for r in range(3):
        want = expected[r, prompt:].tolist()
        want = want[:want.index(eos) + 1] if eos in want else want
        assert got[r, prompt:prompt + len(want)].tolist() == want
    if stop_below == 0.99:  # a random model's exit is never that sure: nothing is drafted
        assert decoder.last_stats.drafted < decoder.last_stats.tokens


def test_the_registry_lists_drafters(registry):
    assert {"corpus", "exits"} <= set(registry.names("drafter"))
    kinds = {e["name"]: e["kind"] for e in registry.entries()}
    assert kinds["corpus"] == kinds["exits"] == "drafter"
    assert registry.drafter("exits").uses_exits and not registry.drafter("corpus").uses_exits


# -- a drafter from an outside package ---------------------------------------------------------------
OUTSIDE_DRAFTER = '''
    import json
    import os
    from collections import Counter, defaultdict

    import earlyexit
    from earlyexit.core.drafter import Drafter


    class BigramDrafter(Drafter):
        """Drafts the token that most often followed the last one in the backbone's outputs."""
        name = "bigram"
        description = "most frequent next token"

        def fit(self, outputs, log=print):
            counts = defaultdict(Counter)
            for tokens in outputs:
                for a, b in zip(tokens, tokens[1:]):
                    counts[a][b] += 1
            self.next = {a: c.most_common(1)[0][0] for a, c in counts.items()}

        def save(self, folder):
            with open(os.path.join(folder, "bigram.json"), "w") as f:
                json.dump({str(k): v for k, v in self.next.items()}, f)

        def load(self, folder):
            with open(os.path.join(folder, "bigram.json")) as f:
                self.next = {int(k): v for k, v in json.load(f).items()}

        def propose(self, context, count):
            drafts, token = [], context.tokens[-1]
            while len(drafts) < count and token in self.next:
                token = self.next[token]
                drafts.append(token)
            return drafts


    @earlyexit.hookimpl
    def earlyexit_register_drafters():
        return [BigramDrafter]
'''


def test_a_drafter_from_an_outside_package_registers_fits_and_drafts(install_distribution, opt, tmp_path):
    from earlyexit.plugins.registry import get_registry

    install_distribution("earlyexit-bigram", {"ee_bigram": OUTSIDE_DRAFTER}, {"bigram": "ee_bigram"})
    registry = get_registry()
    assert registry.plugin_of("drafter", "bigram") == "earlyexit-bigram"
    assert {"name": "bigram", "kind": "drafter", "plugin": "earlyexit-bigram",
            "description": "most frequent next token"} in registry.entries()
    cls = registry.drafter("bigram")
    inputs = opt.prepare_inputs(make_images(4, seed=5), PROMPTS[:4])
    _, outputs = own_tokens(opt, inputs, 12)
    drafter = cls(opt, cls.Config(draft_length=3))
    drafter.fit(outputs)
    drafter.save(str(tmp_path))
    again = cls(opt, cls.Config(draft_length=3))
    again.load(str(tmp_path))
    stats = assert_drafter_matches(opt, again, inputs)
    assert stats.drafted > 0 and stats.accepted > 0


# -- sampling: lossless in distribution ----------------------------------------------------------------
class FixedDrafter(CorpusDrafter):
    """Always proposes the same tokens, whatever came before (a drafter that is often wrong)."""

    def __init__(self, backend, proposal):
        super().__init__(backend, CorpusDrafter.Config(draft_length=len(proposal)))
        self.proposal = proposal

    def propose(self, context, count):
        return self.proposal[:count]


class AlwaysKept(DraftVerifyDecoder):
    """The acceptance rule dropped: every draft is kept (what the test must catch)."""

    def _sampled(self, block, drafts):
        probabilities = self.warp(block.float()).softmax(-1)
        return list(drafts) + [int(torch.multinomial(probabilities[len(drafts)], 1))]


def chi_square_p(a: list[int], b: list[int]) -> float:
    """p-value of the two-sample chi-square test that `a` and `b` (equal sizes) come from one
    distribution; categories with fewer than 10 draws together are pooled."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    bins, pooled = [], [0, 0]
    for token in set(ca) | set(cb):
        if ca[token] + cb[token] >= 10:
            bins.append((ca[token], cb[token]))
        else:
            pooled = [pooled[0] + ca[token], pooled[1] + cb[token]]
    if sum(pooled):
        bins.append(tuple(pooled))
    statistic = sum((x - y) ** 2 / (x + y) for x, y in bins)
    return float(torch.special.gammaincc(torch.tensor((len(bins) - 1) / 2), torch.tensor(statistic / 2)))


class AlwaysKeptRows(BatchedDraftVerifyDecoder):
    """The batched acceptance rule dropped: every row keeps every draft."""

    def _sampled_rows(self, block, drafts):
        probabilities = self.warp(block.float().flatten(0, 1)).softmax(-1).reshape(*block.shape[:2], -1)
        return [list(d) + [int(torch.multinomial(probabilities[r, len(d)], 1))] for r, d in enumerate(drafts)]


@pytest.mark.parametrize("batched", [False, True], ids=["row by row", "the batch at once"])
def test_speculative_sampling_draws_what_the_full_model_draws(opt, batched):
    rows = 1000
    inputs, prompt, plain = seeded_plain_samples(opt, rows, image_seed=14)
    second = plain[:, 1].tolist()
    likely = max(set(second), key=second.count)  # the drafts are often right, often wrong
    proposal = [likely, likely]
    drawn = {}
    decoders = (BatchedDraftVerifyDecoder, AlwaysKeptRows) if batched else (DraftVerifyDecoder, AlwaysKept)
    for name, cls in zip(("exact", "always kept"), decoders):
        decoder = cls(EarlyExitForCausalLM(opt), FixedDrafter(opt, proposal))
        if batched:
            decoder._one = None  # the row-by-row path: calling it would fail
        torch.manual_seed(1)
        drawn[name] = decoder.generate(**inputs, **SAMPLING)[:, prompt:]
        stats = decoder.last_stats
        assert stats.drafted >= rows and (0 < stats.accepted < stats.drafted or name == "always kept")
    for position in (1, 2, 3):  # after the first token the drafts decide what is kept
        assert chi_square_p(plain[:, position].tolist(), drawn["exact"][:, position].tolist()) > 1e-3
    assert chi_square_p(plain[:, 1].tolist(), drawn["always kept"][:, 1].tolist()) < 1e-6


def test_greedy_is_unchanged_and_the_exit_drafter_does_not_sample(registry, opt):
    inputs = opt.prepare_inputs(make_images(2, seed=15), PROMPTS[:2])
    with pytest.raises(ConfigError, match="drafter of its own"):
        SelfSpeculativeDecoder(EarlyExitForCausalLM(opt, registry.strategy("confidence")(opt, [1])), 0, 2).generate(
            **inputs, max_new_tokens=4, do_sample=True)


# -- batched verification ------------------------------------------------------------------------------
@pytest.mark.parametrize("drafts", ["own", "wrong", "other images"])
def test_a_batch_verified_together_gives_each_row_what_it_gets_alone(opt, drafts):
    inputs = opt.prepare_inputs(make_images(8, seed=16), PROMPTS)
    _, outputs = own_tokens(opt, inputs, 12)
    if drafts == "wrong":
        never = min(set(range(opt.text_config.vocab_size)) - {t for o in outputs for t in o})
        outputs = [[t, never, never, never] for t in range(opt.text_config.vocab_size)]
    elif drafts == "other images":
        _, outputs = own_tokens(opt, opt.prepare_inputs(make_images(8, seed=17), PROMPTS), 12)
    drafter = corpus_drafter(opt, outputs, draft_length=4)
    model = EarlyExitForCausalLM(opt)
    together = BatchedDraftVerifyDecoder(model, drafter)
    batch = together.generate(**inputs, max_new_tokens=12)
    alone = DraftVerifyDecoder(model, drafter)  # row by row, each row's own cache
    rows = alone.generate(**inputs, max_new_tokens=12)
    assert torch.equal(batch, rows)
    assert together.last_stats.tokens == alone.last_stats.tokens
    if drafts == "own":
        assert together.last_stats.accepted > together.last_stats.drafted / 2
    if drafts == "wrong":
        assert together.last_stats.accepted == 0 and together.last_stats.drafted > 0
    assert_drafter_matches(opt, drafter, inputs)  # and both are the backbone's own tokens


def test_batched_verification_on_llama_with_grouped_query_attention():
    from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend

    backend = Minigpt4LlamaBackend.from_tiny_config(seed=4, num_layers=4, hidden_size=48, num_heads=6,
                                                    num_kv_heads=2, num_query_tokens=6)
    inputs = backend.prepare_inputs(make_images(5, seed=18), PROMPTS[:5])
    _, outputs = own_tokens(backend, backend.prepare_inputs(make_images(5, seed=19), PROMPTS[:5]), 10)
    _, own = own_tokens(backend, inputs, 10)
    drafter = corpus_drafter(backend, outputs + own[:2], draft_length=3)
    batch = BatchedDraftVerifyDecoder(EarlyExitForCausalLM(backend), drafter).generate(**inputs, max_new_tokens=10)
    rows = DraftVerifyDecoder(EarlyExitForCausalLM(backend), drafter).generate(**inputs, max_new_tokens=10)
    assert torch.equal(batch, rows)
    assert_drafter_matches(backend, drafter, inputs, 10)


# -- generate and eval with a fitted drafter's folder ---------------------------------------------------
def test_generate_and_eval_draft_with_a_saved_corpus_drafter(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from earlyexit.cli import main
    from earlyexit.core.drafter import save_drafter

    backend = make_backend(seed=3, num_layers=4)
    model = tmp_path / "model"
    backend.save_pretrained(str(model))
    image = tmp_path / "image.png"
    Image.fromarray(np.full((20, 20, 3), 90, dtype=np.uint8)).save(image)
    inputs = backend.prepare_inputs([Image.open(image).convert("RGB")], ["a"])
    _, outputs = own_tokens(backend, inputs, 8)
    folder = tmp_path / "drafter"
    folder.mkdir()
    save_drafter(corpus_drafter(backend, outputs * 3, draft_length=3), str(folder))
    common = ["--backend", "blip2-opt", "--model", str(model), "--max-new-tokens", "8"]
    capsys.readouterr()  # what the set-up printed (DeepSpeed's import-time notice, outside the CLI's quiet)
    assert main(["generate", *common, "--image", str(image), "--prompt", "a", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["generate", *common, "--image", str(image), "--prompt", "a", "--json", "--decode", "speculative",
                 "--drafter", f"corpus:{folder}"]) == 0
    drafted = json.loads(capsys.readouterr().out)
    assert drafted["token_ids"] == plain["token_ids"] and drafted["speculative"]["drafter"] == "corpus"
    assert drafted["speculative"]["accepted"] > 0
    assert main(["eval", *common, "--data", "scenes", "--split", "dev", "--limit", "2", "--decode", "speculative",
                 "--drafter", f"corpus:{folder}", "--draft-length", "2"]) == 0
    out = capsys.readouterr().out
    assert "with the corpus drafter" in out
