"""The early-exit forward: where a token decides to leave the language model.

`EarlyExitForCausalLM` is a causal LM whose `forward` runs the backbone's decoder layers one by
one; Hugging Face `generate` drives it, so greedy, beam search, sampling and stopping criteria
work unchanged.

Per forward (one new position per row; the prompt pass feeds the whole prompt):
1. The prompt pass runs every row at full depth and emits the final layer's logits: exits are
   not consulted (its token costs the full depth, and the accounting says so).
2. Decoding: layers run in order on the rows still going. At an exit the gate (if any) or the
   strategy decides per row, from the hidden state first; the exit's module and read-out run
   only for rows that leave, unless the rule itself asked for them (`ExitView.logits`). Rows
   that left stop costing: deeper layers run on the rest. Finished rows (fed padding after
   their end-of-sequence) cost nothing and count as no token.
3. Deeper layers lack K/V for a position that left early; `kv_policy` decides what they get:
   `catchup` (exact: the position waits with its hidden state until the same row next goes
   deeper, then runs through the layers it missed in the same call as the new position),
   `propagate` (CALM: K/V projected from the exit state) or `skip` (never seen).
4. Exit modules that attend (FREE's exit transformer) keep their own cache slot, filled with
   K/V projections of every position that reaches the exit (exact), so the whole module runs
   only where its output is needed.
Encoder-decoder backbones (T5: `backend.is_encoder_decoder`) use the same class and the same
step: `generate` lets transformers run the encoder once over the prompt, the first forward hands
its output to the backend (`attach_encoder`: kept in the cache, rows first), and from then on the
decoder is what runs layer by layer here; the backend's `run_layer` reads the encoder side from
the cache. Nothing of this runs per layer for a decoder-only backbone.
Every forward appends an `accounting.StepRecord` (exit layer per row, block widths, exit
visits); its exit layers stay on the device, and `generate` copies the trace to the host once,
at the end; `accounting` turns it into costs off the hot path.
Host syncs (each makes the host wait for the device) are only launch decisions: at the start of
a decode forward with exits on and several rows, one read of how many rows still go and, under
`catchup`, each layer's catch-up width (a lone row needs none: `_Step._start_reads`); at an exit where rows are present and the rule decides on the device,
one read of which rows leave (the deeper layers run on the rest only), plus one before it under
a `filter` gate that has candidates (the rule's batch). Nothing at an exit decided on the host
(`fixed`, a gate's extreme threshold) or where nobody can leave (`Strategy.can_leave`: PABEE's
first exits), nothing after the last exit, nothing with exits off.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from earlyexit.core import kernels
from earlyexit.core.accounting import ExitVisit, StepRecord, Trace
from earlyexit.core.backend import Backend
from earlyexit.core.cache import EarlyExitCache, WritePlan
from earlyexit.core.choices import KV_POLICIES
from earlyexit.core.strategy import ExitView, StepContext, Strategy
from earlyexit.errors import ConfigError
from earlyexit.util.devices import available_memory_bytes

STACKED_KV_BYTES = 8 << 20  # propagate through one stacked K/V projection up to this size


def check_context(backend: Backend, prompt_length: int, max_new_tokens: int, rows: int = 1,
                  slots: int | None = None) -> None:
    """Refuse, before any work, a generation longer than the model's context or whose caches
    (rows = batch x beams) would not fit where the model runs: more than the GPU's free memory
    (the weights are already there), or more than half of the host's memory on the CPU."""
    limit = getattr(backend.text_config, "max_position_embeddings", None)
    if limit and prompt_length + max_new_tokens > limit:
        raise ConfigError(f"the prompt ({prompt_length} tokens, image tokens included) plus --max-new-tokens "
                          f"{max_new_tokens} exceeds the model's context of {limit} positions; shorten the prompt "
                          "or lower --max-new-tokens")
    per_row = cache_bytes_per_row(backend, prompt_length + max_new_tokens, slots or backend.num_layers)
    device = backend.device
    needed, available = rows * per_row, available_memory_bytes(device)
    on_gpu = device.type == "cuda"
    if available and needed > (available if on_gpu else available // 2):
        where = (f"the {available / 2**30:.1f} GiB free on {device}" if on_gpu else
                 f"half of this machine's {available / 2**30:.1f} GiB")
        raise ConfigError(f"{rows} rows (batch x beams) of {prompt_length + max_new_tokens} positions need about "
                          f"{needed / 2**30:.1f} GiB of cache, more than {where}; lower --num-beams, --batch-size "
                          "or --max-new-tokens")


def cache_bytes_per_row(backend: Backend, positions: int, slots: int) -> int:
    """Keys and values of every cache slot (as many heads as the family stores: grouped-query
    models keep fewer), the waiting hidden states and the logits, for one row."""
    config = backend.text_config
    width = getattr(config, "hidden_size", 0)
    heads = getattr(config, "num_attention_heads", 0) or 1
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None)
                                                                          or width // heads)
    itemsize = next(backend.language_model.parameters()).element_size()
    return positions * itemsize * (2 * slots * kv_width + width) + getattr(config, "vocab_size", 0) * 4


