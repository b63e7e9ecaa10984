"""What the subcommands share: argument types, the common options, and loading a model.

Command modules import from here and never from `earlyexit.cli` itself, so the package has no
import circle. Nothing heavy is imported at module level (`earlyexit --help` stays instant).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from earlyexit.core import choices
from earlyexit.core.choices import DECODES, GATE_MODES, KV_POLICIES
from earlyexit.core.validation import gate_threshold_problem, option_value_problem
from earlyexit.data.images import read_image
from earlyexit.errors import ConfigError, DataError
from earlyexit.models.adapters import check_adapter_files, load_exits
from earlyexit.util.devices import resolve


# -- argument types -----------------------------------------------------------------------------
def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 3,6,9, got {text!r}")
    if not values:  # an empty list must not silently mean "the default"
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 3,6,9, got {text!r}")
    return values


def parse_float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated thresholds such as 0.5,0.7,0.9, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# -- shared options -------------------------------------------------------------------------------
def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", required=True, help="model family (see `earlyexit list`)")


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    if default is None:
        parser.add_argument("--model", required=True,
                            help="local folder written by save_pretrained, a hub id, `tiny` or `smol` (the embedded "
                                 "models, for blip2-opt and minigpt4-llama) or `tiny-random` (an untrained "
                                 "12-layer model built in memory)")
    else:
        parser.add_argument("--model", default=default,
                            help=f"backbone: {default} (default), a folder written by save_pretrained or a hub id")


def add_strategy_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--strategy", required=required,
                        help="exit strategy (see `earlyexit list`)" + ("" if required else "; omit for the full model"))


def add_threshold_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--threshold", type=float, help=help)


def add_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a strategy option, e.g. --option every=2 or --option mode=distill (repeatable)")


def add_exit_layers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exit-layers", type=parse_int_list,
                        help="comma-separated exit layers, counted in decoder layers from 1 (default: the strategy's)")


def add_kv_policy_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-policy", choices=KV_POLICIES, default="catchup",
                        help="what deeper layers get for a token that left early (default: catchup, exact)")


def add_batch_size_argument(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument("--batch-size", type=positive_int, default=default, help=f"rows per batch (default {default})")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-beams", type=positive_int, default=1)
    parser.add_argument("--max-new-tokens", type=positive_int, default=20)


def add_json_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE",
                        help="also write everything, with provenance, to FILE (a regular file: a link, device or "
                             "FIFO is refused); - prints the JSON on standard output and the report on standard error")


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} even if earlyexit cannot tell it wrote it (no .earlyexit marker): the "
                             "files earlyexit writes there are replaced, every other file in it is kept")


def add_output_argument(parser: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    parser.add_argument("--output", required=default is None, default=default, help=help)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype: every command that loads a model has them (checked by `device_options`)."""
    parser.add_argument("--device", help="where the model runs: cpu, cuda, cuda:N or mps (default: cuda when a GPU "
                                         "is visible, else cpu)")
    parser.add_argument("--dtype", help="the model's precision: float32, bfloat16 or float16 (default: bfloat16 on "
                                        "cuda, float32 elsewhere)")


