"""`earlyexit generate`: caption or answer about one image, showing where each token left."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .errors import ConfigError, DataError


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 3,6,9, got {text!r}")
    if not values:  # an empty list must not silently mean "the default"
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 3,6,9, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs a model with a strategy."""
    parser.add_argument("--backend", required=True, help="model family (see `earlyexit list`)")
    parser.add_argument("--model", required=True, help="local folder written by save_pretrained, a hub id, or `tiny-random` "
                        "(an untrained 12-layer model built in memory)")
    parser.add_argument("--strategy", help="exit strategy (see `earlyexit list`); omit to run the full model")
    parser.add_argument("--threshold", type=float, help="confidence threshold of the strategy (its `threshold` option)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other strategy option, e.g. --option every=2 (repeatable)")
    parser.add_argument("--exit-layers", type=parse_int_list,
                        help="comma-separated exit layers, counted in decoder layers from 1 (default: the strategy's)")
    parser.add_argument("--kv-policy", choices=["catchup", "propagate", "skip"], default="catchup",
                        help="what deeper layers get for a token that left early (default: catchup, exact)")
    add_speed_arguments(parser)


def add_speed_arguments(parser: argparse.ArgumentParser, learned_gate_help: str = "learned:FOLDER (a saved gate)") -> None:
    """Gate and decode mode, shared by generate, eval and run."""
    parser.add_argument("--gate", default="none",
                        help=f"decide before the head: none (the strategy's rule), cosine (zero parameters) or "
                             f"{learned_gate_help}")
    parser.add_argument("--gate-threshold", type=float, help="the gate's threshold (learned: a probability; cosine: "
                                                             "a similarity)")
    parser.add_argument("--gate-mode", choices=["filter", "replace"], default="filter",
                        help="filter (default: rows the gate passes are checked by the strategy's own rule, the "
                             "rest go on without the exit's module and head) or replace (the gate alone decides)")
    parser.add_argument("--decode", choices=["early-exit", "speculative"], default="early-exit",
                        help="early-exit (tokens leave at their exit) or speculative (exits draft, the full model "
                             "verifies: its output, token for token; greedy)")
    parser.add_argument("--draft-exit", type=int, help="exit layer that drafts in speculative mode (default: the "
                                                       "middle exit)")
    parser.add_argument("--draft-length", type=positive_int, default=4, help="tokens drafted per round (default 4)")


def build_gate(args, strategy, width: int):
    """The gate named by --gate (None for none)."""
    from .gates import CosineGate, LearnedGate

    spec = args.gate or "none"
    if spec == "none":
        if args.gate_threshold is not None:
            raise ConfigError("--gate-threshold needs a --gate (cosine or learned:FOLDER)")
        return None
    if strategy is None:
        raise ConfigError("--gate decides at a strategy's exits; pass --strategy too")
    if spec == "cosine":
        return CosineGate(0.99 if args.gate_threshold is None else args.gate_threshold, args.gate_mode)
    if spec.startswith("learned:"):
        gate = LearnedGate.load(spec[len("learned:"):])
        gate.mode = args.gate_mode
        if len(gate.scorers) != len(strategy.exit_layers) or gate.width != width:
            raise ConfigError(f"the gate in {spec[8:]} has {len(gate.scorers)} exits of width {gate.width}; this "
                              f"model has {len(strategy.exit_layers)} exits of width {width}")
        if args.gate_threshold is not None:
            gate.threshold = args.gate_threshold
        return gate
    raise ConfigError(f"unknown --gate {spec!r}; use none, cosine or learned:FOLDER")


def draft_exit_index(args, strategy) -> int | None:
    """--draft-exit (a layer) as an exit index of the strategy."""
    if args.decode != "speculative":
        return None
    if args.draft_exit is None:
        return None
    if args.draft_exit not in strategy.exit_layers:
        raise ConfigError(f"--draft-exit {args.draft_exit} is not one of the exit layers {strategy.exit_layers}")
    return strategy.exit_layers.index(args.draft_exit)


