"""Self-speculative decoding: the exits draft, the full model verifies; the output is the full
model's, token for token (greedy).

After the prompt pass (full depth), each round
1. drafts up to `draft_length` tokens greedily at one exit (`draft_exit`): every draft step
   runs the layers up to that exit and the exit's own module and read-out; under `catchup`
   the drafted positions wait there with their hidden states;
2. verifies them with one forward of the last draft token at full depth: the engine's
   catch-up runs every waiting position through the deeper layers in the same batched call,
   reusing the shallow K/V the drafts already wrote (LayerSkip's `forward_remainder`), and the
   final head reads every position of that block;
3. keeps the longest prefix of drafts the full model agrees with, plus the full model's own
   next token (a correction, or a bonus token when every draft was right), and crops the
   cache back to the kept positions.
transformers' `assistant_early_exit` cannot serve here (OPT and T5 run every layer regardless,
BLIP-2 refuses), so this is a small loop of our own over the early-exit engine. Rows are
decoded one at a time (each row accepts a different number of drafts).

Drafters that propose from outside the model (`earlyexit.core.drafter`, e.g. the corpus drafter)
use `DraftVerifyDecoder`: their tokens are fed with the last one in a single full-depth forward.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from earlyexit.core.drafter import BatchDraftContext, DraftContext, last_kept
from earlyexit.core.engine import check_context
from earlyexit.core.generation import end_tokens, unpadded_rows
from earlyexit.errors import ConfigError

DEFAULT_DRAFT_LENGTH = 4
DRAFT_LENGTHS = (1, 2, 3, 4)  # what `run` tries on dev when --draft-length is not given


@dataclasses.dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_draft_length(self) -> float:
        return self.drafted / self.rounds if self.rounds else float("nan")

    def add(self, other: SpeculativeStats) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "acceptance_rate": self.acceptance_rate,
                "mean_draft_length": self.mean_draft_length}


class RowByRowDecoder:
    """Greedy speculative decoding of a batch, one row at a time (each row accepts a different
    number of drafts): the prompt pass at full depth, then the subclass's draft-and-verify rounds.
    Whatever drafts, the full model verifies every token, so the output is the full model's."""

    draft_length: int
    draft_layer: int | None
    drafter_name = "exits"  # what drafts (`earlyexit list`, kind drafter)
    batches = False  # batches decode together (True) or one row at a time
    samples = False  # whether `generate(do_sample=True)` is supported (exactly, in distribution)
    warp = None  # the sampling warpers of the current call (None: greedy)

    def __init__(self, model):
        self.model = model
        self.last_stats = SpeculativeStats()
        self.total_stats = SpeculativeStats()  # over every `generate` call of this decoder
        self.last_records: list = []
        self.last_prompt_seconds = 0.0  # prompt passes (vision tower included) of the last call

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, **unused) -> torch.Tensor:
        """(rows, prompt + generated) like `generate`; rows shorter than the longest are padded.
        The backend's other vision inputs (`Backend.vision_input_names`) come as keywords too.
        `do_sample` samples as the backbone's `generate` does (temperature, top-k, top-p from the
        arguments or its generation config), exactly in distribution where the decoder can."""
        vision = self.model.backend.vision_inputs(unused)
        self.warp = sampling_warpers(self.model.generation_config, temperature, top_k, top_p) if do_sample else None
        if do_sample and not self.samples:
            raise ConfigError(f"{type(self).__name__} decodes greedily; sampled speculative decoding needs a drafter "
                              "of its own (e.g. --drafter corpus)")
        check_context(self.model.backend, input_ids.shape[1], max_new_tokens)
        rows = input_ids.shape[0]
        stats, records, outputs = SpeculativeStats(), [], []
        self.last_prompt_seconds = 0.0
        pad = self.model.generation_config.pad_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, **vision}
        for row in unpadded_rows(batch):
            new, row_stats, row_records = self._one(row, max_new_tokens)
            stats.add(row_stats)
            records.append(row_records)
            outputs.append(new)
        width = max(len(o) for o in outputs)
        new_tokens = torch.full((rows, width), pad if pad is not None else 0, dtype=input_ids.dtype,
                                device=input_ids.device)
        for r, tokens in enumerate(outputs):
            new_tokens[r, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        self.last_stats, self.last_records = stats, records
        self.total_stats.add(stats)
        return torch.cat([input_ids, new_tokens], 1)

    def _one(self, row: dict, max_new_tokens: int):
        model = self.model
        input_ids = row["input_ids"]
        eos = end_tokens(model.generation_config)
        if model.strategy is not None:
            model.strategy.reset()
        cache = model.new_cache()
        stats = SpeculativeStats()
        began = time.perf_counter()
        embeds = model.backend.decoder_inputs_embeds(row["pixel_values"], input_ids, **model.backend.vision_inputs(row))
        try:
            model.force_exit, model.read_block = -1, False
            logits = model.prompt_pass(embeds, torch.ones_like(input_ids), cache)
            tokens = [self._first(logits[0, -1])]
            self.last_prompt_seconds += time.perf_counter() - began
            if len(tokens) < max_new_tokens and tokens[-1] not in eos:
                tokens = self._rounds(cache, tokens, max_new_tokens, eos, stats)
        finally:
            model.force_exit, model.read_block = None, False
        stats.tokens = len(tokens)
        return tokens, stats, cache.steps

    def _first(self, logits: torch.Tensor) -> int:
        """The prompt pass's token: greedy, or sampled from the warped distribution."""
        if self.warp is None:
            return int(logits.argmax())
        return int(torch.multinomial(self.warp(logits[None].float())[0].softmax(-1), 1))

    def _rounds(self, cache, tokens: list[int], max_new_tokens: int, eos: set, stats) -> list[int]:
        """Draft-and-verify rounds from `tokens` (the prompt pass's first) to the end; the tokens."""
        raise NotImplementedError

    @staticmethod
    def _accept(cache, tokens: list[int], drafts: list[int], verified: list[int], budget: int, eos: set,
                stats: SpeculativeStats) -> tuple[list[int], bool]:
        """Keep the longest prefix of `drafts` the full model agrees with (`verified[i]`: its token
        after drafts[:i]) and its own next token; crop the cache back to the kept positions.
        Returns the tokens and whether the sequence ended."""
        tokens, accepted, ended = kept_tokens(tokens, drafts, verified, budget, eos, stats)
        cache.crop(cache.total_length - (len(drafts) - accepted))
        return tokens, ended

    @staticmethod
    def _mask(cache, device, new: int = 1):
        return torch.ones(1, cache.total_length + new, dtype=torch.long, device=device)


def kept_tokens(tokens: list[int], drafts: list[int], verified: list[int], budget: int, eos: set,
                stats: SpeculativeStats) -> tuple[list[int], int, bool]:
    """A row's tokens after a round: the longest prefix of `drafts` the full model agrees with
    (`verified[i]`: its token after drafts[:i]), then its own next token, within `budget` and cut
    after an end token; also how many drafts were kept and whether the row ended. Counts the round."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == verified[accepted]:
        accepted += 1
    stats.rounds += bool(drafts)
    stats.drafted += len(drafts)
    stats.accepted += accepted
    tokens = tokens + (drafts[:accepted] + [verified[accepted]])[:budget]
    end = next((i for i, t in enumerate(tokens) if t in eos), None)
    return (tokens, accepted, False) if end is None else (tokens[:end + 1], accepted, True)


class SelfSpeculativeDecoder(RowByRowDecoder):
    """Greedy self-speculative decoding over an `EarlyExitForCausalLM` (its kv policy must be
    `catchup`, which is what reuses the drafts' shallow work)."""

    def __init__(self, model, draft_exit: int | None = None, draft_length: int = DEFAULT_DRAFT_LENGTH,
                 draft_vocabulary: torch.Tensor | None = None, stop_below: float = 0.0):
        """`draft_vocabulary`: token ids the drafts are read out over (`draft_vocabulary_of`), so a
        draft's head costs a fraction of the full one; the output stays the full model's, since
        every token is verified at full depth over the whole vocabulary. `stop_below` (τ): a
        round stops drafting where the exit's probability of its token falls below it."""
        if model.strategy is None:
            raise ConfigError("speculative decoding drafts with a strategy's exits; pass --strategy")
        if model.kv_policy != "catchup":
            raise ConfigError("speculative decoding needs --kv-policy catchup (the verification reuses the "
                              "drafts' shallow K/V and exit states)")
        exits = len(model.strategy.exit_layers)
        self.draft_exit = exits // 2 if draft_exit is None else draft_exit
        if not 0 <= self.draft_exit < exits:
            raise ConfigError(f"draft exit index {self.draft_exit} is out of range: the strategy has {exits} exits "
                              f"(layers {model.strategy.exit_layers})")
        if draft_length < 1:
            raise ConfigError(f"the draft length must be at least 1 (got {draft_length})")
        super().__init__(model)
        self.draft_length, self.stop_below = draft_length, stop_below
        model.draft_vocabulary = token_vocabulary(model, draft_vocabulary, "draft")

    @property
    def draft_layer(self) -> int:
        return self.model.strategy.exit_layers[self.draft_exit]

    def _rounds(self, cache, tokens, max_new_tokens, eos, stats):
        while len(tokens) < max_new_tokens:
            budget = max_new_tokens - len(tokens)
            drafts = self._draft(cache, tokens[-1], min(self.draft_length, budget - 1), eos)
            verified = self._verify(cache, drafts[-1] if drafts else tokens[-1])
            tokens, ended = self._accept(cache, tokens, drafts, verified, budget, eos, stats)
            if ended:
                break
        return tokens

    def _draft(self, cache, last: int, count: int, eos) -> list[int]:
        model = self.model
        model.force_exit, model.read_block = self.draft_exit, False
        drafts = []
        token = last
        for _ in range(count):
            logits = model(input_ids=torch.tensor([[token]], device=model.device),
                           attention_mask=self._mask(cache, model.device), cache=cache).logits
            if self.stop_below > 0:
                best = logits[0, -1].float().softmax(-1).max(-1)
                probability, token = best.values.item(), int(best.indices)
                if probability < self.stop_below:  # its K/V stays in the cache: the verification feeds it
                    cache.crop(cache.total_length - 1)
                    break
            else:
                token = int(logits[0, -1].argmax())
            drafts.append(token)
            if token in eos:
                break
        return drafts

    def _verify(self, cache, token: int) -> list[int]:
        """Feed `token` at full depth; the full model's greedy token after every waiting position."""
        model = self.model
        model.force_exit, model.read_block = -1, True
        logits = model(input_ids=torch.tensor([[token]], device=model.device),
                       attention_mask=self._mask(cache, model.device), cache=cache).logits
        record = cache.steps[-1]
        return logits[0, -record.final_readouts:].argmax(-1).tolist()


class DraftVerifyDecoder(RowByRowDecoder):
    """Greedy speculative decoding with a drafter that proposes tokens outside the model (a
    corpus, a small module): each round the drafter proposes up to k tokens, and one full-depth
    forward of the last token and the drafts verifies them all (the head reads every position);
    the longest agreeing prefix is kept with the full model's own next token, and the cache is
    cropped back to the kept positions. One host read per round."""

    samples = True

    def __init__(self, model, drafter):
        super().__init__(model)
        self.drafter, self.drafter_name = drafter, drafter.name
        self.draft_length = drafter.config.draft_length
        self.draft_layer = None  # no exit drafts

    def generate(self, *args, **kwargs) -> torch.Tensor:
        self.model.keep_states = self.drafter.wants_hidden  # the drafter reads the verified states
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.model.keep_states, self.model.kept_inputs, self.model.kept_top = False, None, None

    def _rounds(self, cache, tokens, max_new_tokens, eos, stats):
        model = self.model
        self.drafter.start()
        seen = self._verified_states(cache, 0, cache.total_length, tokens[-1])  # the prompt pass's positions
        while len(tokens) < max_new_tokens:
            budget = max_new_tokens - len(tokens)
            drafts = self._row_drafts(tokens, max_new_tokens, eos, seen)
            model.force_exit, model.read_block = -1, True
            fed = torch.tensor([[tokens[-1], *drafts]], device=model.device)
            past = cache.total_length
            logits = model(input_ids=fed, attention_mask=self._mask(cache, model.device, fed.shape[1]),
                           cache=cache).logits
            block = logits[0, -fed.shape[1]:]
            verified = block.argmax(-1).tolist() if self.warp is None else self._sampled(block, drafts)
            before = len(tokens)
            tokens, ended = self._accept(cache, tokens, drafts, verified, budget, eos, stats)
            if ended:
                break
            seen = self._verified_states(cache, past, len(tokens) - before, tokens[-1])
        return tokens

    def _verified_states(self, cache, start: int, count: int, newest: int) -> dict:
        """For a drafter that reads states (`wants_hidden`): of the last forward, which began at
        cache position `start`, the final-layer states of the first `count` positions (those kept),
        the embedded input one position after each (the newest token's, not fed yet, last), and
        their positions (`_batch_states` for one row); else nothing."""
        if not self.drafter.wants_hidden:
            return {}
        device = self.model.device
        seen = self._batch_states(cache, start, torch.ones(1, count, dtype=torch.long, device=device),
                                  torch.tensor([newest], device=device))
        return {"hidden": seen["hidden"][0], "inputs": seen["inputs"][0], "positions": seen["positions"][0]}

    def _row_drafts(self, tokens: list[int], max_new_tokens: int, eos: set, seen: dict | None = None) -> list[int]:
        """Up to k drafts after `tokens`, within the row's budget (the verification adds one) and cut
        after an end token. `seen`: what a state-reading drafter takes in (`_verified_states`)."""
        budget = max_new_tokens - len(tokens)
        drafts = list(self.drafter.propose(DraftContext(list(tokens), **(seen or {})),
                                           min(self.draft_length, budget - 1))
                      if budget > 1 else [])[:max(budget - 1, 0)]
        return cut_after_end(drafts, eos)

    def _sampled(self, block: torch.Tensor, drafts: list[int]) -> list[int]:
        """Speculative sampling's acceptance rule for drafts proposed with certainty (q = a point
        mass on each draft): draft i is kept with probability p_i(draft), where p_i is the full
        model's warped distribution after the drafts before it; the first one refused is replaced
        by a sample of p_i without it (the residual max(p - q, 0), renormalised), and when all are
        kept a bonus token comes from p_k. Each token is then distributed exactly as sampling the
        full model token by token (`_sampled_rows` on a batch of one: one host read).
        Returned as `verified` is for `_accept`: the kept drafts, then the full model's token."""
        return self._sampled_rows(block[None], [drafts])[0]

    def _sampled_rows(self, block: torch.Tensor, drafts: list[list[int]]) -> list[list[int]]:
        """`_sampled` for every row at once (block: rows x (k + 1) positions of logits): each row keeps
        draft i with probability p_i(draft), stops at its first refusal and draws its next token from
        the residual there (p_k when it kept them all). One host read for the batch."""
        rows, width = block.shape[:2]
        probabilities = self.warp(block.reshape(rows * width, -1).float()).softmax(-1).reshape(rows, width, -1)
        lengths = torch.tensor([len(d) for d in drafts], device=block.device)
        index = torch.zeros(rows, width, dtype=torch.long)
        for r, row_drafts in enumerate(drafts):
            index[r, :len(row_drafts)] = torch.tensor(row_drafts, dtype=torch.long)
        index = index.to(block.device)
        drafted = torch.arange(width, device=block.device) < lengths[:, None]  # (rows, width): real drafts
        chance = probabilities.gather(2, index[..., None])[..., 0]
        kept = (torch.rand(rows, width, device=block.device) < chance) & drafted
        accepted = kept.to(torch.int64).cumprod(1).sum(1)  # drafts kept before each row's first refusal
        residual = probabilities[torch.arange(rows, device=block.device), accepted]
        refused = index.gather(1, accepted[:, None])  # (unused where every draft was kept)
        residual = residual.scatter(1, refused, torch.where((accepted < lengths)[:, None], 0.0,
                                                            residual.gather(1, refused)))
        total = residual.sum(-1, keepdim=True)
        replacement = torch.multinomial(residual / total, 1)[:, 0]
        accepted, replacement = torch.stack([accepted, replacement]).tolist()
        return [row_drafts[:a] + [t] for row_drafts, a, t in zip(drafts, accepted, replacement)]

    def _batch_states(self, cache, start: int, real: torch.Tensor, newest: torch.Tensor) -> dict:
        """`_verified_states` for every row at once: of the last forward, which began at cache
        position `start`, its first `real.shape[1]` positions (`real`: those each row kept, a suffix
        of the prompt's or a prefix of the round's block), with the embedded input one position
        after each; after a row's last kept position, its `newest` token (not fed yet). Nothing
        for a drafter that reads no states."""
        if not self.drafter.wants_hidden:
            return {}
        model = self.model
        count = real.shape[1]
        inputs = model.kept_inputs  # (rows, the forward's own positions, width)
        top = model.kept_top[:, -inputs.shape[1]:][:, :count]
        positions = cache.positions[:, start:start + count]
        # each kept column's next kept column (a prompt's padding can sit between two; `count`: none)
        columns = torch.arange(count, device=real.device).expand_as(real)
        kept_at = torch.where(real.bool(), columns, count)
        following = torch.cat([kept_at[:, 1:], kept_at[:, :1].clamp(min=count)], 1)
        following = following.flip(1).cummin(1).values.flip(1)
        shifted = inputs[:, :count].gather(1, following.clamp(max=count - 1)[..., None].expand(-1, -1, inputs.shape[2]))
        # after each row's last kept position comes its newest token, at the position after it
        last = last_kept(real)
        after = positions.gather(1, last[:, None]) + 1
        newest = model.backend.embed(newest[:, None], None, after).to(shifted.dtype)  # (rows, 1, width)
        shifted = torch.where((following == count)[..., None], newest, shifted)
        return {"hidden": top, "inputs": shifted, "positions": positions, "real": real}


class BatchedDraftVerifyDecoder(DraftVerifyDecoder):
    """Speculative decoding of a whole batch at once with a drafter of its own: every round the
    drafter proposes for every row at once (`Drafter.propose_batch`), the rows' drafts (ragged,
    padded to the longest) are verified in one forward of rows x (k + 1) positions, and each row
    keeps its own prefix (greedy), or what the acceptance rule keeps (sampling, `_sampled_rows`).
    The cache stays rectangular: a row's refused drafts become holes in its attention mask
    (positions count only what the mask keeps, so the next tokens sit where the full model puts
    them), and the columns every row refused are cropped. A drafter that reads the verified states
    gets the whole block with each row's kept positions marked. One host read a round, besides
    the drafter's own. Decoder-only families (a T5 decoder's relative bias counts columns, so holes
    would move it); elsewhere, and for drafters whose state cannot be batched
    (`Drafter.can_draft_batches`), batches decode row by row."""

    @property
    def batches(self) -> bool:
        """Whether batches decode together (else row by row, as the plain comparison must)."""
        return not self.model.encoder_decoder and self.drafter.can_draft_batches()

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, **unused) -> torch.Tensor:
        if not self.batches or input_ids.shape[0] == 1:
            return super().generate(pixel_values, input_ids, attention_mask, max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, top_k=top_k, top_p=top_p, **unused)
        self.warp = (sampling_warpers(self.model.generation_config, temperature, top_k, top_p) if do_sample
                     else None)
        self.model.keep_states = self.drafter.wants_hidden
        try:
            return self._batch(pixel_values, input_ids, attention_mask, max_new_tokens, unused)
        finally:
            self.model.keep_states, self.model.kept_inputs, self.model.kept_top = False, None, None

    def _batch(self, pixel_values, input_ids, attention_mask, max_new_tokens: int, unused: dict) -> torch.Tensor:
        model = self.model
        vision = model.backend.vision_inputs(unused)
        check_context(model.backend, input_ids.shape[1], max_new_tokens)
        rows, device = input_ids.shape[0], input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = end_tokens(model.generation_config)
        pad = model.generation_config.pad_token_id
        pad = pad if pad is not None else 0
        cache, stats = model.new_cache(), SpeculativeStats()
        began = time.perf_counter()
        embeds = model.backend.decoder_inputs_embeds(pixel_values, input_ids, **vision)
        try:
            model.force_exit, model.read_block = -1, False
            logits = model.prompt_pass(embeds, attention_mask, cache)
            first = (logits[:, -1].argmax(-1) if self.warp is None else
                     torch.multinomial(self.warp(logits[:, -1].float()).softmax(-1), 1)[:, 0])
            tokens = [[t] for t in first.tolist()]
            self.last_prompt_seconds = time.perf_counter() - began
            mask = attention_mask.clone()
            self.drafter.start_batch(rows)
            going = [t[-1] not in eos and len(t) < max_new_tokens for t in tokens]
            # the prompt pass's positions: every real one kept (the prompt is left-padded)
            seen = self._batch_states(cache, 0, attention_mask, first)
            while any(going):
                counts = [min(self.draft_length, max_new_tokens - len(t) - 1) if g else 0
                          for t, g in zip(tokens, going)]
                proposed = self.drafter.propose_batch(BatchDraftContext(tokens, **seen), counts)
                drafts = [cut_after_end(d[:max(c, 0)], eos) for d, c in zip(proposed, counts)]
                width = 1 + max(len(d) for d in drafts)
                fed = torch.full((rows, width), pad, dtype=torch.long)
                real = torch.zeros(rows, width, dtype=mask.dtype)
                for r in range(rows):
                    if going[r]:
                        fed[r, :1 + len(drafts[r])] = torch.tensor([tokens[r][-1], *drafts[r]])
                        real[r, :1 + len(drafts[r])] = 1
                mask = torch.cat([mask, real.to(device)], 1)
                cache.no_padding = False  # holes and finished rows: every block needs its mask
                model.read_block = True
                past = cache.total_length
                block = model(input_ids=fed.to(device), attention_mask=mask, cache=cache).logits
                block = block[:, -width:]
                verified = (block.argmax(-1).tolist() if self.warp is None  # the round's one host read
                            else self._sampled_rows(block, drafts))
                refused_everywhere = width
                kept = torch.zeros(rows, width, dtype=mask.dtype)  # each row's positions kept this round
                for r in range(rows):
                    if not going[r]:
                        continue
                    tokens[r], accepted, ended = kept_tokens(tokens[r], drafts[r], verified[r],
                                                             max_new_tokens - len(tokens[r]), eos, stats)
                    mask[r, mask.shape[1] - width + 1 + accepted:] = 0  # the refused drafts: holes
                    kept[r, :1 + accepted] = 1
                    refused_everywhere = min(refused_everywhere, width - 1 - accepted)
                    going[r] = not ended and len(tokens[r]) < max_new_tokens
                if refused_everywhere:  # columns no row kept: gone from the cache and the mask
                    cache.crop(cache.total_length - refused_everywhere)
                    mask = mask[:, :-refused_everywhere]
                if any(going):
                    newest = torch.tensor([t[-1] for t in tokens], device=device)
                    seen = self._batch_states(cache, past, kept[:, :width - refused_everywhere].to(device), newest)
        finally:
            model.force_exit, model.read_block = None, False
        stats.tokens = sum(len(t) for t in tokens)
        self.last_stats = stats
        self.total_stats.add(stats)
        self.last_records = [cache.steps] * rows  # every row ran every step of the batch
        width = max(len(t) for t in tokens)
        new_tokens = torch.full((rows, width), pad, dtype=input_ids.dtype, device=device)
        for r, row_tokens in enumerate(tokens):
            new_tokens[r, :len(row_tokens)] = torch.tensor(row_tokens, dtype=input_ids.dtype)
        return torch.cat([input_ids, new_tokens], 1)


def cut_after_end(drafts: list[int], eos: set) -> list[int]:
    """`drafts` up to and including the first end token."""
    ended = next((i for i, t in enumerate(drafts) if t in eos), None)
    return drafts[:ended + 1] if ended is not None else drafts


def sampling_warpers(config, temperature=None, top_k=None, top_p=None):
    """The warpers the backbone's `generate` applies when sampling (transformers' own, in its
    order): temperature, top-k, top-p, from the arguments or else `config`."""
    temperature = config.temperature if temperature is None else temperature
    top_k = config.top_k if top_k is None else top_k
    top_p = config.top_p if top_p is None else top_p
    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return lambda scores: warpers(None, scores)


def speculative_decoder(model, drafter=None, draft_exit: int | None = None,
                        draft_length: int = DEFAULT_DRAFT_LENGTH, draft_vocabulary=None) -> RowByRowDecoder:
    """The decoder for `drafter`: the strategy's exits (None, or a drafter that `uses_exits`),
    else the drafter's own proposals verified by the full model."""
    if drafter is None or drafter.uses_exits:
        stop_below = drafter.config.stop_below if drafter is not None else 0.0
        return SelfSpeculativeDecoder(model, draft_exit=draft_exit, draft_length=draft_length,
                                      draft_vocabulary=draft_vocabulary, stop_below=stop_below)
    return BatchedDraftVerifyDecoder(model, drafter)


def token_vocabulary(model, ids, what: str) -> torch.Tensor | None:
    """`ids` (token ids an exit reads out over) as a long tensor on the model's device, checked:
    inside the head's vocabulary, none twice. `what` names it in the error ("draft", "exit")."""
    if ids is None:
        return None
    size = model.backend.language_model.lm_head.out_features
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.device).flatten()
    if not len(ids) or int(ids.min()) < 0 or int(ids.max()) >= size:
        raise ConfigError(f"the {what} vocabulary must be token ids in [0, {size}) (got {len(ids)} ids, some outside)")
    if len(torch.unique(ids)) != len(ids):
        raise ConfigError(f"the {what} vocabulary lists a token id twice")
    return ids