def device_options(args) -> dict:
    """{"device": ..., "dtype": ...} from --device / --dtype, defaults filled in, checked: a value
    this machine cannot run is a one-line ConfigError before any work."""
    device, dtype = resolve(getattr(args, "device", None), getattr(args, "dtype", None))
    return {"device": device, "dtype": dtype}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of every command that runs one model with an optional strategy (generate, eval)."""
    add_backend_argument(parser)
    add_model_argument(parser)
    add_device_arguments(parser)
    add_strategy_argument(parser)
    add_threshold_argument(parser, "the strategy's exit knob (`earlyexit list` names it): a confidence threshold, "
                                   "an entropy (deebert), a patience (pabee, leebert) or a cosine γ (mue)")
    add_option_argument(parser)
    add_exit_layers_argument(parser)
    parser.add_argument("--exits", metavar="FOLDER",
                        help="trained exits saved by `earlyexit run` (under ~/.cache/earlyexit/exits/) or save_exits: "
                             "their strategy, exit layers and config come from the folder")
    add_kv_policy_argument(parser)
    add_speed_arguments(parser)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """Gate and decode mode, shared by generate and eval."""
    parser.add_argument("--gate", default="none",
                        help="decide before the head: none (the strategy's rule), cosine (zero parameters) or "
                             "learned:FOLDER (a saved gate)")
    parser.add_argument("--gate-threshold", type=float, help="the gate's threshold (learned: a probability; cosine: "
                                                             "a similarity)")
    add_gate_mode_argument(parser)
    parser.add_argument("--decode", choices=DECODES, default="early-exit",
                        help="early-exit (tokens leave at their exit) or speculative (exits draft, the full model "
                             "verifies: its output, token for token; greedy)")
    add_draft_arguments(parser, "the middle exit")
    parser.add_argument("--drafter", metavar="NAME:FOLDER",
                        help="--decode speculative with a drafter of its own instead of the exits: a fitted one's "
                             "folder (earlyexit run --drafter corpus caches one and names it)")


def add_gate_mode_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gate-mode", choices=GATE_MODES[::-1], default=None,  # None: not given (filter)
                        help="filter (default: rows the gate passes are checked by the strategy's own rule, the "
                             "rest go on without the exit's module and head) or replace (the gate alone decides)")


def add_draft_arguments(parser: argparse.ArgumentParser, default_exit: str) -> None:
    parser.add_argument("--draft-exit", type=int, help=f"exit layer that drafts in speculative mode (default: "
                                                       f"{default_exit})")
    parser.add_argument("--draft-length", type=positive_int, help="tokens drafted per round (default: `run` chooses "
                                                                  "1-4 on dev, `eval` and `generate` draft 4)")


def add_vocabulary_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft-vocabulary", type=positive_int, metavar="N",
                        help="drafts read out only the N tokens the backbone writes most often on the data's "
                             "exit-training split (a fraction of the head's cost; the output is unchanged, every "
                             "token is verified over the whole vocabulary). Default: the whole vocabulary")
    parser.add_argument("--exit-vocabulary", type=positive_int, metavar="N",
                        help="exits decide and emit over only the N tokens the backbone writes most often on the "
                             "data's exit-training split: a check costs a fraction of the head, its probabilities "
                             "are over those tokens, and an exit emits only them; the final layer reads the whole "
                             "vocabulary; drafts use them too unless --draft-vocabulary is given. Default: the "
                             "whole vocabulary")


# -- shared work ----------------------------------------------------------------------------------
def report_plugin_failures(registry) -> None:
    """One warning line on stderr per plugin that could not be loaded."""
    for failure in registry.failures:
        print(f"warning: {failure}", file=sys.stderr)


def quiet_transformers() -> None:
    """Weight-loading bars and advisory warnings would bury our one-line messages."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def option_type(config_cls, name: str) -> type:
    """The plain type of a config field (`float | None` -> float), for parsing --option values."""
    import types
    import typing

    hint = typing.get_type_hints(config_cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint if isinstance(hint, type) else str


def strategy_overrides(strategy_cls, threshold: float | None, options: list[str], flag: str = "--option") -> dict:
    """The config values --threshold and --option KEY=VALUE set, checked against the strategy's
    config fields and parsed to their types (a drafter's `--drafter-option` likewise: `flag`)."""
    fields = {f.name: f for f in dataclasses.fields(strategy_cls.Config)}
    values = {}
    if threshold is not None:  # --threshold sets the strategy's knob: a threshold, an entropy, a patience, a γ
        if not strategy_cls.knob or strategy_cls.knob not in fields:
            raise ConfigError(f"strategy {strategy_cls.name!r} has no threshold (nor other knob); its options are: "
                              f"{', '.join(fields) or 'none'}")
        values[strategy_cls.knob] = strategy_cls.parse_knob(threshold)
    for option in options:
        key, sep, raw = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ConfigError(f"bad {flag} {option!r}: use KEY=VALUE with KEY one of "
                              f"{', '.join(fields) or '(this strategy has no options)'}")
        kind = option_type(strategy_cls.Config, key)
        try:
            values[key] = parse_bool(raw) if kind is bool else kind(raw)
        except ValueError:
            raise ConfigError(f"bad {flag} {option!r}: {key} expects a {kind.__name__}")
        problem = option_value_problem(strategy_cls.Config, key, values[key])
        if problem:  # inf, nan or a negative number: refused here, before anything trains
            raise ConfigError(f"bad {flag} {option!r}: {key} {problem}")
    return values


def build_strategy_config(strategy_cls, threshold: float | None, options: list[str]):
    """The strategy's config dataclass from --threshold and --option KEY=VALUE."""
    return strategy_cls.Config(**strategy_overrides(strategy_cls, threshold, options))


def check_gate_arguments(args) -> None:
    """--gate-mode and --gate-threshold make sense only with a gate, and the threshold only within
    the gate's range (a probability for learned, a cosine for cosine): checked before any model loads."""
    kind = (args.gate or "none").partition(":")[0]
    if kind == "none":
        for flag, value in (("--gate-threshold", args.gate_threshold), ("--gate-mode", args.gate_mode)):
            if value is not None:
                raise ConfigError(f"{flag} needs a --gate (cosine or learned:FOLDER); add one or drop {flag}")
    problem = gate_threshold_problem(kind, args.gate_threshold)
    if problem:
        raise ConfigError(f"--gate-threshold {args.gate_threshold}: a {kind} gate's threshold {problem}")


def build_gate(args, strategy, width: int):
    """The gate named by --gate (None for none)."""
    from earlyexit.core.gates import CosineGate, LearnedGate  # lazy: keeps --help and list free of torch

    check_gate_arguments(args)
    spec = args.gate or "none"
    if spec == "none":
        return None
    if strategy is None:
        raise ConfigError("--gate decides at a strategy's exits; pass --strategy too")
    if spec == "cosine":
        return CosineGate(0.99 if args.gate_threshold is None else args.gate_threshold, args.gate_mode or "filter")
    if spec.startswith("learned:"):
        gate = LearnedGate.load(spec[len("learned:"):])
        gate.mode = args.gate_mode or "filter"
        if len(gate.scorers) != len(strategy.exit_layers) or gate.width != width:
            raise ConfigError(f"the gate in {spec[8:]} has {len(gate.scorers)} exits of width {gate.width}; this "
                              f"model has {len(strategy.exit_layers)} exits of width {width}")
        if args.gate_threshold is not None:
            gate.threshold = args.gate_threshold
        return gate
    raise ConfigError(f"unknown --gate {spec!r}; use none, cosine or learned:FOLDER")


def draft_exit_index(args, strategy) -> int | None:
    """--draft-exit (a layer) as an exit index of the strategy."""
    if args.decode != "speculative" or args.draft_exit is None:
        return None
    return choices.draft_exit_index(args.draft_exit, strategy.exit_layers)


def cli_drafter(registry, args, backend):
    """`--drafter NAME:FOLDER` of generate and eval, loaded for `backend` (None without one)."""
    if not getattr(args, "drafter", None):
        return None
    from earlyexit.core.drafter import load_drafter  # lazy: torch-free --help and list

    drafter = load_drafter(registry, args.drafter, backend)
    if args.draft_length is not None:  # --draft-length: how far it drafts
        drafter.config = dataclasses.replace(drafter.config, draft_length=args.draft_length)
    return drafter


def load_model(registry, args):
    """Backend, strategy and the early-exit model from the shared model arguments."""
    from earlyexit.core.engine import EarlyExitForCausalLM  # lazy: keeps --help and list free of torch

    placement = device_options(args)
    if hasattr(args, "gate"):
        check_gate_arguments(args)
    quiet_transformers()
    backend_cls = registry.backend(args.backend)
    exits = getattr(args, "exits", None)
    if exits:
        saved = check_adapter_files(exits)  # a damaged adapter fails before the model loads
        strategy_cls = registry.strategy(saved["strategy"])
        if args.strategy and registry.strategy(args.strategy) is not strategy_cls:
            raise ConfigError(f"--exits {exits} holds {saved['strategy']} exits, not {args.strategy}; drop --strategy")
        if args.exit_layers and list(args.exit_layers) != saved["exit_layers"]:
            raise ConfigError(f"--exits {exits} has exits at {saved['exit_layers']}; drop --exit-layers")
    else:
        strategy_cls = registry.strategy(args.strategy) if args.strategy else None
    if strategy_cls is None and (args.threshold is not None or args.option or args.exit_layers):
        raise ConfigError("--threshold, --option and --exit-layers need a --strategy (or trained --exits)")
    overrides = strategy_overrides(strategy_cls, args.threshold, args.option) if strategy_cls else {}
    config = strategy_cls.Config(**overrides) if strategy_cls and not exits else None
    drafter = getattr(args, "drafter", None)
    if drafter and args.decode != "speculative":
        raise ConfigError("--drafter drafts for --decode speculative; add --decode speculative or drop --drafter")
    if args.decode == "speculative" and strategy_cls is None and not drafter:
        raise ConfigError("--decode speculative drafts with a strategy's exits or a drafter; pass --strategy or "
                          "--drafter NAME:FOLDER")
    if drafter:
        from earlyexit.core.drafter import check_drafter_spec  # lazy: torch-free --help and list

        check_drafter_spec(registry, drafter)
    from earlyexit.models.loading import load_backend  # lazy: torch-free --help and list

    backend = load_backend(backend_cls, args.model, **placement)
    strategy = None
    if exits:
        strategy = load_exits(exits, backend, registry, **overrides)
    elif strategy_cls is not None:
        exit_layers = args.exit_layers or strategy_cls.default_exit_layers(backend.num_layers)
        strategy = strategy_cls(backend, exit_layers, config)
    gate = build_gate(args, strategy, backend.text_config.hidden_size)
    return backend, strategy, EarlyExitForCausalLM(backend, strategy, kv_policy=args.kv_policy, gate=gate)


def open_image(path: str):
    """The image at `path` as RGB (every mode and bit depth converted faithfully), or a DataError."""
    if os.path.isdir(path):
        raise DataError(f"--image {path} is a folder; pass one image file (PNG, JPEG, ...)")
    if not os.path.isfile(path):
        raise DataError(f"image {path!r} does not exist; pass an existing image file with --image")
    return read_image(path, fix="pass a PNG or JPEG file with --image")
