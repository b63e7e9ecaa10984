"""What a run will need in memory, known before anything loads: counted from shapes.

Parameters are counted exactly by building the model from its config on the `meta` device
(no weights, no memory). The rest follows from the run's settings. Notation:

    b      bytes per element of --dtype (4 float32, 2 bfloat16/float16)
    P      parameters of the whole model (vision tower, Q-Former, language model; tied counted once)
    L      decoder layers; E exits; w width; w_kv = kv heads x head dim; f FFN width; V vocabulary
    R      rows decoded at once = batch x beams (VisDial: the 100 options of a round)
    T      positions per row = prompt (query tokens + text) + max new tokens
    S      the strategy's trainable parameters (exits, and decoder-layer copies in MuE / LeeBERT joint)
    n, z   world size (processes) and ZeRO stage

    weights        P x b + S x b (the strategy's modules; / n under ZeRO-3)
    kv             2 x slots x R x T x w_kv x b, slots = L (+ E for exits with their own attention:
                   FREE's exit transformers). Encoder-decoder (T5): T = 1 + max new tokens in the
                   decoder's self-attention, plus cross-attention 2 x L x R x prompt x w_kv x b
    feature_cache  min(budget, ceil(N / B) x B x T x w x b x (E + 1)): the frozen backbone's states
                   at every exit and the last layer, for N training items in batches of B, kept on the
                   model's device (training only)
    gradients      S x b (/ n at ZeRO >= 2)
    optimizer      S x (8 + 4 if b < 4): AdamW's two fp32 moments, plus fp32 master weights of
                   low-precision parameters (/ n at ZeRO >= 1)
    activations    decoding: R x prompt x (f + 4w) x b (the prompt pass's widest layer) + 3 x R x V x 4
                   (fp32 logits, log-probabilities and beam scores);
                   training: B x T x (16w + 2 heads x T) x b per layer that keeps a graph (the copies
                   when they train, else one exit layer each) + B x T x V x 4 x (E + 1) (logits of every
                   exit and the final layer, for the losses)
    baseline       the process itself before any model: the torch runtime (on CUDA its context, about
                   0.5 GiB), measured, not derived: `process_baseline_bytes`

The estimate is the sum; `check_fits` compares it with the device's free memory
(`util.devices.available_memory_bytes`) and names the knob that shrinks the largest part.
"""

from __future__ import annotations

import dataclasses
import math
import os

from earlyexit.errors import ConfigError

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # CUDA context + cuBLAS workspace, measured on recent GPUs
OWN_ATTENTION = ("free",)  # strategies whose exits are decoder layers with their own K/V cache

# Published hyper-parameters of the paper's models (their config.json on the hub), so planning
# needs no download. The vision tower is EVA ViT-g/14 at 224 px, the Q-Former 32 queries.
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14)
QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               encoder_hidden_size=1408, cross_attention_frequency=2, vocab_size=30522)
TEXT = {
    "opt-2.7b": dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=50272, word_embed_proj_dim=2560, max_position_embeddings=2048),
    "opt-6.7b": dict(model_type="opt", hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=50272, word_embed_proj_dim=4096, max_position_embeddings=2048),
    "vicuna-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32001, tie_word_embeddings=False,
                      max_position_embeddings=2048),
    "flan-t5-xl": dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                       num_decoder_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False),
}
PAPER_MODELS = {  # hub id -> (vision-language model_type, language model)
    "Salesforce/blip2-opt-2.7b": ("blip-2", "opt-2.7b"),
    "Salesforce/blip2-opt-6.7b": ("blip-2", "opt-6.7b"),
    "Salesforce/blip2-flan-t5-xl": ("blip-2", "flan-t5-xl"),
    "Salesforce/instructblip-vicuna-7b": ("instructblip", "vicuna-7b"),
}


# text tokens of a prompt and of a target per task (the query tokens come on top)
PROMPT_TOKENS = {"caption": 4, "vqa": 16, "dialog": 160}
TARGET_TOKENS = {"caption": 14, "vqa": 3, "dialog": 12}


def model_config(model: str):
    """The transformers config of a run's or cell's `--model`: its folder's config.json, else one of the
    paper's checkpoints by name (a folder named like blip2-opt-2.7b counts), else None."""
    from transformers import AutoConfig

    if os.path.isfile(os.path.join(model, "config.json")):
        return AutoConfig.from_pretrained(model)
    name = os.path.basename(model.rstrip("/"))
    for hub_id in PAPER_MODELS:
        if model == hub_id or name == hub_id.split("/")[1]:
            return paper_config(hub_id)
    return None