class EarlyExitForCausalLM(PreTrainedModel, GenerationMixin):
    """Wraps a backend's language model; `strategy=None` means exits off (plain full depth).
    `gate` (see `earlyexit.core.gates`) replaces the strategy's rule by a cheap decision on the
    hidden state; the strategy still supplies the exit's module and read-out."""

    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    main_input_name = "input_ids"

    def __init__(self, backend: Backend, strategy: Strategy | None = None, kv_policy: str = "catchup", gate=None):
        if kv_policy not in KV_POLICIES:
            raise ConfigError(f"unknown kv policy {kv_policy!r}; choose one of {', '.join(KV_POLICIES)}")
        if gate is not None and strategy is None:
            raise ConfigError("a gate decides at a strategy's exits; pass a strategy too")
        super().__init__(backend.text_config)
        self.backend = backend
        self.strategy = strategy
        self.gate = gate
        self.kv_policy = kv_policy
        self.language_model = backend.language_model  # registered so .to()/.device/.dtype work
        self.generation_config = backend.language_model.generation_config
        self.num_layers = backend.num_layers
        self.encoder_decoder = backend.is_encoder_decoder  # exits in the decoder; the encoder runs once, in full
        own = strategy.backbone_layers() if strategy is not None else None
        if own is not None:  # the strategy's fine-tuned copies stand in for the backbone's layers
            self.own_layers = own  # registered for .to()
        self.layers = list(own) if own is not None else backend.decoder_layers()
        self.exit_at: dict[int, int] = {}  # depth -> exit index
        self.exit_attention: list[torch.nn.Module | None] = []
        self.exit_transforms: list[torch.nn.Module | None] = []
        if strategy is not None:
            self.exit_at = {k: e for e, k in enumerate(strategy.exit_layers)}
            modules = strategy.exit_modules()
            if modules is not None:
                self.exit_modules = modules  # registered for .to()
            for e in range(len(strategy.exit_layers)):
                module = strategy.exit_attention_layer(e)
                if module is not None:
                    backend.bind_cache_slot(module, self.num_layers + e)
                self.exit_attention.append(module)
                self.exit_transforms.append(strategy.exit_transform(e))
        if gate is not None:
            self.gate_modules = gate  # registered for .to()
        self._follow_backbone()
        for module in (self.language_model, getattr(self, "own_layers", None), getattr(self, "exit_modules", None),
                       getattr(self, "gate_modules", None)):
            if isinstance(module, torch.nn.Module):
                kernels.install(module)  # as `Backend` does for the backbone (idempotent)
        # a row fed padding or an end-of-sequence token has finished: it costs nothing more
        config = self.generation_config
        ends = [config.pad_token_id] + (config.eos_token_id if isinstance(config.eos_token_id, (list, tuple))
                                        else [config.eos_token_id])
        ends = [t for t in ends if t is not None]
        self.end_ids = torch.tensor(ends, dtype=torch.long) if ends else None
        self.eager_masks = getattr(backend.text_config, "_attn_implementation", "sdpa") == "eager"
        # self-speculative decoding drives these (see earlyexit.core.speculative)
        self.force_exit: int | None = None  # every row leaves at this exit index (drafting)
        self.read_block = False  # the final head reads every position of its block (verification)
        self.keep_states = False  # keep each forward's embedded inputs and final-layer block (feature drafters)
        self.kept_inputs = self.kept_top = None
        self.draft_vocabulary: torch.Tensor | None = None  # token ids a forced exit reads out (drafting)
        # token ids every exit reads out when it decides and emits (`--exit-vocabulary`); the final
        # layer always reads the whole vocabulary
        self.exit_vocabulary: torch.Tensor | None = None
        self.last_cache: EarlyExitCache | None = None
        self._propagation: dict = {}

    def shares_head(self, exit_index: int) -> bool:
        """Whether the exit reads out through the backbone's shared head, the only read-out a
        vocabulary can restrict (a strategy's own read-out or `exit_logits` is left as it is)."""
        strategy = self.strategy
        return strategy.exit_readout(exit_index) is None and type(strategy).exit_logits is Strategy.exit_logits

    def readout_vocabulary(self, exit_index: int, drafting: bool) -> torch.Tensor | None:
        """The token ids exit `exit_index` reads out over (None: all of them): when drafting, the
        draft vocabulary if there is one; else the exit vocabulary; only where the exit shares
        the head."""
        vocabulary = self.draft_vocabulary if drafting and self.draft_vocabulary is not None else self.exit_vocabulary
        return vocabulary if vocabulary is not None and self.shares_head(exit_index) else None

    def exit_logits(self, exit_index: int, state: torch.Tensor) -> torch.Tensor:
        """The exit's logits (rows, vocab) from its state. Over a restricted vocabulary only those
        columns are computed, the rest are -inf: a token outside it is never chosen there, and a
        softmax is over its tokens alone (what a confidence rule then compares to its threshold)."""
        vocabulary = self.readout_vocabulary(exit_index, drafting=self.force_exit is not None)
        if vocabulary is None:
            return self.strategy.exit_logits(exit_index, state)
        read = self.backend.logits(state, vocabulary)
        return read.new_full((read.shape[0], self.backend.language_model.lm_head.out_features),
                             float("-inf")).index_copy_(1, vocabulary, read)

    def _follow_backbone(self) -> None:
        """Exit modules, the strategy's layer copies and a learned gate on the language model's
        device and in its dtype (a no-op when they are there already)."""
        weight = next(self.language_model.parameters())
        for name in ("own_layers", "exit_modules", "gate_modules"):
            module = getattr(self, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(device=weight.device, dtype=weight.dtype)

    def exit_slots_after(self, depth: int) -> list[int]:
        """Cache slots of the attending exit modules past `depth` layers."""
        return [self.num_layers + e for e, m in enumerate(self.exit_attention)
                if m is not None and self.strategy.exit_layers[e] > depth]

    def propagation(self, depth: int):
        """(slots, stacked K/V projection or None) of every slot deeper than `depth`: the backbone
        layers from `depth` on and the attending exit modules past it. Built once per generation."""
        if depth not in self._propagation:
            n = self.num_layers
            slots = list(range(depth, n)) + self.exit_slots_after(depth)
            layers = [self.layers[s] if s < n else self.exit_attention[s - n] for s in slots]
            stack = None
            # small models: one matmul instead of a dozen small calls (Python overhead dominates
            # there); large ones: per-layer projections, memory-bound anyway and no weight copy
            kv_params = self.backend.kv_projection_param_count() * len(layers)
            if kv_params * self.dtype.itemsize <= STACKED_KV_BYTES:
                with torch.no_grad():
                    stack = self.backend.stacked_kv_projection(layers)
            self._propagation[depth] = (slots, stack)  # slots stay a Python list: no read-back per token
        return self._propagation[depth]

    # -- generation --------------------------------------------------------------------------
    def new_cache(self) -> EarlyExitCache:
        return EarlyExitCache(self.num_layers + len(self.exit_attention), num_layers=self.num_layers)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        """Like the backbone's `generate`: with `pixel_values` (and the backend's other vision
        inputs, `Backend.vision_input_names`), image features fill the image placeholders of
        `input_ids`. The per-token trace is left in `self.last_trace`.
        Sequences read the same for every family: the prompt's ids, then the generated tokens (an
        encoder–decoder backbone's decoder start token is left out; its prompt went through the
        encoder)."""
        vision = {k: kwargs.pop(k) for k in self.backend.vision_input_names if k in kwargs}
        first = input_ids if input_ids is not None else inputs_embeds
        beams = kwargs.get("num_beams") or self.generation_config.num_beams or 1
        check_context(self.backend, first.shape[1], kwargs.get("max_new_tokens") or self.generation_config.max_new_tokens
                      or 0, rows=first.shape[0] * beams, slots=self.num_layers + len(self.exit_attention))
        self.last_vision_layers = None  # vision layers run per image, when the strategy stops the tower early
        if pixel_values is not None and inputs_embeds is None:
            saturation = self.strategy.vision_saturation() if self.strategy is not None else None
            features = None
            if saturation is not None:
                if not self.backend.vision_layers:
                    raise ConfigError(f"backend {self.backend.name!r} cannot stop its vision tower early; "
                                      "drop the strategy's vision option")
                features, self.last_vision_layers = self.backend.image_features(pixel_values, saturation, **vision)
            inputs_embeds = self.backend.decoder_inputs_embeds(pixel_values, input_ids, features, **vision)
        if self.strategy is not None:
            self.strategy.reset()
        self._propagation = {}  # weights may have changed since the last generation
        cache = kwargs.pop("cache", None) or self.new_cache()
        wants_dict = kwargs.get("return_dict_in_generate", False)
        kwargs["return_dict_in_generate"] = True
        if (kwargs.get("num_beams") or self.generation_config.num_beams or 1) > 1:
            kwargs["output_scores"] = True  # gives beam_indices: which beam each returned token came from
        if self.encoder_decoder:  # transformers runs the encoder once over the prompt (as the backbone's generate)
            out = super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, **kwargs)
            new_tokens = out.sequences[:, 1:]  # after the decoder's start token
            out.sequences = behind_prompt(input_ids, new_tokens) if input_ids is not None else new_tokens
        else:
            out = super().generate(
                input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, **kwargs
            )
            new_tokens = out.sequences[:, input_ids.shape[1] if input_ids is not None else 0:]
        self.last_cache = cache
        self.last_trace = Trace.from_generation(
            cache.steps,
            new_tokens,
            getattr(out, "beam_indices", None),
            eos_token_id=self.generation_config.eos_token_id,
            num_layers=self.num_layers,
        )
        self.last_trace.vision_layers = self.last_vision_layers
        return out if wants_dict else out.sequences

    # -- the forward -------------------------------------------------------------------------
    def prompt_pass(self, inputs_embeds, attention_mask, cache: EarlyExitCache) -> torch.Tensor:
        """The full-depth prompt pass of a generation driven step by step (self-speculative decoding):
        the logits of the first new token. Afterwards `forward(input_ids=..., cache=cache)` feeds
        each new token, whatever the family (an encoder-decoder's encoder side is in the cache)."""
        if not self.encoder_decoder:
            return self(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache).logits
        encoder_outputs = self.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        start = torch.full((inputs_embeds.shape[0], 1), self.generation_config.decoder_start_token_id,
                           dtype=torch.long, device=inputs_embeds.device)
        return self(decoder_input_ids=start, encoder_outputs=encoder_outputs, attention_mask=attention_mask,
                    cache=cache).logits

    def get_encoder(self, modality=None):
        return self.backend.encoder if self.encoder_decoder and modality is None else super().get_encoder(modality)

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None,
                use_cache=None, position_ids=None, logits_to_keep=0, decoder_input_ids=None,
                decoder_attention_mask=None, encoder_outputs=None, **kwargs):
        backend = self.backend
        if encoder_outputs is not None:  # encoder–decoder: the decoder runs layer by layer over the encoder's output
            if cache is None:
                cache = self.new_cache()
            if cache.total_length == 0:
                backend.attach_encoder(cache, encoder_outputs[0], attention_mask, self.layers)
            input_ids, attention_mask, inputs_embeds = decoder_input_ids, decoder_attention_mask, None
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
        width = self.backend.text_config.hidden_size
        cache.reserve(rows, total, first.device, width, self.language_model.dtype)
        cache.positions[:, past:total] = position_ids
        hidden = backend.embed(input_ids if inputs_embeds is None else None, inputs_embeds, position_ids)
        if self.keep_states:
            self.kept_inputs = hidden
        step = _Step(self, cache, attention_mask, input_ids, past, total)
        logits = step.run(hidden)
        cache.total_length = total
        return CausalLMOutputWithPast(logits=logits if logits.dim() == 3 else logits.unsqueeze(1), cache=cache)


