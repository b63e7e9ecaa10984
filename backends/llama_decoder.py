"""Llama's decoder, layer by layer: the Backend methods shared by every family whose language model
is a transformers `LlamaForCausalLM` (MiniGPT-4's Vicuna today).

What differs from OPT, and is handled here rather than in the engine:
- no positions are added to the input embeddings; every attention layer rotates its queries and
  keys by their position (RoPE), so running a layer takes the rotary `position_embeddings`
  (cos, sin) of the block's positions, and filling K/V by projection rotates the keys the same way;
- keys and values have `num_key_value_heads` heads (grouped-query attention: possibly fewer than
  the query heads); the cache stores them so and attention repeats them per query group;
- the read-out is RMSNorm, then the LM head.

Classes stay importable without torch (for `earlyexit list`); methods import it where needed.
"""

from __future__ import annotations


class LlamaDecoderMethods:
    """Mixin placed before `Backend`; the class using it provides `language_model`."""

    _rotary_memo: tuple | None = None

    @property
    def decoder(self):
        return self.language_model.model

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def decoder_layers(self):
        return list(self.decoder.layers)

    def embed(self, input_ids, inputs_embeds, position_ids):
        # positions enter through the rotary embedding of every layer, not here
        return self.decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def bind_cache_slot(self, layer, slot):
        layer.self_attn.layer_idx = slot

    def rotary(self, like, position_ids):
        """RoPE's (cos, sin) at `position_ids`, each (rows, positions, head_dim), in `like`'s dtype.

        Llama's own forward computes them once for all layers; the engine runs every layer of a
        step on one view of the same positions, so the last result is kept, keyed on that view's
        memory, shape and version counter. The view itself is held, so its memory cannot be
        reused by another tensor while the key stands, and any write to it changes the version."""
        key = None
        if not position_ids.is_inference():  # inference tensors keep no version counter
            key = (position_ids.data_ptr(), tuple(position_ids.shape), position_ids.stride(),
                   position_ids._version, like.dtype, like.device)
            memo = self._rotary_memo
            if memo is not None and memo[0] == key:
                return memo[2]
        cos_sin = self.decoder.rotary_emb(like, position_ids)
        self._rotary_memo = (key, position_ids, cos_sin) if key is not None else None
        return cos_sin

    def run_layer(self, layer, hidden, *, attention_mask, position_ids, cache):
        return layer(hidden, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True,
                     position_embeddings=self.rotary(hidden, position_ids))

    def pre_head(self, hidden):
        return self.decoder.norm(hidden)

    def readout_copy(self):
        import copy

        import torch

        return torch.nn.Sequential(copy.deepcopy(self.decoder.norm), copy.deepcopy(self.language_model.lm_head))

    def rotated(self, keys, like, position_ids):
        """`keys` (..., rows, heads, positions, head_dim) turned by RoPE at `position_ids`."""
        from transformers.models.llama.modeling_llama import rotate_half

        cos, sin = self.rotary(like, position_ids)
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # shared by every head
        return keys * cos + rotate_half(keys) * sin

    def projected_kv(self, layer, hidden, position_ids):
        """(keys, values) that `layer` computes from `hidden`, as its attention hands them to the
        cache: (rows, key/value heads, positions, head_dim), keys rotated by their positions."""
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        rows, length = x.shape[:2]

        def heads(projection):  # (rows, positions, kv heads * dim) -> (rows, kv heads, positions, dim)
            return projection(x).view(rows, length, -1, attention.head_dim).transpose(1, 2)

        return self.rotated(heads(attention.k_proj), x, position_ids), heads(attention.v_proj)

    def fill_kv(self, layer, hidden, *, position_ids, cache):
        keys, values = self.projected_kv(layer, hidden, position_ids)
        cache.update(keys, values, layer.self_attn.layer_idx)

    def stacked_kv_projection(self, layers):
        """(eps, weight, bias): each layer's RMSNorm scale folded into its K and V projections,
        all side by side; `project_stacked_kv` normalises once, multiplies once, rotates keys."""
        import torch

        norms = [layer.input_layernorm for layer in layers]
        if len({norm.variance_epsilon for norm in norms}) > 1:
            return None
        weights, biases = [], []
        for layer, norm in zip(layers, norms):
            for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                weights.append(norm.weight[:, None] * projection.weight.t())
                biases.append(projection.bias if projection.bias is not None
                              else projection.weight.new_zeros(projection.out_features))
        return norms[0].variance_epsilon, torch.cat(weights, 1).contiguous(), torch.cat(biases)

    def project_stacked_kv(self, stack, hidden, position_ids):
        import torch

        eps, weight, bias = stack
        x = hidden.float()  # RMSNorm without its scale (folded into the weight), in fp32 as Llama's
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
        config = self.text_config
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # (2, layers, rows, kv heads, positions, dim)
        kv = (x @ weight + bias).view(*x.shape[:2], -1, 2, config.num_key_value_heads, dim).permute(3, 2, 0, 4, 1, 5)
        return self.rotated(kv[0], hidden, position_ids), kv[1]

    def kv_projection_param_count(self, layer=None) -> int:
        layer = layer if layer is not None else self.decoder.layers[0]
        modules = [layer.input_layernorm, layer.self_attn.k_proj, layer.self_attn.v_proj]
        return sum(p.numel() for m in modules for p in m.parameters())

    def pre_head_param_count(self) -> int:
        return sum(p.numel() for p in self.decoder.norm.parameters())
