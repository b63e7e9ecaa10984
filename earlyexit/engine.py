"""The early-exit forward: where a token decides to leave the language model.

`EarlyExitForCausalLM` is a causal LM whose `forward` runs the backbone's decoder layers one by
one and asks the strategy at every exit layer whether each row may leave. Hugging Face
`generate` drives it, so greedy, beam search, sampling and stopping criteria work unchanged.

Per forward (one generated token per row):
1. Layers run in order on the new position. At an exit point the strategy produces exit logits
   and decides per row; the batch stops going deeper once every row has exited, and each row
   emits the logits of its own first confident exit.
2. Deeper layers then lack K/V for this position; `kv_policy` decides what they get:
   `catchup` (exact: the position waits, with its hidden state, until a later token goes
   deeper and it is run through the missing layers in the same batched call), `propagate`
   (CALM: K/V projected from the exit state) or `skip` (never seen).
3. The prompt (first forward) runs at full depth so every layer holds it; exits still choose
   the first token's logits.
Every forward appends a `StepRecord` to the cache: the exit layer per row and the work spent.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .backend import Backend
from .cache import EarlyExitCache
from .errors import ConfigError
from .strategy import Strategy

KV_POLICIES = ("catchup", "propagate", "skip")


@dataclasses.dataclass
class StepRecord:
    """What one forward did. Counts are position-evaluations for the newest position plus any
    catch-up work (the prompt's other positions are not counted: the full model pays them too)."""

    exit_layer: torch.Tensor  # (rows,) layers each row's emitted logits came from
    depth: int  # backbone layers the batch ran on its newest position
    prefill: bool
    layer_evals: int = 0  # backbone layer evaluations, catch-up included
    catchup_evals: int = 0  # of which catch-up of earlier positions
    exit_module_evals: float = 0.0  # exit-module evaluations, in decoder-layer equivalents
    head_evals: int = 0  # LM-head read-outs (exit classifiers and the final head)
    kv_fill_evals: int = 0  # K/V projections written by `propagate`


class StepContext:
    """What a strategy may look at when deciding: the token's index in the generated text and
    per-row state that follows beam reordering (create tensors with `rows` leading)."""

    def __init__(self, step: int, rows: int, state: dict[str, torch.Tensor]):
        self.step = step
        self.rows = rows
        self.state = state


class EarlyExitForCausalLM(PreTrainedModel, GenerationMixin):
    """Wraps a backend's language model; `strategy=None` means exits off (plain full depth)."""

    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    main_input_name = "input_ids"

    def __init__(self, backend: Backend, strategy: Strategy | None = None, kv_policy: str = "catchup"):
        if kv_policy not in KV_POLICIES:
            raise ConfigError(f"unknown kv policy {kv_policy!r}; choose one of {', '.join(KV_POLICIES)}")
        super().__init__(backend.text_config)
        self.backend = backend
        self.strategy = strategy
        self.kv_policy = kv_policy
        self.language_model = backend.language_model  # registered so .to()/.device/.dtype work
        self.generation_config = backend.language_model.generation_config
        self.num_layers = backend.num_layers
        self.layers = backend.decoder_layers()
        self.exit_at: dict[int, int] = {}  # depth -> exit index
        self.exit_layer_modules: list[torch.nn.Module | None] = []
        if strategy is not None:
            self.exit_at = {k: e for e, k in enumerate(strategy.exit_layers)}
            modules = strategy.exit_modules()
            if modules is not None:
                self.exit_modules = modules  # registered for .to()
            for e in range(len(strategy.exit_layers)):
                module = strategy.exit_attention_layer(e)
                if module is not None:
                    backend.bind_cache_slot(module, self.num_layers + e)
                self.exit_layer_modules.append(module)
        self.last_cache: EarlyExitCache | None = None

    # -- generation --------------------------------------------------------------------------
    def new_cache(self) -> EarlyExitCache:
        return EarlyExitCache(self.num_layers + len(self.exit_layer_modules))

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        """Like the backbone's `generate`: with `pixel_values`, image features fill the image
        placeholders of `input_ids`. The per-token trace is left in `self.last_trace`."""
        from .accounting import Trace

        if pixel_values is not None and inputs_embeds is None:
            inputs_embeds = self.backend.decoder_inputs_embeds(pixel_values, input_ids)
        if self.strategy is not None:
            self.strategy.reset()
        cache = kwargs.pop("cache", None) or self.new_cache()
        wants_dict = kwargs.get("return_dict_in_generate", False)
        kwargs["return_dict_in_generate"] = True
        if (kwargs.get("num_beams") or self.generation_config.num_beams or 1) > 1:
            kwargs["output_scores"] = True  # gives beam_indices: which beam each returned token came from
        out = super().generate(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, **kwargs
        )
        prompt_length = input_ids.shape[1] if input_ids is not None else 0
        self.last_cache = cache
        self.last_trace = Trace.from_generation(
            cache.steps,
            out.sequences[:, prompt_length:],
            getattr(out, "beam_indices", None),
            eos_token_id=self.generation_config.eos_token_id,
            num_layers=self.num_layers,
        )
        return out if wants_dict else out.sequences

    # -- the forward -------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None,
                use_cache=None, position_ids=None, logits_to_keep=0, **kwargs):
        backend = self.backend
        first = inputs_embeds if inputs_embeds is not None else input_ids
        rows, new = first.shape[:2]
        if cache is None:
            cache = self.new_cache()
        past = cache.total_length
        total = past + new
        if attention_mask is None:
            attention_mask = torch.ones(rows, total, dtype=torch.long, device=first.device)
        if position_ids is None:
            position_ids = backend.position_ids(attention_mask)[:, past:total]
        # catch-up needs the positions of earlier tokens too: the cache keeps them all
        all_positions = cache.remember_positions(position_ids)
        hidden = backend.embed(input_ids if inputs_embeds is None else None, inputs_embeds,
                               all_positions[:, past:total])
        run = _ForwardRun(self, cache, attention_mask, all_positions, past, total, rows)
        logits = run.layers(hidden)
        cache.total_length = total
        return CausalLMOutputWithPast(logits=logits.unsqueeze(1), cache=cache)