def draft_vocabulary_of(backend, texts, size: int) -> torch.Tensor:
    """The `size` tokens that occur most often in `texts` (what the backbone itself writes, e.g.
    on the exit-training split), the end-of-sequence token included: the vocabulary drafts are
    read out over (frequency-ranked drafting, as in FR-Spec)."""
    from collections import Counter

    if size < 1:
        raise ConfigError(f"the draft vocabulary needs at least one token (got {size}); e.g. --draft-vocabulary 1024")
    tokenizer = backend.processor.tokenizer
    counts = Counter()
    for text in texts:
        counts.update(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
    eos = backend.language_model.generation_config.eos_token_id
    for token in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if token is not None:
            counts[token] += len(texts) + 1  # every text ends with it
    chosen = [token for token, _ in counts.most_common(size)]
    return torch.tensor(sorted(chosen), dtype=torch.long, device=backend.device)


def speculative_summary(records_per_row: list[list], costs, stats: SpeculativeStats) -> dict:
    """Layer-equivalent cost of everything the rounds ran (rejected drafts included) against the
    full model's cost for the same tokens: end to end and for the decode phase."""
    spent = decode_spent = full = decode_full = 0.0
    per_token = costs.num_layers + costs.head_cost
    for records in records_per_row:
        for record in records:
            depth = int(record.exit_layer[0])
            cost = costs.breakdown(record, depth)["total"]
            spent += cost
            if record.prefill:
                full += costs.full_cost(record)
            else:
                decode_spent += cost
    decode_tokens = stats.tokens - len(records_per_row)
    decode_full = decode_tokens * per_token
    full += decode_full
    return {"layer_speedup": full / spent if spent else float("nan"),
            "decode_layer_speedup": decode_full / decode_spent if decode_spent else float("nan"),
            **stats.to_dict()}
