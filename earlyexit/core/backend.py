"""The Backend contract: everything that differs between model families.

A backend wraps one loaded vision-language model. Strategies and the engine only talk to the
language model through these methods, so they never branch on the family. Classes stay
importable without torch (for `earlyexit list`); methods import it where needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from earlyexit.util.devices import resolve_device, resolve_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch


class Backend:
    """One model family. Subclasses set `name` and `description` and implement the methods below.

    Layer indices are 0-based here (`run_layer(0, ...)` is the first decoder layer); exit layers
    elsewhere are 1-based counts ("after k layers").
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, model: Any, processor: Any = None):
        from earlyexit.core import kernels  # lazy: the contract imports no torch

        self.model = model
        self.processor = processor
        kernels.install(model)  # few-row CPU matmuls, for the full model and the exits alike

    # -- loading -----------------------------------------------------------------------------
    TINY_RANDOM = "tiny-random"

    @classmethod
    def load(cls, name_or_path: str, device: str | None = None, dtype: str | None = None) -> Backend:
        """`from_pretrained` on a folder or hub id or, for the name `tiny-random`, an untrained
        12-layer model built in memory (no download, no weights: for trying commands and measuring
        cost, not quality). The embedded models (`tiny`, `smol`) are resolved a layer up
        (`earlyexit.models.loading.load_backend`). `device` (cpu, cuda, cuda:N, mps) and `dtype`
        (float32, bfloat16, float16) default to the CPU in float32 here (the CLI's defaults pick a
        GPU when there is one); a value this machine cannot run is a ConfigError before anything
        loads."""
        device = resolve_device(device or "cpu")
        dtype = resolve_dtype(dtype or "float32", device)
        if name_or_path == cls.TINY_RANDOM:
            return cls.from_tiny_config(seed=0, num_layers=12, hidden_size=64).to(device, dtype)
        return cls.from_pretrained(name_or_path, device=device, dtype=dtype)

    def to(self, device: str | None = None, dtype: str | None = None) -> Backend:
        """Move the whole model (vision side included) to `device` and/or `dtype` (names as
        `load` takes them); returns the backend."""
        import torch

        self.model.to(device=device, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return self

    @property
    def device(self) -> torch.device:
        """Where the language model's weights are (inputs and exits follow them)."""
        return next(self.language_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The language model's floating-point dtype (exits and caches follow it)."""
        return next(p for p in self.language_model.parameters() if p.is_floating_point()).dtype

    def on_model(self, inputs: dict) -> dict:
        """`inputs` (tensors by name) on the model's device, `pixel_values` in its dtype: what
        `prepare_inputs` and the training batches hand on."""
        import torch

        device, dtype = self.device, self.dtype
        return {k: (v.to(device=device, dtype=dtype if k == "pixel_values" and v.is_floating_point() else None)
                    if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str = "cpu", dtype: str = "float32") -> Backend:
        """Load weights (in `dtype`, onto `device`) and processor from a hub id or a local
        `save_pretrained` folder."""
        raise NotImplementedError

    @classmethod
    def from_tiny_config(cls, seed: int = 0, **overrides) -> Backend:
        """A tiny randomly initialised model of this family (tests, benchmarks)."""
        raise NotImplementedError

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        if self.processor is not None:
            self.processor.save_pretrained(path)

    # -- inputs ------------------------------------------------------------------------------
    def prepare_inputs(self, images: list, prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Processor output for a batch: `pixel_values`, `input_ids`, `attention_mask` (left padded),
        the `vision_input_names` inputs, on the model's device, pixel values in its dtype (`on_model`)."""
        raise NotImplementedError

    def prompt_ids(self, prompt: str) -> list[int]:
        """One row's prompt as token ids, image placeholders included, unpadded: what
        `prepare_inputs` gives that row (training appends the target after it). This default is
        BLIP-2's layout: `num_query_tokens` image tokens, then the tokenized prompt (BOS first)."""
        config = self.model.config
        return [config.image_token_id] * config.num_query_tokens + self.processor.tokenizer(prompt)["input_ids"]

    vision_input_names: ClassVar[tuple[str, ...]] = ()
    """Model inputs besides `pixel_values` that the image side reads, one row per image (InstructBLIP's
    Q-Former reads the instruction: `qformer_input_ids`, `qformer_attention_mask`). `prepare_inputs`
    and the training batches give them; wherever image features are computed they travel with
    `pixel_values` (`vision_inputs`) and reach `image_features` and `decoder_inputs_embeds` as keyword
    arguments. Empty for families whose image side reads the image alone (nothing is passed)."""

    def vision_inputs(self, inputs: dict) -> dict:
        """The `vision_input_names` entries of a batch of inputs (keyword arguments for
        `image_features` and `decoder_inputs_embeds`)."""
        return {k: inputs[k] for k in self.vision_input_names if inputs.get(k) is not None}

    def prompt_vision_inputs(self, prompts: list[str]) -> dict:
        """The `vision_input_names` inputs of a batch of prompts (tensors on the model's device) as
        `prepare_inputs` builds them: training batches, built from `prompt_ids`, add these."""
        return {}

    def decoder_inputs_embeds(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                              image_features: torch.Tensor | None = None, **vision_inputs) -> torch.Tensor:
        """Language-model input embeddings with the image features (computed from `pixel_values`
        and `vision_inputs` unless given) scattered into the image placeholders."""
        raise NotImplementedError

    vision_layers: int = 0
    """Layers of the vision tower (0 when the backend cannot stop it early)."""

    def image_features(self, pixel_values: torch.Tensor, saturation: float | None = None, **vision_inputs) -> tuple:
        """(image features as the language model takes them, vision layers run per image or None).
        With `saturation`, each image's vision tower stops after the first layer whose output has
        a mean cosine similarity of at least `saturation` with its input (MuE's encoder exit).
        `vision_inputs`: the `vision_input_names` inputs of the same rows."""
        raise NotImplementedError

    def plain_generate(self, **inputs_and_generate_kwargs) -> torch.Tensor:
        """The backbone's own `generate` (the reference the early-exit model must match)."""
        return self.model.generate(**inputs_and_generate_kwargs)

    # -- the language model, layer by layer --------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def text_config(self) -> Any:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    def decoder_layers(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Absolute position of every position of the sequence (rows, length), as the family's
        own forward computes it from a (left-padded) attention mask."""
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.masked_fill(attention_mask == 0, 1)

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
              position_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering the first decoder layer for the given positions."""
        raise NotImplementedError

    def layer_mask(self, block: torch.Tensor, attention_mask_2d: torch.Tensor, cache: Any, slot: int) -> Any:
        """The attention mask for a block of new positions at cache slot `slot`, whose 2D mask
        covers the slot's held positions followed by the block."""
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.text_config, inputs_embeds=block,
                                  attention_mask=attention_mask_2d, cache=cache, layer_idx=slot)

    def bind_cache_slot(self, layer: torch.nn.Module, slot: int) -> None:
        """Make `layer` (an exit module of the backbone's layer kind) write its K/V to `slot`."""
        raise NotImplementedError

    def run_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, *, attention_mask: Any,
                  position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Run one decoder layer (a backbone layer or an exit module of the same kind) on a block
        of positions, appending their K/V to the layer's cache slot."""
        raise NotImplementedError

    def pre_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head reads: the final norm and any projection or scale before it."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor, vocabulary: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits from any hidden state (`pre_head`, then the LM head). With
        `vocabulary` (token ids), only those columns are computed, in that order: a draft's
        read-out costs len(vocabulary) / vocabulary size of the head's."""
        head = self.language_model.lm_head
        if vocabulary is None:
            return head(self.pre_head(hidden))
        from earlyexit.core.kernels import linear  # lazy: the contract imports no torch

        rows = self._head_rows(vocabulary)
        bias = None if head.bias is None else head.bias[vocabulary]
        return linear(self.pre_head(hidden), rows, bias)

    def _head_rows(self, vocabulary: torch.Tensor) -> torch.Tensor:
        """The head's weight rows of `vocabulary`, gathered once per vocabulary (not per token)."""
        weight = self.language_model.lm_head.weight
        memo = getattr(self, "_head_rows_memo", None)
        if memo is None or memo[0] is not vocabulary or memo[1] is not weight:
            memo = (vocabulary, weight, weight[vocabulary].contiguous())
            self._head_rows_memo = memo
        return memo[2]

    def readout_copy(self) -> torch.nn.Module:
        """A trainable copy of the read-out (`logits`: final norm, projections, LM head) as one
        module mapping hidden states to logits: the starting point of classifier exits."""
        raise NotImplementedError

    def fill_kv(self, layer: torch.nn.Module, hidden: torch.Tensor, *, position_ids: torch.Tensor,
                cache: Any) -> None:
        """Append to `layer`'s cache slot the K/V it projects from `hidden` (state propagation,
        CALM-style) without running the rest of the layer."""
        raise NotImplementedError

    def stacked_kv_projection(self, layers: list) -> tuple | None:
        """K/V projections of several layers as one matmul, for state propagation: what
        `project_stacked_kv` applies. The default form is `(eps, weight, bias)` such that, with
        `x` layer-normalised without affine when `eps` is not None, `x @ weight + bias` is every
        layer's (keys, values) side by side, each (key/value heads * head_dim) wide. None when
        the family has no such form (propagation then runs `fill_kv` layer by layer)."""
        return None

    def project_stacked_kv(self, stack, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        """(keys, values) of every layer of a `stacked_kv_projection` for `hidden` (rows,
        positions, width) at `position_ids`, each (layers, rows, heads, positions, head_dim) as
        the layers' attention caches them. This default applies the default form."""
        import torch

        eps, weight, bias = stack
        x = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:], eps=eps) if eps is not None else hidden
        config = self.text_config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = (x @ weight + bias).view(*x.shape[:2], -1, 2, heads, dim).permute(3, 2, 0, 4, 1, 5)
        return kv[0], kv[1]

    def kv_projection_param_count(self, layer: torch.nn.Module | None = None) -> int:
        """Parameters used by `fill_kv` for `layer` (default: a backbone layer): norm and K/V projections."""
        raise NotImplementedError

    # -- encoder–decoder families (T5) and teacher forcing ---------------------------------------
    is_encoder_decoder: ClassVar[bool] = False
    """True when the language model is an encoder–decoder: the prompt goes through its encoder once,
    at full depth, and the decoder layers above are the ones that run layer by layer (and exit)."""

    @property
    def encoder(self) -> torch.nn.Module:
        """The language model's encoder (encoder–decoder families only)."""
        raise NotImplementedError

    def attach_encoder(self, cache: Any, encoder_states: torch.Tensor, encoder_mask: torch.Tensor | None,
                       layers: list) -> None:
        """Keep in `cache` (its `encoder` part, rows first) what every decoder step needs of the
        encoder's output; `layers` are the decoder layers generation runs (encoder–decoder only)."""
        raise NotImplementedError

    def training_layout(self, batch: dict) -> dict:
        """A training batch of rows `prompt + target` (labels on the target, right padded) in the
        layout the family's model trains on (`model(**batch).loss`). Decoder-only: as it is."""
        return batch

    def teacher_forcing_inputs(self, batch: dict, layers: list) -> tuple:
        """(hidden states entering the first decoder layer, the `attention_mask` that whole-sequence
        `run_layer` calls take, position ids, targets) for a training batch, such that the hidden
        state at position t predicts `targets[:, t]` (positions past the last target are ignored).
        Decoder-only: the prompt and target run through the decoder, targets are the labels shifted."""
        embeds = self.decoder_inputs_embeds(batch["pixel_values"], batch["input_ids"], **self.vision_inputs(batch))
        positions = self.position_ids(batch["attention_mask"])
        mask = self.layer_mask(embeds, batch["attention_mask"], None, 0)
        return self.embed(None, embeds, positions), mask, positions, batch["labels"][:, 1:]

    # -- cost accounting ---------------------------------------------------------------------
    def layer_param_counts(self) -> list[int]:
        """Parameters of each decoder layer."""
        return [sum(p.numel() for p in layer.parameters()) for layer in self.decoder_layers()]

    def head_param_count(self, vocabulary_size: int | None = None) -> int:
        """Parameters touched by one logit read-out (final norm, projections, LM head), over the
        whole vocabulary or over `vocabulary_size` of its tokens."""
        head = self.language_model.lm_head.weight
        others = self.pre_head_param_count()
        rows = head.shape[0] if vocabulary_size is None else vocabulary_size
        return others + rows * head.shape[1]

    def pre_head_param_count(self) -> int:
        """Parameters of `pre_head` (final norm, projections)."""
        raise NotImplementedError
