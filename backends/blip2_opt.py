"""BLIP-2 with an OPT language model (`blip2-opt`): how the family is wired.

Image -> ViT -> Q-Former (`num_query_tokens` queries) -> linear projection -> the embeddings of
the `<image>` placeholder tokens the processor puts in front of the prompt -> OPT decoder.
OPT adds learned absolute positions to the input embeddings (offset 2, pads at position -1), so
its layers themselves take no positions; the read-out is final layer norm, `project_out` where
the word-embedding width differs, then the LM head (tied to the input embeddings).
"""

from __future__ import annotations

from earlyexit import hookimpl
from earlyexit.backends.blip2_vision import saturating_query_features, scatter_image_features, tiny_blip2
from earlyexit.core.backend import Backend
from earlyexit.core.model_folder import load_checkpoint
from earlyexit.data.images import to_rgb
from earlyexit.data.tokenizer import DEFAULT_WORDS, build_processor
from earlyexit.errors import ConfigError


class Blip2OptBackend(Backend):
    name = "blip2-opt"
    description = "BLIP-2 with an OPT decoder (Blip2ForConditionalGeneration), e.g. Salesforce/blip2-opt-2.7b"
    text_model_type = "opt"  # the language model `from_pretrained` accepts (BLIP-2 with FlanT5 shares the loader)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", device: str = "cpu") -> Blip2OptBackend:
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        model, processor, _ = load_checkpoint(name_or_path, "blip-2", cls.text_model_type,
                                              f"BLIP-2 with {cls.text_model_type}", Blip2ForConditionalGeneration,
                                              AutoProcessor, dtype)
        processor.tokenizer.padding_side = "left"
        return cls(model.to(device).eval(), processor)

    @classmethod
    def from_tiny_config(cls, seed: int = 0, num_layers: int = 4, hidden_size: int = 32, num_heads: int = 4,
                         ffn_dim: int | None = None, word_embed_proj_dim: int | None = None,
                         num_query_tokens: int = 4, image_size: int = 16, patch_size: int | None = None,
                         vision_hidden: int = 32, vision_layers: int = 1, qformer_layers: int = 1,
                         do_layer_norm_before: bool = True, init_std: float = 0.2,
                         vocab_size: int | None = None, words=None,
                         encoder_init_std: float = 0.02) -> Blip2OptBackend:
        """A small randomly initialised BLIP-2 OPT with a word-level tokenizer and a real
        processor. A `vocab_size` above the tokenizer's gives a real-sized LM head (benchmarks)."""
        from transformers import OPTConfig


        processor = build_processor(image_size=image_size, num_query_tokens=num_query_tokens,
                                    words=words or DEFAULT_WORDS)
        tokenizer = processor.tokenizer
        text = OPTConfig(
            vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden_size, num_hidden_layers=num_layers,
            ffn_dim=ffn_dim or 4 * hidden_size, num_attention_heads=num_heads, max_position_embeddings=256,
            word_embed_proj_dim=word_embed_proj_dim or hidden_size, do_layer_norm_before=do_layer_norm_before,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, init_std=init_std, dropout=0.0, attention_dropout=0.0,
        )
        model = tiny_blip2(text, processor, seed, num_query_tokens, image_size, patch_size, vision_hidden,
                           vision_layers, qformer_layers, encoder_init_std)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return cls(model, processor)

    # -- inputs ------------------------------------------------------------------------------
    def prepare_inputs(self, images, prompts=None):
        if self.processor is None:
            raise ConfigError("this model has no processor; load it from a folder that holds one")
        from PIL import Image


        prompts = prompts if prompts is not None else [""] * len(images)
        # 16-bit, float and "La" images scaled to 8-bit RGB, not clipped (arrays pass as they are)
        images = [to_rgb(image) if isinstance(image, Image.Image) else image for image in images]
        return self.on_model(dict(self.processor(images=images, text=prompts, padding=True, return_tensors="pt")))

    @property
    def vision_layers(self) -> int:
        return len(self.model.vision_model.encoder.layers)

    def image_features(self, pixel_values, saturation=None):
        if saturation is None:
            return self.model.get_image_features(pixel_values, return_dict=True).pooler_output, None

        return saturating_query_features(self.model, pixel_values, saturation)

    def decoder_inputs_embeds(self, pixel_values, input_ids, image_features=None):
        features = image_features if image_features is not None else self.image_features(pixel_values)[0]
        return scatter_image_features(self.model, input_ids, features)

    # -- the language model --------------------------------------------------------------------
    @property
    def language_model(self):
        return self.model.language_model

    @property
    def decoder(self):
        return self.model.language_model.model.decoder

    @property
    def text_config(self):
        return self.model.language_model.config

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def decoder_layers(self):
        return list(self.decoder.layers)

    def position_ids(self, attention_mask):
        # OPT counts positions over the unpadded tokens and puts pads at -1
        return (attention_mask.long().cumsum(-1) * attention_mask - 1).long()

    def embed(self, input_ids, inputs_embeds, position_ids):
        decoder = self.decoder
        if inputs_embeds is None:
            inputs_embeds = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            inputs_embeds = decoder.project_in(inputs_embeds)
        return inputs_embeds + decoder.embed_positions(None, 0, position_ids=position_ids)

    def bind_cache_slot(self, layer, slot):
        layer.self_attn.layer_idx = slot

    def run_layer(self, layer, hidden, *, attention_mask, position_ids, cache):
        return layer(hidden, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True)

    def pre_head(self, hidden):
        decoder = self.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return hidden

    def readout_copy(self):
        import copy

        import torch

        decoder = self.decoder
        parts = (decoder.final_layer_norm, decoder.project_out, self.language_model.lm_head)
        return torch.nn.Sequential(*(copy.deepcopy(m) for m in parts if m is not None))

    def fill_kv(self, layer, hidden, *, position_ids, cache):
        attention = layer.self_attn
        x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        rows = x.shape[0]
        keys = attention.k_proj(x).view(rows, -1, attention.num_heads, attention.head_dim).transpose(1, 2)
        values = attention.v_proj(x).view(rows, -1, attention.num_heads, attention.head_dim).transpose(1, 2)
        cache.update(keys, values, attention.layer_idx)

    def stacked_kv_projection(self, layers):
        import torch

        weights, biases, eps = [], [], None
        for layer in layers:
            attention = layer.self_attn
            if layer.do_layer_norm_before:  # fold the norm's affine into the projections
                norm = layer.self_attn_layer_norm
                eps = norm.eps
                gamma, beta = norm.weight, norm.bias
            else:
                gamma = beta = None
            for projection in (attention.k_proj, attention.v_proj):
                weight = projection.weight.t()
                bias = projection.bias if projection.bias is not None else weight.new_zeros(weight.shape[1])
                if gamma is not None:
                    bias = bias + beta @ weight
                    weight = gamma[:, None] * weight
                weights.append(weight)
                biases.append(bias)
        if len({layer.do_layer_norm_before for layer in layers}) > 1:
            return None
        return eps, torch.cat(weights, 1).contiguous(), torch.cat(biases)

    # -- cost accounting -----------------------------------------------------------------------
    def kv_projection_param_count(self, layer=None) -> int:
        layer = layer if layer is not None else self.decoder.layers[0]
        modules = [layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn_layer_norm]
        return sum(p.numel() for m in modules for p in m.parameters())

    def pre_head_param_count(self) -> int:
        modules = [self.decoder.final_layer_norm, self.decoder.project_out]
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())


@hookimpl
def earlyexit_register_backends():
    return [Blip2OptBackend]
