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
"""

from __future__ import annotations

import dataclasses
import time

import torch

from earlyexit.core.engine import check_context
from earlyexit.core.generation import unpadded_rows
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


class SelfSpeculativeDecoder:
    """Greedy self-speculative decoding over an `EarlyExitForCausalLM` (its kv policy must be
    `catchup`, which is what reuses the drafts' shallow work)."""

    def __init__(self, model, draft_exit: int | None = None, draft_length: int = DEFAULT_DRAFT_LENGTH,
                 draft_vocabulary: torch.Tensor | None = None):
        """`draft_vocabulary`: token ids the drafts are read out over (`draft_vocabulary_of`), so a
        draft's head costs a fraction of the full one; the output stays the full model's, since
        every token is verified at full depth over the whole vocabulary."""
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
        self.model, self.draft_length = model, draft_length
        model.draft_vocabulary = token_vocabulary(model, draft_vocabulary, "draft")
        self.last_stats = SpeculativeStats()
        self.total_stats = SpeculativeStats()  # over every `generate` call of this decoder
        self.last_records: list = []
        self.last_prompt_seconds = 0.0  # prompt passes (vision tower included) of the last call

    @property
    def draft_layer(self) -> int:
        return self.model.strategy.exit_layers[self.draft_exit]

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, max_new_tokens: int = 20,
                 **unused) -> torch.Tensor:
        """(rows, prompt + generated) like `generate`; rows shorter than the longest are padded.
        The backend's other vision inputs (`Backend.vision_input_names`) come as keywords too."""
        vision = self.model.backend.vision_inputs(unused)
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
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        model.strategy.reset()
        cache = model.new_cache()
        stats = SpeculativeStats()
        began = time.perf_counter()
        embeds = model.backend.decoder_inputs_embeds(row["pixel_values"], input_ids, **model.backend.vision_inputs(row))
        try:
            model.force_exit, model.read_block = -1, False
            logits = model.prompt_pass(embeds, torch.ones_like(input_ids), cache)
            tokens = [int(logits[0, -1].argmax())]
            self.last_prompt_seconds += time.perf_counter() - began
            while len(tokens) < max_new_tokens and tokens[-1] not in eos:
                budget = max_new_tokens - len(tokens)
                drafts = self._draft(cache, tokens[-1], min(self.draft_length, budget - 1), eos)
                verified = self._verify(cache, drafts[-1] if drafts else tokens[-1])
                # verified[i]: the full model's token after drafts[:i]
                accepted = 0
                while accepted < len(drafts) and drafts[accepted] == verified[accepted]:
                    accepted += 1
                stats.rounds += bool(drafts)
                stats.drafted += len(drafts)
                stats.accepted += accepted
                new = drafts[:accepted] + [verified[accepted]]
                kept = cache.total_length - (len(drafts) - accepted)
                cache.crop(kept)
                tokens += new[:budget]
                if any(t in eos for t in new[:budget]):
                    tokens = tokens[:next(i for i, t in enumerate(tokens) if t in eos) + 1]
                    break
        finally:
            model.force_exit, model.read_block = None, False
        stats.tokens = len(tokens)
        return tokens, stats, cache.steps

    def _draft(self, cache, last: int, count: int, eos) -> list[int]:
        model = self.model
        model.force_exit, model.read_block = self.draft_exit, False
        drafts = []
        token = last
        for _ in range(count):
            logits = model(input_ids=torch.tensor([[token]], device=model.device),
                           attention_mask=self._mask(cache, model.device), cache=cache).logits
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

    @staticmethod
    def _mask(cache, device):
        return torch.ones(1, cache.total_length + 1, dtype=torch.long, device=device)


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