class _ForwardRun:
    """The state of one forward: the running block of hidden states `hidden`, which covers
    positions [start, total) at the current depth."""

    def __init__(self, model: EarlyExitForCausalLM, cache: EarlyExitCache, attention_mask, all_positions,
                 past: int, total: int, rows: int):
        self.model, self.backend, self.cache = model, model.backend, cache
        self.attention_mask, self.all_positions = attention_mask, all_positions
        self.past, self.total, self.rows = past, total, rows
        self.prefill = past == 0
        self.masks: dict[tuple, object] = {}

    def layers(self, hidden: torch.Tensor) -> torch.Tensor:
        model, cache, strategy = self.model, self.cache, self.model.strategy
        n = model.num_layers
        start = self.past
        exited = torch.zeros(self.rows, dtype=torch.bool, device=hidden.device)
        exit_layer = torch.full((self.rows,), n, dtype=torch.long, device=hidden.device)
        emitted = None
        record = StepRecord(exit_layer=exit_layer, depth=n, prefill=self.prefill)
        context = StepContext(len(cache.steps), self.rows, cache.strategy_state)
        depth = 0
        while depth < n:
            if model.kv_policy == "catchup":
                hidden, start = self.catch_up(depth, hidden, start, record)
            exit_index = model.exit_at.get(depth)
            if exit_index is not None:
                newest = self.exit_state(exit_index, hidden, start, record)
                logits = strategy.exit_logits(exit_index, newest)
                record.head_evals += int(strategy.uses_head(exit_index))
                leave = strategy.should_exit(exit_index, logits, newest, context) & ~exited
                if emitted is None:
                    emitted = torch.zeros_like(logits)
                emitted[leave] = logits[leave]
                exit_layer[leave] = depth
                exited |= leave
                if bool(exited.all()) and not self.prefill:
                    break
            hidden = self.run_slot(model.layers[depth], depth, hidden, start)
            record.layer_evals += 1 if self.prefill else hidden.shape[1]
            depth += 1
        record.depth = depth
        if depth == n:
            final = self.backend.logits(hidden[:, -1])
            record.head_evals += 1
            emitted = final if emitted is None else torch.where(exited[:, None], emitted, final)
            cache.pending = None  # the last layer now holds every position
        else:
            self.leave_early(depth, hidden, start, record)
        cache.steps.append(record)
        return emitted

    # -- the pieces --------------------------------------------------------------------------
    def catch_up(self, depth: int, hidden, start: int, record: StepRecord):
        """Prepend the positions layer `depth` still lacks (stored at exactly this depth)."""
        held = self.cache.slot_length(depth)
        if held >= start:
            return hidden, start
        pending_start = self.cache.slot_length(self.model.num_layers - 1)
        waiting = self.cache.pending[:, held - pending_start:start - pending_start]
        record.catchup_evals += start - held  # layer_evals counts them when the layer runs
        return torch.cat([waiting, hidden], dim=1), held

    def exit_state(self, exit_index: int, hidden, start: int, record: StepRecord) -> torch.Tensor:
        """The newest position's hidden state at this exit, after the exit's own attention layer
        if the strategy has one (run on the positions its cache slot lacks)."""
        module = self.model.exit_layer_modules[exit_index]
        if module is None:
            return hidden[:, -1]
        slot = self.model.num_layers + exit_index
        # under `skip` the slot may lack earlier positions for good; otherwise it lacks a suffix
        slot_start = self.past if self.model.kv_policy == "skip" else self.cache.slot_length(slot)
        block = hidden[:, slot_start - start:]
        out = self.run_slot(module, slot, block, slot_start)
        cost = self.model.strategy.exit_module_layer_cost(exit_index)
        record.exit_module_evals += cost * (1 if self.prefill else block.shape[1])
        return out[:, -1]

    def run_slot(self, layer, slot: int, block, block_start: int) -> torch.Tensor:
        """Run `layer` on positions [block_start, total) against cache slot `slot`."""
        cache, backend = self.cache, self.backend
        before = cache.slot_length(slot)
        held = cache.held_positions(slot)
        if held is None and before == block_start:
            key = (before, block_start)
            mask_2d = self.attention_mask[:, : self.total]
        else:  # the slot skipped positions: attend to exactly those it holds
            prefix = torch.arange(before) if held is None else held
            index = torch.cat([prefix, torch.arange(block_start, self.total)]).to(block.device)
            key = (slot,)
            mask_2d = self.attention_mask[:, index]
        mask = self.masks.get(key)
        if mask is None:
            mask = backend.layer_mask(block, mask_2d, cache, slot)
            self.masks[key] = mask
        out = backend.run_layer(layer, block, attention_mask=mask,
                                position_ids=self.all_positions[:, block_start:self.total], cache=cache)
        cache.note_appended(slot, block_start, self.total, before)
        return out

    def leave_early(self, depth: int, hidden, start: int, record: StepRecord) -> None:
        """Every row exited after `depth` layers: give the deeper layers what the policy says."""
        model, cache = self.model, self.cache
        n = model.num_layers
        if model.kv_policy == "catchup":
            # keep [start, total) at this depth; positions before `start` keep their deeper states
            pending_start = cache.slot_length(n - 1)
            older = cache.pending[:, : start - pending_start] if cache.pending is not None else hidden[:, :0]
            cache.pending = torch.cat([older, hidden], dim=1)
        elif model.kv_policy == "propagate":
            positions = self.all_positions[:, start:self.total]
            deeper = [(model.layers[j], j) for j in range(depth, n)]
            deeper += [(m, n + e) for e, m in enumerate(model.exit_layer_modules)
                       if m is not None and model.strategy.exit_layers[e] > depth]
            for layer, slot in deeper:
                before = cache.slot_length(slot)
                self.backend.fill_kv(layer, hidden, position_ids=positions, cache=cache)
                cache.note_appended(slot, start, self.total, before)
                record.kv_fill_evals += 1
        # "skip": deeper slots simply never hold these positions