def behind_prompt(input_ids: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
    """The prompt's ids (repeated when several sequences return per prompt), then `new_tokens`."""
    repeats = new_tokens.shape[0] // input_ids.shape[0]
    return torch.cat([input_ids.repeat_interleave(repeats, 0), new_tokens], 1)


def _positions_in(picked: torch.Tensor, wanted: torch.Tensor, count: int) -> torch.Tensor:
    """Where each of `wanted` (row indices out of `count`) sits within `picked`."""
    where = torch.full((count,), -1, dtype=torch.long, device=picked.device)
    where[picked] = torch.arange(len(picked), device=picked.device)
    return where[wanted]


class _Step:
    """The state of one forward: the rows still going (`rows`), and their running `block` of
    hidden states, which covers columns [total - width, total) at the current depth (under
    `catchup` some rows' leftmost entries are padding: positions that layer already holds)."""

    def __init__(self, model: EarlyExitForCausalLM, cache: EarlyExitCache, attention_mask, input_ids,
                 past: int, total: int):
        self.model, self.backend, self.cache = model, model.backend, cache
        self.attention_mask = attention_mask
        self.input_ids = input_ids
        self.past, self.total = past, total
        self.new = total - past
        self.prefill = past == 0
        self.rows_all = True
        self.rows: torch.Tensor | None = None
        self.masks: dict = {}
        self.rows_version = 0

    # -- the loop ----------------------------------------------------------------------------
    def run(self, hidden: torch.Tensor) -> torch.Tensor:
        model, cache = self.model, self.cache
        n, total, device = model.num_layers, self.total, hidden.device
        count = hidden.shape[0]
        policy = model.kv_policy
        exit_layer = torch.full((count,), n, dtype=torch.long, device=device)
        record = StepRecord(exit_layer=exit_layer, new_positions=self.new, widths=[], exits=[],
                            kv_policy=policy, prefill=self.prefill)
        cache.steps.append(record)
        self.context = StepContext(len(cache.steps) - 1, count, cache.strategy_state)
        self.rows = torch.arange(count, device=device)
        self.emitted = None
        if policy == "skip":
            cache.reached[:, self.past:total] = n

        self.no_padding = self._no_padding()
        self.lone_depth = n  # how deep a lone row went (the host follows its cache: `_start_reads`)
        going, info = self._start_reads(count, device)
        if going is not None:
            still, info = info[0], info[1:]
            if still < count:
                order = torch.argsort(going.to(torch.int8), descending=True, stable=True)
                exit_layer.masked_fill_(~going, -1)
                self._shrink(order[:still])
                hidden = hidden[order[:still]]
                if still == 0:
                    vocab = self.backend.text_config.vocab_size
                    self.emitted = torch.zeros(count, vocab, dtype=model.language_model.dtype, device=device)
                    return self.emitted
        self._set_widths(info)

        block, width, previous = hidden, self.new, None
        for depth in range(n):
            if self.widths[depth] > width:  # catch-up: the positions this layer still lacks join
                extra = self.widths[depth]
                waiting = cache.pending[self.rows, total - extra:total - width]
                block, width = torch.cat([waiting, block], 1), extra
            if self.waits_here[depth]:
                block = self._enter_waiting(depth, block, width)
            e = model.exit_at.get(depth)
            if e is not None:
                block, width, previous = self._exit_point(e, depth, block, width, previous, record)
                if block is None:
                    break
            cache.plan = self._plan(depth, width)
            out = self.backend.run_layer(model.layers[depth], block, attention_mask=self._mask(width, depth),
                                         position_ids=self._positions(width), cache=cache)
            previous, block = block[:, -1], out
            record.widths.append(width)
        else:
            self._final(block, width, record)
        if policy == "catchup":
            depth = exit_layer.clamp(min=0)[:, None]
            cache.held = torch.where(torch.arange(n, device=device)[None] < depth, total, cache.held)
            cache.follow_held(self.lone_depth if count == 1 else None, total, self.prefill)
        return self.emitted

    def _start_reads(self, count, device):
        """The first layers' launch shapes in at most one read: which rows still go (None: all;
        finished rows run nothing) and each layer's catch-up extremes under catchup (see
        `_set_widths`). A lone row needs none: transformers stops generating when its only row
        ends (so it never feeds one that ended), and the host follows that row's `held` itself."""
        model, cache = self.model, self.cache
        going = None
        if (count > 1 and not self.prefill and model.strategy is not None and model.force_exit is None
                and self.input_ids is not None and model.end_ids is not None):
            going = ~torch.isin(self.input_ids[:, -1], model.end_ids.to(device))
        parts = [going.sum().view(1)] if going is not None else []
        self.lag, followed = None, None
        if model.kv_policy == "catchup" and not self.prefill and model.strategy is not None:  # exits off: no lag
            self.lag = self.total - cache.held
            followed = cache.held_host if count == 1 else None
            if followed is None:
                parts += self._lag_extremes(going)
        info = torch.cat(parts).tolist() if parts else []
        if followed is not None:  # the extremes of one row: its own lag
            lag = [self.total - held for held in followed]
            info = lag + lag + [int(b > a) for a, b in zip(lag, lag[1:])]
        return going, info

    def _exit_point(self, e, depth, block, width, previous, record):
        """Fill the exit's own slot, let the gate or the strategy decide, retire the rows that
        leave. Returns the block of the rows still going (None when none is)."""
        model, cache = self.model, self.cache
        visit = ExitVisit(index=e, layer=depth)
        record.exits.append(visit)
        attention = model.exit_attention[e]
        if attention is not None:  # K/V of every position reaching the exit: exact, and cheap
            cache.plan = self._plan(depth, width)
            self.backend.fill_kv(attention, block, position_ids=self._positions(width), cache=cache)
            visit.kv_positions = width
        if self.prefill:
            return block, width, previous
        count = block.shape[0]
        if model.force_exit is not None:
            if model.force_exit != e:
                return block, width, previous
            leave = None
            leaving = count
        else:
            view = ExitView(self, e, depth, block[:, -1], previous, self.rows)
            leave, ask, checked, picked = self._decide(e, view, visit)
            if isinstance(leave, bool):  # decided on the host: nothing to read
                leaving, info = (count if leave else 0), []
                leave = torch.full((count,), leave, dtype=torch.bool, device=block.device)
            else:  # the launch decision: which rows go deeper, and how wide their blocks are
                parts = [leave.sum().view(1)]
                if self.lag is not None:
                    parts += self._lag_extremes(~leave)
                info = torch.cat(parts).tolist()
                leaving, info = info[0], info[1:]
            rest = count - leaving
            if model.gate is None or checked:
                share = ((checked if checked is not None else count) - leaving) / rest if rest else 0.0
                visit.module_rest = share if ask.state_computed else 0.0
                visit.read_rest = share if ask.logits_computed else 0.0
            if leaving == 0:
                return block, width, previous
        if leave is None:
            stay, go = None, slice(None)
        else:
            order = torch.argsort(leave.to(torch.int8), stable=True)
            stay, go = order[:count - leaving], order[count - leaving:]
        rows_out = self.rows[go]
        if leave is not None and (ask.logits_computed or ask.state_computed):
            where = go if ask is view else _positions_in(picked, go, count)
            if ask.logits_computed:
                logits = ask.logits()[where]
            else:
                logits = model.exit_logits(e, ask.state()[where])
        else:
            logits = model.exit_logits(e, self.exit_state(e, block[go, -1], rows_out))
        self._emit(rows_out, logits)
        self.cache.steps[-1].exit_layer.index_fill_(0, rows_out, depth)
        self._leave(depth, rows_out, block[go], width)
        if leaving == count:
            self.lone_depth = depth
            return None, width, previous
        self._shrink(self.rows[stay], local=stay)
        block, previous = block[stay], (previous[stay] if previous is not None else None)
        self._set_widths(info)
        trimmed = self.widths[depth]
        if trimmed < width:  # the rows left behind need fewer catch-up positions here
            block, width = block[:, width - trimmed:], trimmed
        return block, width, previous

    def _decide(self, e, view, visit):
        """Which rows present at exit `e` leave: a bool tensor, or a Python bool for all of them
        where the rule or the gate decided on the host. Also the view whose rows the rule saw,
        how many rows a filter gate offered the rule (None without one) and which (None: all)."""
        model = self.model
        if model.gate is None:
            leave = model.strategy.should_exit(e, view, self.context)
            return (leave if model.strategy.can_leave(e) else False), view, None, None
        visit.gate = True
        candidates = model.gate.decide(e, view)
        if model.gate.mode == "replace":
            return candidates, view, None, None  # the rule does not run
        # filter: the rule confirms the gate's candidates, and only they pay its module and read-out;
        # how many there are is a launch decision (the rule's batch)
        count = view.hidden.shape[0]
        checked = (count if candidates else 0) if isinstance(candidates, bool) else int(candidates.sum())
        if checked == 0:
            return False, view, 0, None
        if checked == count:
            return model.strategy.should_exit(e, view, self.context), view, checked, None
        picked = torch.argsort(candidates.to(torch.int8), descending=True, stable=True)[:checked]
        ask = ExitView(self, e, view.layer, view.hidden[picked], None if view.previous is None else
                       view.previous[picked], self.rows[picked])
        verdict = model.strategy.should_exit(e, ask, self.context)
        if isinstance(verdict, bool):
            return (candidates if verdict else False), ask, checked, picked
        return torch.zeros_like(candidates).index_copy_(0, picked, verdict), ask, checked, picked

    def exit_state(self, e: int, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The newest position's state after exit `e`'s own modules, for `rows` (charged by the
        caller's accounting: whoever asks for it runs it)."""
        model, cache = self.model, self.cache
        attention = model.exit_attention[e]
        if attention is not None:
            cache.plan = WritePlan(rows=None if self._is_all(rows) else rows, start=self.total - 1, columns=None,
                                   length=self.total)
            hidden = self.backend.run_layer(attention, hidden[:, None], attention_mask=self._mask(1, None, rows, e),
                                            position_ids=cache.positions[rows, self.total - 1:self.total],
                                            cache=cache)[:, 0]
        transform = model.exit_transforms[e]
        return transform(hidden) if transform is not None else hidden

    def _final(self, block, width, record):
        model = self.model
        if model.keep_states:
            model.kept_top = block
        if model.read_block:  # verification reads every real position of the block
            logits = self.backend.logits(block)
            record.final_readouts = width
        else:
            logits = self.backend.logits(block[:, -1])
        if self.emitted is None and self.rows_all:
            self.emitted = logits
        else:
            self._emit(self.rows, logits)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _emit(self, rows, logits):
        if self.emitted is None:
            shape = (self.cache.positions.shape[0],) + tuple(logits.shape[1:])
            self.emitted = logits.new_zeros(shape)
        self.emitted.index_copy_(0, rows, logits.to(self.emitted.dtype))

    def _leave(self, depth: int, rows: torch.Tensor, block: torch.Tensor, width: int) -> None:
        """`rows` left after `depth` layers: give the deeper slots what the policy says."""
        model, cache, total = self.model, self.cache, self.total
        n = model.num_layers
        if model.kv_policy == "catchup":  # the block's real positions wait at this depth
            columns = torch.arange(total - width, total, device=block.device)
            held = cache.held[rows, depth]
            columns = torch.where(columns[None] >= held[:, None], columns[None], cache.scratch)
            cache.pending[rows[:, None], columns] = block
        elif model.kv_policy == "propagate":
            slots, stack = model.propagation(depth)
            newest = block[:, -self.new:]
            if stack is not None:  # every deeper slot's K/V in one matmul
                # (slots, rows, heads, new, dim) each, the buffer's own layout
                keys, values = self.backend.project_stacked_kv(stack, newest, cache.positions[rows, self.past:total])
                chosen = slice(None) if self._is_all(rows) else rows
                deep = n - depth  # backbone slots depth..n-1 are contiguous: plain slicing
                cache.keys[depth:n, chosen, :, self.past:total] = keys[:deep]
                cache.values[depth:n, chosen, :, self.past:total] = values[:deep]
                for i, slot in enumerate(model.exit_slots_after(depth)):
                    cache.keys[slot, chosen, :, self.past:total] = keys[deep + i]
                    cache.values[slot, chosen, :, self.past:total] = values[deep + i]
            else:
                cache.plan = WritePlan(rows=rows, start=self.past, columns=None, length=total)
                positions = cache.positions[rows, self.past:total]
                for slot in slots:
                    layer = model.layers[slot] if slot < n else model.exit_attention[slot - n]
                    self.backend.fill_kv(layer, newest, position_ids=positions, cache=cache)
        else:  # skip: deeper slots never hold these positions
            cache.reached[rows, self.past:total] = depth

    def _shrink(self, rows: torch.Tensor, local=None) -> None:
        self.rows = rows
        self.rows_all = False
        self.rows_version += 1
        if self.lag is not None and local is not None:
            self.lag = self.lag[local]
        elif self.lag is not None:
            self.lag = self.lag[rows]

    def _no_padding(self) -> bool:
        """Whether no position of the mask is padding. Read once, at the prompt pass: decoding
        only appends ones to the mask (transformers' loop, speculative decoding), so the answer
        holds for the whole generation without a sync per token."""
        cache = self.cache
        if self.prefill or cache.no_padding is None:
            cache.no_padding = bool(self.attention_mask[:, :self.total].all())
        return cache.no_padding

    def _is_all(self, rows) -> bool:
        return self.rows_all and rows is self.rows

    def _lag_extremes(self, keep):
        """Per layer, the most and fewest positions a kept row lacks (its catch-up width), and
        whether some kept row has positions waiting at exactly that depth (it lacks more there
        than one layer earlier: they left at this depth)."""
        lag = self.lag
        if keep is not None:
            keep = keep[:, None]
            most, fewest = lag.masked_fill(~keep, 0).amax(0), lag.masked_fill(~keep, 1 << 30).amin(0)
            lag = lag.masked_fill(~keep, 0)
        else:
            most, fewest = lag.amax(0), lag.amin(0)
        return [most, fewest, (lag[:, 1:] > lag[:, :-1]).any(0).long()]

    def _set_widths(self, info: list[int]) -> None:
        n = self.model.num_layers
        if self.lag is None:
            self.widths, self.ragged, self.waits_here = [self.new] * n, [False] * n, [False] * n
        else:
            most, fewest, starts = info[:n], info[n:2 * n], info[2 * n:3 * n - 1]
            self.widths = [max(m, self.new) for m in most]
            self.ragged = [m != f for m, f in zip(most, fewest)]
            self.waits_here = [False] + [bool(x) for x in starts]

    def _enter_waiting(self, depth: int, block: torch.Tensor, width: int) -> torch.Tensor:
        """Put into the block the states of the positions that wait at exactly this depth (held
        by the layer before, not by this one). Where the block already covered them they were
        padding for their row until here: another row's catch-up had widened it earlier."""
        held = self.cache.held[self.rows]
        columns = torch.arange(self.total - width, self.total, device=block.device)[None]
        waiting = (columns >= held[:, depth, None]) & (columns < held[:, depth - 1, None])
        pending = self.cache.pending[self.rows, self.total - width:self.total]
        return torch.where(waiting[..., None], pending.to(block.dtype), block)

    def _plan(self, depth: int, width: int) -> WritePlan:
        rows = None if self.rows_all else self.rows
        total = self.total
        if self.lag is None or not self.ragged[depth]:
            return WritePlan(rows=rows, start=total - width, columns=None, length=total)
        columns = torch.arange(total - width, total, device=self.rows.device)
        held = self.cache.held[self.rows, depth]
        columns = torch.where(columns[None] >= held[:, None], columns[None], self.cache.scratch)
        return WritePlan(rows=rows, start=None, columns=columns, length=total)

    def _positions(self, width: int) -> torch.Tensor:
        positions = self.cache.positions
        if self.rows_all:
            return positions[:, self.total - width:self.total]
        return positions[self.rows, self.total - width:self.total]

    def _mask(self, width: int, depth: int | None, rows=None, exit_index: int | None = None):
        """The attention mask of a block of `width` newest positions against [0, total): causal,
        padding, and under `skip` the positions this slot holds; every query sees itself (so a
        padded or padding query stays finite)."""
        skip = self.model.kv_policy == "skip"
        rows = self.rows if rows is None else rows
        all_rows = rows is self.rows and self.rows_all
        if width == 1 and self.no_padding and not skip:
            return None
        key = (width, self.rows_version, (depth, exit_index) if skip else None) if rows is self.rows else None
        mask = self.masks.get(key) if key is not None else None
        if mask is not None:
            return mask
        total = self.total
        allowed = self.attention_mask[:, :total].bool()
        if not all_rows:
            allowed = allowed[rows]
        if skip:
            reached = self.cache.reached[rows, :total]
            held = reached >= self.model.strategy.exit_layers[exit_index] if exit_index is not None else reached > depth
            allowed = allowed & held
        queries = torch.arange(total - width, total, device=allowed.device)
        keys = torch.arange(total, device=allowed.device)
        causal = keys[None] <= queries[:, None]
        mask = (allowed[:, None, :] & causal[None]) | (keys[None] == queries[:, None])[None]
        mask = mask[:, None]
        if self.model.eager_masks:
            dtype = self.model.language_model.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        if key is not None:
            self.masks[key] = mask
        return mask