def paper_config(hub_id: str):
    """The transformers config of one of the paper's checkpoints, from its published sizes."""
    from transformers import AutoConfig, Blip2Config, InstructBlipConfig

    if hub_id not in PAPER_MODELS:
        raise ConfigError(f"no published sizes for {hub_id!r}; pass its folder (config.json) or one of "
                          f"{', '.join(PAPER_MODELS)}")
    kind, text_name = PAPER_MODELS[hub_id]
    text = dict(TEXT[text_name])
    text_config = AutoConfig.for_model(text.pop("model_type"), **text)
    config_class = Blip2Config if kind == "blip-2" else InstructBlipConfig
    return config_class(vision_config=VIT_G, qformer_config=QFORMER, text_config=text_config.to_dict(),
                        num_query_tokens=32)


@dataclasses.dataclass
class Shape:
    """What the formulas read from a vision-language model's config; parameters counted on `meta`."""

    parameters: dict  # part (vision, qformer, projection, language) -> count; "total"
    layer_parameters: int  # one decoder layer
    readout_parameters: int  # final norm (+ projection) + LM head: a classifier exit's copy
    num_layers: int
    width: int
    kv_width: int
    ffn: int
    heads: int
    vocab: int
    query_tokens: int
    encoder_decoder: bool


def _text_sizes(text) -> dict:
    width = getattr(text, "hidden_size", None) or text.d_model
    heads = getattr(text, "num_attention_heads", None) or text.num_heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or width // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    ffn = getattr(text, "ffn_dim", None) or getattr(text, "intermediate_size", None) or text.d_ff
    layers = getattr(text, "num_decoder_layers", None) or text.num_hidden_layers
    return dict(num_layers=layers, width=width, kv_width=kv_heads * head_dim, ffn=ffn, heads=heads,
                vocab=text.vocab_size, encoder_decoder=bool(getattr(text, "is_encoder_decoder", False)))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_shape(config) -> Shape:
    """Count the parameters of the model `config` describes, per part, on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = AutoModelForImageTextToText.from_config(config)
    language = model.language_model
    blocks = [m for name, m in language.named_modules()
              if isinstance(m, torch.nn.ModuleList) and name.split(".")[-2:] in (["decoder", "layers"],
                                                                                   ["model", "layers"],
                                                                                   ["decoder", "block"])]
    head = language.get_output_embeddings()
    readout = _count(head) + sum(_count(m) for name, m in language.named_modules()
                                 if name.endswith(("decoder.final_layer_norm", "decoder.project_out", "model.norm")))
    parts = {"vision": _count(model.vision_model), "qformer": _count(model.qformer) + model.query_tokens.numel(),
             "projection": _count(model.language_projection), "language": _count(language)}
    parts["total"] = _count(model)
    return Shape(parameters=parts, layer_parameters=_count(blocks[0][0]), readout_parameters=readout,
                 query_tokens=config.num_query_tokens, **_text_sizes(config.text_config))


def strategy_parameters(strategy: str, shape: Shape, exits: int, options: dict | None = None) -> int:
    """Trainable parameters of a strategy's modules (S in the module docstring)."""
    options = options or {}
    classifier = round(1.2 * shape.width)  # FREE's feature classifier: Linear(w, 1.2w), Linear(1.2w, 1)
    copies = shape.num_layers * shape.layer_parameters
    if strategy == "free":
        return exits * (shape.layer_parameters + shape.width * classifier + 2 * classifier + 1)
    if strategy in ("deebert", "pabee"):
        return exits * shape.readout_parameters
    if strategy == "leebert":
        return exits * (shape.readout_parameters + 1) + (copies if options.get("joint") else 0)
    if strategy == "mue":
        return copies if options.get("layerwise", True) else 0
    if strategy in ("fixed", "confidence"):  # the shared read-out at every exit: nothing of their own
        return 0
    return exits * shape.readout_parameters  # an unknown plugin: assume a read-out per exit


def trains_layer_copies(strategy: str, options: dict | None = None) -> bool:
    options = options or {}
    if strategy == "mue":
        return bool(options.get("layerwise", True))
    return strategy == "leebert" and bool(options.get("joint"))


@dataclasses.dataclass
class Settings:
    """The knobs of one run that the estimate reads."""

    strategy: str = "free"
    options: dict = dataclasses.field(default_factory=dict)
    exits: int = 3
    dtype: str = "bfloat16"
    batch_size: int = 16
    num_beams: int = 5
    max_new_tokens: int = 30
    prompt_tokens: int = 12  # text of the prompt; the query tokens are added
    option_rows: int = 0  # VisDial: options scored at once (100); replaces batch x beams
    train: bool = False
    train_items: int = 0
    train_tokens: int = 20  # target tokens per training item (a caption)
    feature_cache_budget: int = 8 * GiB
    zero_stage: int = 0
    world_size: int = 1
    baseline: int = 0  # the process before any model (`process_baseline_bytes`)


