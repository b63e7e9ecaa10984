"""T5's decoder, layer by layer: the Backend methods shared by every family whose language model is
a transformers `T5ForConditionalGeneration` (BLIP-2 and InstructBLIP with FlanT5).

The encoder runs once, at full depth, inside `generate` (transformers' own encoder pass); exits
live in the decoder. What differs from a decoder-only family, and is handled here rather than in
the engine:
- every decoder layer also attends over the encoder's output (cross-attention). Its keys and
  values depend only on the encoder output and the layer's weights, so they are projected once
  per generation and per cache slot, kept in the cache's encoder part (rows first, so they follow
  beams like the rest of the cache), and only the queries are computed per step;
- no positions enter the embeddings: a relative position bias (bucketed distance, one learned
  table in the first layer) is added to every self-attention layer's scores. transformers
  computes it in the first layer and hands it on; here the backend computes it from the block's
  columns before any layer runs, so a step that skips layers, a catch-up block, or an exit
  module of the same kind gets exactly the bias the full model uses;
- the read-out is the decoder's final RMSNorm, then (when the config says so: T5 with tied
  embeddings) a scale of d_model**-0.5, then the LM head;
- the decoder starts from `decoder_start_token_id` and never holds padding (padding lives in the
  encoder input), so decoder positions are plain column indices.

Also here, for every T5 family: `plain_generate` in every family's layout, right padding, and the tiny T5 tokenizer and config
of `from_tiny_config`.

Classes stay importable without torch (for `earlyexit list`); methods import it where needed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

# The encoder's relative position bias counts columns, so padding between the image queries and the
# prompt would shift their distances: the prompt is padded on the right, as T5 was trained (the
# decoder, which starts from its own start token, never sees the padding).
RIGHT = "right"


@dataclasses.dataclass
class T5LayerInputs:
    """What a whole-sequence (teacher-forced) decoder layer call takes besides the hidden states:
    the causal self-attention mask, the relative position bias, the encoder output and its
    additive padding mask. Passed as the `attention_mask` of `run_layer` when there is no cache."""

    mask: Any
    bias: Any
    encoder_states: Any
    encoder_bias: Any


def encoder_bias(encoder_mask, dtype):
    """The encoder's 2D padding mask as an additive bias (rows, 1, 1, encoder length): 0 where a
    decoder query may look, the dtype's minimum where it may not (what transformers' T5 adds)."""
    import torch

    return torch.zeros(encoder_mask.shape, dtype=dtype, device=encoder_mask.device).masked_fill(
        encoder_mask == 0, torch.finfo(dtype).min)[:, None, None, :]


class T5DecoderMethods:
    """Mixin placed before `Backend`; the class using it provides `language_model`."""

    is_encoder_decoder = True

    # -- loading and the backbone's own generation -------------------------------------------------
    def plain_generate(self, **inputs_and_generate_kwargs):
        """The backbone's own `generate`, laid out as every family's: prompt ids, then the new
        tokens (transformers returns the decoder's start token and the new tokens)."""
        # lazy: plugin modules load for `earlyexit list`, which imports no torch
        from earlyexit.core.engine import behind_prompt

        return behind_prompt(inputs_and_generate_kwargs["input_ids"], self.model.generate(
            **inputs_and_generate_kwargs)[:, 1:])

    # -- structure -------------------------------------------------------------------------------
    @property
    def decoder(self):
        return self.language_model.decoder

    @property
    def encoder(self):
        return self.language_model.get_encoder()

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def num_layers(self) -> int:
        return len(self.decoder.block)

    def decoder_layers(self):
        return list(self.decoder.block)

    def embed(self, input_ids, inputs_embeds, position_ids):
        # positions enter through the relative position bias of every self-attention, not here
        return self.decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def bind_cache_slot(self, layer, slot):
        layer.layer[0].SelfAttention.layer_idx = slot
        layer.layer[1].EncDecAttention.layer_idx = slot

    # -- the encoder side --------------------------------------------------------------------------
    def attach_encoder(self, cache, encoder_states, encoder_mask, layers) -> None:
        """Keep what every decoder step needs of the encoder in the cache: its output, its padding
        as an additive bias, and the layer whose table gives the relative position bias (the first
        of `layers`, the decoder layers generation runs). Cross-attention K/V are filled per slot
        on first use (`cross_kv`)."""
        import torch

        if encoder_mask is None:  # no padding
            encoder_mask = torch.ones(encoder_states.shape[:2], dtype=torch.long, device=encoder_states.device)
        cache.encoder.clear()
        cache.encoder["states"] = encoder_states
        cache.encoder["bias"] = encoder_bias(encoder_mask, encoder_states.dtype)
        cache.encoder_meta = {"bias_layer": layers[0], "bias_length": -1, "bias": {}, "layers": {}}

    def cross_kv(self, layer, encoder_states):
        """(keys, values) of `layer`'s cross-attention over `encoder_states`, (rows, heads, length, d_kv)."""
        attention = layer.layer[1].EncDecAttention
        rows, length = encoder_states.shape[:2]

        def heads(projection):
            return projection(encoder_states).view(rows, length, -1, attention.key_value_proj_dim).transpose(1, 2)

        return heads(attention.k), heads(attention.v)

    def relative_bias(self, bias_layer, length: int, width: int):
        """T5's relative position bias of the queries at columns [length - width, length) against
        keys [0, length): (1, heads, width, length), from `bias_layer`'s table."""
        attention = bias_layer.layer[0].SelfAttention
        return attention.compute_bias(width, length, device=attention.relative_attention_bias.weight.device,
                                      past_seen_tokens=length - width)

    def _layer_parts(self, layer, cache):
        """What the per-step path needs of `layer`, looked up once per generation: the names of
        its slot's cross-attention K/V in the cache (projected now) and its sub-layers."""
        parts = cache.encoder_meta["layers"].get(id(layer))
        if parts is None:
            slot = layer.layer[1].EncDecAttention.layer_idx
            names = (f"cross.{slot}.k", f"cross.{slot}.v")  # static for the whole generation
            cache.encoder[names[0]], cache.encoder[names[1]] = self.cross_kv(layer, cache.encoder["states"])
            parts = cache.encoder_meta["layers"][id(layer)] = (names, layer.layer[0], cross_parts(layer.layer[1]),
                                                               layer.layer[-1])
        return parts

    # -- running a layer --------------------------------------------------------------------------
    def run_layer(self, layer, hidden, *, attention_mask, position_ids, cache):
        if cache is None:  # a whole sequence at once: `attention_mask` carries the T5LayerInputs
            inputs = attention_mask
            keys, values = self.cross_kv(layer, inputs.encoder_states)
            hidden = _clamp_fp16(layer.layer[0](hidden, attention_mask=inputs.mask, position_bias=inputs.bias)[0])
            hidden = _clamp_fp16(cross_attend(cross_parts(layer.layer[1]), hidden, keys, values, inputs.encoder_bias))
            return _clamp_fp16(layer.layer[-1](hidden))
        plan, encoder, meta = cache.plan, cache.encoder, cache.encoder_meta
        width = hidden.shape[1]
        if meta["bias_length"] != plan.length:  # one bias per step (and catch-up width), shared by every layer
            meta["bias_length"], meta["bias"] = plan.length, {}
        bias = meta["bias"].get(width)
        if bias is None:
            bias = meta["bias"][width] = self.relative_bias(meta["bias_layer"], plan.length, width)
        names, self_attention, cross, feed_forward = self._layer_parts(layer, cache)
        keys, values, cross_bias = encoder[names[0]], encoder[names[1]], encoder["bias"]
        if plan.rows is not None:
            keys, values, cross_bias = keys[plan.rows], values[plan.rows], cross_bias[plan.rows]
        hidden = _clamp_fp16(self_attention(hidden, attention_mask=attention_mask, position_bias=bias, cache=cache)[0])
        hidden = _clamp_fp16(cross_attend(cross, hidden, keys, values, cross_bias))
        return _clamp_fp16(feed_forward(hidden))

    # -- teacher forcing (training) ---------------------------------------------------------------
    def training_layout(self, batch: dict) -> dict:
        """Rows of prompt + target (labels on the target) as the encoder–decoder model trains:
        `input_ids`/`attention_mask` hold the prompt (the encoder's input, image tokens included),
        `labels` the target alone (right padded with -100); the model feeds the decoder the labels
        shifted right behind `decoder_start_token_id`."""
        import torch

        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        prompt = (mask == 1) & (labels == -100)
        target = labels != -100
        rows = ids.shape[0]
        prompt_ids = torch.full((rows, int(prompt.sum(1).max())), self.text_config.pad_token_id, dtype=ids.dtype)
        prompt_mask = torch.zeros_like(prompt_ids)
        target_ids = torch.full((rows, max(1, int(target.sum(1).max()))), -100, dtype=ids.dtype)
        for r in range(rows):
            p, t = ids[r][prompt[r]], labels[r][target[r]]
            prompt_ids[r, :len(p)], prompt_mask[r, :len(p)], target_ids[r, :len(t)] = p, 1, t
        return {**batch, "input_ids": prompt_ids.to(ids.device), "attention_mask": prompt_mask.to(ids.device),
                "labels": target_ids.to(ids.device)}

    def teacher_forcing_inputs(self, batch: dict, layers) -> tuple:
        """(decoder input embeddings, T5LayerInputs, positions, targets) for whole sequences: the
        decoder reads [start, target...] and position t predicts target t, so the engine-wide
        convention holds (hidden[:, :-1] predicts `targets`)."""
        import torch

        labels = batch["labels"]
        start = torch.full_like(labels[:, :1], self.text_config.decoder_start_token_id)
        decoder_ids = torch.cat([start, labels.masked_fill(labels == -100, self.text_config.pad_token_id)], 1)
        embeds = self.decoder_inputs_embeds(batch["pixel_values"], batch["input_ids"], **self.vision_inputs(batch))
        encoder_states = self.encoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        hidden = self.embed(decoder_ids, None, None)
        ones = torch.ones_like(decoder_ids)
        mask = self.layer_mask(hidden, ones, None, 0)
        length = decoder_ids.shape[1]
        bias = layers[0].layer[0].SelfAttention.compute_bias(length, length, device=hidden.device)
        inputs = T5LayerInputs(mask=mask, bias=bias, encoder_states=encoder_states,
                               encoder_bias=encoder_bias(batch["attention_mask"], encoder_states.dtype))
        return hidden, inputs, self.position_ids(ones), labels

    def layer_mask(self, block, attention_mask_2d, cache, slot):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.decoder.config, inputs_embeds=block, attention_mask=attention_mask_2d,
                                  cache=cache)

    # -- read-out ----------------------------------------------------------------------------------
    def pre_head(self, hidden):
        hidden = self.decoder.final_layer_norm(hidden)
        if self.text_config.scale_decoder_outputs:  # T5 with tied embeddings rescales before the head
            hidden = hidden * self.text_config.d_model ** -0.5
        return hidden

    def readout_copy(self):
        import copy

        import torch

        parts = [copy.deepcopy(self.decoder.final_layer_norm)]
        if self.text_config.scale_decoder_outputs:
            parts.append(scale_module()(self.text_config.d_model ** -0.5))
        return torch.nn.Sequential(*parts, copy.deepcopy(self.language_model.lm_head))

    # -- state propagation --------------------------------------------------------------------------
    def projected_kv(self, layer, hidden):
        attention, norm = layer.layer[0].SelfAttention, layer.layer[0].layer_norm
        x = norm(hidden)
        rows, length = x.shape[:2]

        def heads(projection):
            return projection(x).view(rows, length, -1, attention.key_value_proj_dim).transpose(1, 2)

        return heads(attention.k), heads(attention.v)

    def fill_kv(self, layer, hidden, *, position_ids, cache):
        keys, values = self.projected_kv(layer, hidden)
        cache.update(keys, values, layer.layer[0].SelfAttention.layer_idx)

    def stacked_kv_projection(self, layers):
        """(eps, weight): each layer's RMSNorm scale folded into its K and V projections, side by side."""
        import torch

        norms = [layer.layer[0].layer_norm for layer in layers]
        if len({norm.variance_epsilon for norm in norms}) > 1:
            return None
        weights = []
        for layer, norm in zip(layers, norms):
            attention = layer.layer[0].SelfAttention
            for projection in (attention.k, attention.v):
                weights.append(norm.weight[:, None] * projection.weight.t())
        return norms[0].variance_epsilon, torch.cat(weights, 1).contiguous()

    def project_stacked_kv(self, stack, hidden, position_ids):
        import torch

        eps, weight = stack
        # T5's RMSNorm without its scale (folded into the weight): the variance in float32, as T5's
        x = (hidden * torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)
        config = self.text_config
        # (2, layers, rows, heads, positions, d_kv)
        kv = (x @ weight).view(*x.shape[:2], -1, 2, config.num_heads, config.d_kv).permute(3, 2, 0, 4, 1, 5)
        return kv[0], kv[1]

    # -- cost accounting ---------------------------------------------------------------------------
    def kv_projection_param_count(self, layer=None) -> int:
        layer = layer if layer is not None else self.decoder.block[0]
        sub = layer.layer[0]
        modules = [sub.layer_norm, sub.SelfAttention.k, sub.SelfAttention.v]
        return sum(p.numel() for m in modules for p in m.parameters())

    def pre_head_param_count(self) -> int:
        return sum(p.numel() for p in self.decoder.final_layer_norm.parameters())