def option_type(config_cls, name: str) -> type:
    """The plain type of a config field (`float | None` -> float), for parsing --option values."""
    import types
    import typing

    hint = typing.get_type_hints(config_cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint if isinstance(hint, type) else str


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def build_strategy_config(strategy_cls, threshold: float | None, options: list[str]):
    """The strategy's config dataclass from --threshold and --option KEY=VALUE."""
    fields = {f.name: f for f in dataclasses.fields(strategy_cls.Config)}
    values = {}
    if threshold is not None:
        if "threshold" not in fields:
            raise ConfigError(f"strategy {strategy_cls.name!r} has no threshold; its options are: "
                              f"{', '.join(fields) or 'none'}")
        values["threshold"] = threshold
    for option in options:
        key, sep, raw = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ConfigError(f"bad --option {option!r}: use KEY=VALUE with KEY one of "
                              f"{', '.join(fields) or '(this strategy has no options)'}")
        kind = option_type(strategy_cls.Config, key)
        try:
            values[key] = parse_bool(raw) if kind is bool else kind(raw)
        except ValueError:
            raise ConfigError(f"bad --option {option!r}: {key} expects a {kind.__name__}")
    return strategy_cls.Config(**values)


def quiet_transformers() -> None:
    """Weight-loading bars and advisory warnings would bury our one-line messages."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(registry, args):
    """Backend, strategy and the early-exit model from the shared model arguments."""
    from .engine import EarlyExitForCausalLM

    quiet_transformers()
    backend_cls = registry.backend(args.backend)
    strategy_cls = registry.strategy(args.strategy) if args.strategy else None
    if strategy_cls is None and (args.threshold is not None or args.option or args.exit_layers):
        raise ConfigError("--threshold, --option and --exit-layers need a --strategy")
    config = build_strategy_config(strategy_cls, args.threshold, args.option) if strategy_cls else None
    if args.decode == "speculative" and strategy_cls is None:
        raise ConfigError("--decode speculative drafts with a strategy's exits; pass --strategy")
    backend = backend_cls.load(args.model)
    strategy = None
    if strategy_cls is not None:
        exit_layers = args.exit_layers or strategy_cls.default_exit_layers(backend.num_layers)
        strategy = strategy_cls(backend, exit_layers, config)
    gate = build_gate(args, strategy, backend.text_config.hidden_size)
    return backend, strategy, EarlyExitForCausalLM(backend, strategy, kv_policy=args.kv_policy, gate=gate)


def open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise DataError(f"image {path!r} does not exist; pass an existing image file with --image")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path} is not a readable image ({error}); pass a PNG or JPEG file")


def describe_tokens(tokenizer, token_ids: list[int], exit_layers: list[int]) -> list[dict]:
    return [{"token": tokenizer.decode([t]), "id": t, "exit_layer": k} for t, k in zip(token_ids, exit_layers)]


class GenerateCommand:
    """`earlyexit generate`: generate text for one image and show each token's exit layer."""

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("generate", help="generate text for an image with early exits",
                                       description=GenerateCommand.__doc__)
        add_model_arguments(parser)
        parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
        parser.add_argument("--prompt", default="", help="text prompt, e.g. 'Question: what colour? Answer:'")
        parser.add_argument("--max-new-tokens", type=positive_int, default=20)
        parser.add_argument("--num-beams", type=positive_int, default=1)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .cli import report_plugin_failures
        from .plugins import get_registry

        registry = get_registry()
        report_plugin_failures(registry)
        image = open_image(args.image)  # before loading weights: fail fast on a typo
        backend, strategy, model = load_model(registry, args)
        return print_generation(args, backend, strategy, model, image)


def print_generation(args, backend, strategy, model, image) -> int:
    from .accounting import CostModel, summarize

    inputs = backend.prepare_inputs([image], [args.prompt])
    if args.decode == "speculative":
        from .evaluate import count_tokens
        from .speculative import SelfSpeculativeDecoder, speculative_summary

        if args.num_beams > 1:
            raise ConfigError("speculative decoding is greedy; drop --num-beams")
        decoder = SelfSpeculativeDecoder(model, draft_exit_index(args, strategy), args.draft_length)
        sequences = decoder.generate(**inputs, max_new_tokens=args.max_new_tokens)
        length = count_tokens(sequences, inputs["input_ids"].shape[1], model.generation_config.eos_token_id)
        exit_layers = [backend.num_layers] * length
        summary = {"param_speedup": 1.0, **speculative_summary(decoder.last_records, CostModel.for_model(model),
                                                               decoder.last_stats)}
    else:
        sequences = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                                   do_sample=False)
        exit_layers = model.last_trace.per_sequence()[0]
        summary = summarize(model.last_trace, CostModel.for_model(model))
    token_ids = sequences[0, inputs["input_ids"].shape[1]:].tolist()[: len(exit_layers)]
    tokenizer = backend.processor.tokenizer
    result = {
        "text": tokenizer.decode(token_ids, skip_special_tokens=True).strip(),
        "token_ids": token_ids,
        "exit_layers": exit_layers,
        "tokens": describe_tokens(tokenizer, token_ids, exit_layers),
        "num_layers": backend.num_layers,
        "backend": backend.name,
        "strategy": strategy.name if strategy else None,
        "strategy_config": strategy.config.to_dict() if strategy else None,
        "exit_layer_choices": strategy.exit_layers if strategy else [],
        "kv_policy": model.kv_policy,
        "gate": model.gate.kind if model.gate is not None else None,
        "decode": args.decode,
        "param_speedup": summary["param_speedup"],
        "layer_speedup": summary["layer_speedup"],
        "decode_layer_speedup": summary["decode_layer_speedup"],
    }
    if args.decode == "speculative":
        result["speculative"] = {k: summary[k] for k in ("acceptance_rate", "mean_draft_length", "drafted", "accepted")}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(result["text"])
    marked = " ".join(f"{t['token'].strip() or repr(t['token'])}[{t['exit_layer']}]" for t in result["tokens"])
    print(f"tokens[exit layer of {backend.num_layers}]: {marked}")
    print(f"speed-up: param {summary['param_speedup']:.2f}x, layer {summary['layer_speedup']:.2f}x end to end, "
          f"{summary['decode_layer_speedup']:.2f}x decoding (layer counts heads, exit modules and catch-up; "
          "wall-clock: earlyexit eval or benchmarks/speed.py)", file=sys.stdout)
    return 0