def estimate(shape: Shape, s: Settings) -> dict:
    """Bytes per part (the module docstring's formulas) and their "total"."""
    b = DTYPE_BYTES[s.dtype]
    trainable = strategy_parameters(s.strategy, shape, s.exits, s.options)
    shard = s.world_size if s.zero_stage >= 3 else 1
    prompt = shape.query_tokens + s.prompt_tokens
    rows = s.option_rows or s.batch_size * s.num_beams
    parts = {"baseline": s.baseline, "weights": shape.parameters["total"] * b + trainable * b // shard}
    own_slots = s.exits if s.strategy in OWN_ATTENTION else 0
    parts["kv"] = kv_bytes(shape, rows, prompt, s.max_new_tokens, b, slots_extra=own_slots)
    parts["activations"] = rows * prompt * (shape.ffn + 4 * shape.width) * b + 3 * rows * shape.vocab * 4
    if s.train:
        positions = prompt + s.train_tokens
        parts["feature_cache"] = 0 if trains_layer_copies(s.strategy, s.options) else min(
            s.feature_cache_budget, feature_cache_bytes(shape, s.train_items, s.batch_size, positions, s.exits, b))
        parts["gradients"] = trainable * b // (s.world_size if s.zero_stage >= 2 else 1)
        parts["optimizer"] = trainable * (8 + (4 if b < 4 else 0)) // (s.world_size if s.zero_stage >= 1 else 1)
        graph_layers = shape.num_layers if trains_layer_copies(s.strategy, s.options) else s.exits
        per_layer = s.batch_size * positions * (16 * shape.width + 2 * shape.heads * positions) * b
        parts["activations"] = graph_layers * per_layer + s.batch_size * positions * shape.vocab * 4 * (s.exits + 1)
    parts["total"] = sum(parts.values())
    return parts


def kv_bytes(shape: Shape, rows: int, prompt: int, max_new_tokens: int, b: int, slots_extra: int = 0) -> int:
    """Keys and values of every cache slot for `rows` rows (module docstring)."""
    slots = shape.num_layers + slots_extra
    if not shape.encoder_decoder:
        return 2 * slots * rows * (prompt + max_new_tokens) * shape.kv_width * b
    decoder = 2 * slots * rows * (1 + max_new_tokens) * shape.kv_width * b
    return decoder + 2 * shape.num_layers * rows * prompt * shape.kv_width * b


def feature_cache_bytes(shape: Shape, items: int, batch_size: int, positions: int, exits: int, b: int) -> int:
    """Every training batch's states at the exits and the last layer (before any budget)."""
    batches = math.ceil(items / batch_size) if items else 0
    return batches * batch_size * positions * shape.width * b * (exits + 1)


# What shrinks each part, named in the refusal.
KNOBS = {
    "weights": "a lower --dtype (bfloat16), or a GPU with more memory",
    "kv": "lower --batch-size, --num-beams or --max-new-tokens",
    "activations": "lower --batch-size",
    "feature_cache": "lower the feature-cache budget (EARLYEXIT_FEATURE_CACHE_GB, e.g. 2)",
    "gradients": "--zero 2 or 3 over more processes",
    "optimizer": "--zero 3 over more processes (or --zero 1/2)",
    "baseline": "close other processes on the device",
}


def check_fits(parts: dict, available: int | None, where: str = "the device") -> None:
    """A one-line ConfigError when the estimate exceeds `available` bytes, naming the knob that
    shrinks its largest part; nothing when it fits or the memory is unknown."""
    if available is None or parts["total"] <= available:
        return
    largest = max((k for k in parts if k != "total"), key=parts.__getitem__)
    detail = ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items() if k != "total" and v)
    raise ConfigError(f"this run needs about {parts['total'] / GiB:.1f} GiB ({detail} GiB) but {where} has "
                      f"{available / GiB:.1f} GiB free; the largest part is {largest}: {KNOBS[largest]}")


def process_baseline_bytes(device: str = "cpu") -> int:
    """The runtime's own memory before any model: this process's resident set now (call it after
    importing torch and transformers) and, on CUDA, the context's."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return CUDA_CONTEXT_BYTES if str(device).startswith("cuda") else rss