# -- tiny models -----------------------------------------------------------------------------------
def t5_style_tokenizer(tokenizer):
    """A tiny word-level `tokenizer` made to behave as T5's: it ends every text with </s> (and adds
    nothing in front) and pads on the right."""
    from tokenizers import processors

    tokenizer.padding_side = RIGHT
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.eos_token_id)])
    return tokenizer


def tiny_t5_config(tokenizer, num_layers: int = 4, hidden_size: int = 32, num_heads: int = 4,
                   d_kv: int | None = None, d_ff: int | None = None, encoder_layers: int | None = None,
                   feed_forward_proj: str = "gated-gelu", tie_word_embeddings: bool = False,
                   relative_attention_num_buckets: int = 8, relative_attention_max_distance: int = 20,
                   init_factor: float = 2.0, vocab_size: int | None = None):
    """A small T5 (`T5Config`) for `tokenizer`: FlanT5's kind (`gated-gelu`, untied head) unless
    told otherwise (`tie_word_embeddings=True` gives original T5's scaled, tied read-out). A
    `vocab_size` above the tokenizer's gives a real-sized LM head (benchmarks). The encoder has as
    many layers as the decoder unless `encoder_layers` says otherwise (transformers 5's own
    `generate` sizes the decoder's cache by the encoder's depth, so only symmetric models run there)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=max(vocab_size or 0, len(tokenizer)), d_model=hidden_size, d_kv=d_kv or hidden_size // num_heads,
        d_ff=d_ff or 2 * hidden_size, num_layers=encoder_layers or num_layers, num_decoder_layers=num_layers,
        num_heads=num_heads, relative_attention_num_buckets=relative_attention_num_buckets,
        relative_attention_max_distance=relative_attention_max_distance, dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie_word_embeddings, initializer_factor=init_factor,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def set_t5_generation_ids(language_model, tokenizer) -> None:
    """The ids the language model's own `generate` needs and a randomly initialised one lacks: T5's
    decoder starts from the padding token."""
    language_model.generation_config.pad_token_id = tokenizer.pad_token_id
    language_model.generation_config.decoder_start_token_id = tokenizer.pad_token_id


def cross_parts(cross) -> tuple:
    """(attention module, norm, query and output projections, d_kv, attention function, dropout) of
    a T5 cross-attention sub-layer: resolved once, so the per-step path does no lookups."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.t5.modeling_t5 import eager_attention_forward

    attention = cross.EncDecAttention
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    return attention, cross.layer_norm, attention.q, attention.o, attention.key_value_proj_dim, interface, cross.dropout


def cross_attend(parts, hidden, keys, values, bias):
    """T5's cross-attention sub-layer with its keys and values given (residual included)."""
    attention, norm, query, output, d_kv, interface, dropout = parts
    x = norm(hidden)
    rows, width = x.shape[:2]
    queries = query(x).view(rows, width, -1, d_kv).transpose(1, 2)
    training = attention.training
    out, _ = interface(attention, queries, keys, values, None, dropout=attention.dropout if training else 0.0,
                       scaling=attention.scaling, position_bias=bias)
    out = output(out.reshape(rows, width, -1))
    return hidden + (dropout(out) if training else out)


def _clamp_fp16(hidden):
    """T5 clamps float16 activations away from infinity after every sub-layer; so do we."""
    import torch

    if hidden.dtype != torch.float16:
        return hidden
    limit = torch.where(torch.isinf(hidden).any(), torch.finfo(hidden.dtype).max - 1000, torch.finfo(hidden.dtype).max)
    return torch.clamp(hidden, min=-limit, max=limit)


@functools.cache
def scale_module():
    """The class of a module that multiplies by a constant (built on first use: it needs torch)."""
    import torch

    class Scale(torch.nn.Module):
        """Multiplies by a constant (T5's d_model**-0.5 before a tied LM head)."""

        def __init__(self, factor: float):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    return Scale
