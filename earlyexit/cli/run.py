"""`earlyexit run --backend blip2-opt --strategy free`: the headline command."""

from __future__ import annotations

import argparse
import shlex
import sys

from earlyexit.cli.common import (add_backend_argument, add_batch_size_argument, add_device_arguments,
                                  add_draft_arguments, add_exit_layers_argument, add_gate_mode_argument,
                                  add_generation_arguments, add_json_file_argument, add_kv_policy_argument,
                                  add_model_argument, add_option_argument, add_output_argument, add_strategy_argument,
                                  add_threshold_argument, add_vocabulary_arguments, build_strategy_config,
                                  device_options, parse_float_list, positive_int, quiet_transformers,
                                  report_plugin_failures, strategy_overrides)
from earlyexit.core.choices import GATES, RULES, SPEED_TARGETS
from earlyexit.errors import ConfigError
from earlyexit.plugins.registry import get_registry
from earlyexit.training.deepspeed_config import add_arguments, config_from_arguments
from earlyexit.util.files import STDOUT, check_writable, write_json_atomically

COLORS = ("\033[32m", "\033[36m", "\033[33m", "\033[35m", "\033[31m")  # early ... late
RESET = "\033[0m"


def mark_tokens(tokenizer, token_ids: list[int], layers: list[int], num_layers: int, color: bool) -> str:
    """Each token with the layer it left at: coloured by depth in a terminal, `word[k]` otherwise."""
    words = []
    for token, layer in zip(token_ids, layers):
        text = tokenizer.decode([token], skip_special_tokens=True).strip()
        if not text:
            continue
        if color:
            shade = COLORS[min(len(COLORS) - 1, (layer - 1) * len(COLORS) // num_layers)]
            words.append(f"{shade}{text}{RESET}")
        else:
            words.append(f"{text}[{layer}]")
    return " ".join(words)


def format_run(report: dict, color: bool) -> str:
    results = report["results"]
    first = next(iter(results.values()))
    metrics = [k for k, v in first["quality"].items() if isinstance(v, (int, float)) and k != "num_questions"]
    metrics = [m for m in metrics if m in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "overall", "MRR", "R@1", "R@5",
                                           "R@10", "mean_rank")] or metrics
    settings = report["settings"]
    lines = [f"earlyexit run: {settings['backend']} / {report['strategy_label']} on {settings['data']} "
             f"(test: {first['config']['samples']} samples), {report.get('knob') or 'threshold'} {report['threshold']}, "
             f"exits at {report['exit_layers']} of {report['num_layers']} layers, kv policy {settings['kv_policy']}, "
             f"batch {settings['batch_size']}"]
    if report["calibration"]:
        lines.append(f"calibrated on the dev split: {report['calibration']['why']}")
        if report["calibration"].get("warning"):
            lines.append(report["calibration"]["warning"])
    if report.get("parameters"):
        lines.append(f"parameters: {report['parameters']['trainable']:,} trained, {report['parameters']['inference']:,} "
                     "added at inference")
    widths = {m: max(8, len(m) + 1) for m in metrics}  # mean_rank is wider than the rest
    header = (f"{'model':<30}" + "".join(f"{m:>{widths[m]}}" for m in metrics)
              + f"{'param':>7}{'layer':>7}{'l-dec':>7}{'wall':>7}{'w-dec':>7}{'tok/s':>7}{'exit':>6}")
    lines += ["", header, "-" * len(header)]
    for name, result in results.items():
        speed = result["speed"]
        threshold = report.get("thresholds", {}).get(name)
        label = name if threshold is None else f"{name} @{threshold:g}"
        wall = speed.get("wall_speedup") or 1.0
        decode_wall = speed.get("decode_wall_speedup") or 1.0
        lines.append(f"{label:<30}" + "".join(f"{result['quality'][m]:>{widths[m]}.4f}" for m in metrics)
                     + f"{speed['param_speedup']:>6.2f}x{speed['layer_speedup']:>6.2f}x"
                     f"{speed['decode_layer_speedup']:>6.2f}x{wall:>6.2f}x{decode_wall:>6.2f}x"
                     f"{speed['tokens_per_s']:>7.0f}{speed['mean_exit_layer']:>6.2f}")
    vocabulary = results[report["strategy_label"]]["speed"].get("exit_vocabulary")
    if vocabulary:
        lines.append(f"exits read out the {vocabulary} tokens the backbone writes most on the training split; the "
                     "final layer reads the whole vocabulary")
    lines.append("param: the paper's parameter ratio; layer / l-dec: layer-equivalents (exit modules, heads, K/V and "
                 "catch-up included) end to end / decoding only; wall / w-dec: clock time per generated token of the "
                 "full model / this one on the same batches, end to end / decoding only; exit: mean exit layer")
    speculative = [r for n, r in results.items() if n.endswith("speculative")]
    for result in speculative:
        speed = result["speed"]
        over = f" over {speed['draft_vocabulary']} tokens" if speed.get("draft_vocabulary") else ""
        choice = report.get("drafter_choice") or {}
        knobs = "" if "stop_below" not in choice else (
            f" (up to {choice['draft_length']} a round, τ = {choice['stop_below']:g}, "
            + ("as given" if len(choice.get("tried", [])) <= 1 else "chosen on dev") + ")")
        where = (f"at layer {speed['draft_exit_layer']}{over}" if speed.get("draft_exit_layer") is not None
                 else f"with the {speed.get('drafter')} drafter{knobs}")
        lines.append(f"speculative: drafts {where}, {speed['mean_draft_length']:.2f} drafts per round, "
                     f"{100 * speed['acceptance_rate']:.1f}% accepted (the output is the full model's, token for token)")
    strategy = report["strategy_label"]
    histogram = results[strategy]["exit_layer_histogram"]
    total = sum(histogram.values()) or 1
    lines.append(f"exit layers ({strategy}): " + "  ".join(f"{k}: {100 * v / total:.1f}%" for k, v in histogram.items()))
    choice = report.get("drafter_choice")
    if choice and choice.get("decode") == "plain":
        lines.append(f"speculative: the {choice['drafter']} drafter is slower than plain decoding on dev at batch "
                     f"{choice['batch_size']} ({choice['dev_speedup']:.2f}x end to end): the test split is decoded "
                     "plainly (the full row); --draft-anyway decodes its row")
    for name, check in (report.get("budget_check") or {}).items():
        if check["dev_loss"] is None or check["test_loss"] is None:
            continue
        verdict = "holds on test" if check["holds_on_test"] else "does not hold on test"
        bound = check.get("dev_loss_bound")
        bounded = (f" (bounded for test at {100 * bound:.1f} % with probability {1 - check['epsilon']:.0%})"
                   if bound is not None else "")
        lines.append(f"budget ({check['rule']}: {check['measure']}), {name}: loss on dev {100 * check['dev_loss']:.1f} %"
                     f"{bounded}, on test {100 * check['test_loss']:.1f} %, budget {100 * check['budget']:.1f} %: {verdict}")
    full_quality = results["full"]["quality"]
    key = next((k for k in ("CIDEr", "overall", "MRR") if k in full_quality), "overall")
    if full_quality.get(key):
        change = results[strategy]["quality"][key] / full_quality[key] - 1
        lines.append(f"{key} change versus the full model: {100 * change:+.1f}%")
    lines.append("")
    if first["config"]["data"] == "visdial":
        lines.append("examples (the answer option ranked first):")
    else:
        lines.append("examples (each token marked by the layer it left at"
                     + (", green = early, red = late):" if color else "):"))
    tokenizer = report["tokenizer"]
    for example in results[strategy]["examples"][:4]:
        if "rank" in example:  # a ranked dialog round: its top option and the ground truth's rank
            lines.append(f"  {example['id']}: ranked first {example['prediction']!r}; ground truth "
                         f"{example['ground_truth']!r} at rank {example['rank']}")
            continue
        marked = mark_tokens(tokenizer, example["token_ids"], example["exit_layers"], report["num_layers"], color)
        lines.append(f"  {example['id']}: {marked}")
    if report["mid_crisis"]:
        mid = report["mid_crisis"]
        lines.append("")
        lines.append("per-exit accuracy (teacher forced, dev): " + "  ".join(
            f"layer {k}: untrained {mid['untrained'][k]:.3f} / trained {v:.3f}" for k, v in mid["trained"].items()))
        lines.append(f"mid-crisis plot: {mid['csv']}, {mid['png']}")
    timings = report["timings"]
    lines.append("")
    lines.append("run time: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.0f} s" for k, v in timings.items()))
    return "\n".join(lines)


class RunCommand:
    """`earlyexit run`: train exits if needed, calibrate, evaluate against the full model, report."""

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("run", help="train, calibrate, evaluate and report a strategy",
                                       description=RunCommand.__doc__)
        add_backend_argument(parser)
        add_strategy_argument(parser, required=True)
        add_model_argument(parser, default="tiny")
        add_device_arguments(parser)
        parser.add_argument("--data", default="scenes", help="scenes (default), scenes-vqa, or NAME:ROOT (see docs/data-and-metrics.md)")
        add_exit_layers_argument(parser)
        add_option_argument(parser)
        add_threshold_argument(parser, "use this value of the strategy's knob (threshold, entropy, patience, γ) "
                                       "instead of calibrating")
        parser.add_argument("--rule", choices=RULES, default="budget",
                            help="calibration rule: fastest whose loss of the full model's quality is within "
                                 "--budget with probability 1 - --epsilon (a bootstrap over dev; default), "
                                 "best quality, or risk: fastest whose share of outputs differing from the full "
                                 "model's is at most --budget with probability 1 - --epsilon (Learn-then-Test)")
        parser.add_argument("--budget", type=float, default=0.01,
                            help="allowed relative quality loss for --rule budget, allowed risk for --rule risk "
                                 "(default 0.01: 1%%)")
        parser.add_argument("--epsilon", type=float, default=0.1,
                            help="--rule budget and risk: the guarantee holds with probability 1 - epsilon "
                                 "(default 0.1)")
        parser.add_argument("--grid", type=parse_float_list, default=None,
                            help="knob values to calibrate over (default: the strategy's grid, see `earlyexit list`)")
        add_kv_policy_argument(parser)
        parser.add_argument("--gate", choices=("none", *GATES), default="learned",
                            help="decide before the head: learned (CALM's classifier, trained here in seconds; "
                                 "default), cosine (zero parameters) or none (the strategy's own rule)")
        add_gate_mode_argument(parser)
        parser.add_argument("--gate-threshold", type=float, default=0.3,
                            help="the gate's threshold in filter mode (default 0.3: it passes most rows the rule "
                                 "would take)")
        parser.add_argument("--speed-target", choices=SPEED_TARGETS[::-1], default="layer",
                            help="what --rule budget maximises: layer speed-up (default: deterministic) or wall "
                                 "clock timed on dev (noisy on a busy or small machine)")
        parser.add_argument("--no-speculative", action="store_true",
                            help="skip the self-speculative decoding row")
        add_draft_arguments(parser, "the fastest on dev")
        parser.add_argument("--drafter", metavar="NAME",
                            help="draft the speculative row with this drafter (`earlyexit list`, kind drafter): "
                                 "corpus (the backbone's own outputs on the training split, fitted in seconds), "
                                 "feature (one trained layer over the top layer's state, minutes), hybrid (corpus "
                                 "where it is surer, feature otherwise) or exits (the strategy's exits; the default); "
                                 "fitted drafters are cached. Where dev says it is slower than plain decoding, the "
                                 "test split is decoded plainly (the full row) unless --draft-anyway")
        parser.add_argument("--draft-anyway", action="store_true",
                            help="decode --drafter's row on test even where dev says plain decoding is faster")
        parser.add_argument("--drafter-option", action="append", default=[], metavar="KEY=VALUE",
                            help="a drafter option, e.g. --drafter-option draft_length=6 or stop_below=0.4 "
                                 "(repeatable)")
        add_vocabulary_arguments(parser)
        parser.add_argument("--test-limit", type=positive_int, help="evaluate on the first N test samples")
        parser.add_argument("--dev-limit", type=positive_int, help="calibrate on the first N dev samples")
        parser.add_argument("--train-limit", type=positive_int, help="train exits on the first N samples")
        add_batch_size_argument(parser, 32)
        add_generation_arguments(parser)
        parser.add_argument("--retrain", action="store_true", help="train exits even if cached ones exist")
        add_output_argument(parser, "folder for the curves and plots (default: runs/)", default="runs")
        add_json_file_argument(parser)

        add_arguments(parser)
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from earlyexit.pipeline.run import RunSettings, check_settings, run  # lazy: keeps --help and list free of torch

        if args.data.partition(":")[0] == "visdial":  # ranked, not generated: what decoding options mean nothing
            if args.num_beams > 1:
                raise ConfigError("VisDial is scored by ranking answer options, not by beam search; drop --num-beams")
            if args.draft_exit is not None:
                raise ConfigError("VisDial is scored by ranking answer options, not by decoding; drop --draft-exit "
                                  "(no speculative row is made)")
        if args.gate == "none" and args.gate_mode is not None:
            raise ConfigError("--gate-mode needs a gate; drop --gate-mode or pass --gate learned (or cosine)")
        placement = device_options(args)  # a device or dtype this machine cannot run fails first
        registry = get_registry()
        report_plugin_failures(registry)
        strategy_cls = registry.strategy(args.strategy)
        registry.backend(args.backend)
        options = build_strategy_config(strategy_cls, None, args.option).to_dict() if args.option else {}
        drafter_options = drafter_settings(registry, args)
        settings = RunSettings(backend=args.backend, strategy=args.strategy, model=args.model, data=args.data,
                               exit_layers=args.exit_layers, options={k: options[k] for k in _given(args.option)},
                               threshold=args.threshold, rule=args.rule, budget=args.budget, epsilon=args.epsilon,
                               grid=args.grid,
                               kv_policy=args.kv_policy, gate=args.gate, gate_mode=args.gate_mode or "filter",
                               gate_threshold=args.gate_threshold, speed_target=args.speed_target,
                               speculative=not args.no_speculative, draft_exit=args.draft_exit,
                               draft_length=args.draft_length, draft_vocabulary=args.draft_vocabulary,
                               drafter=args.drafter, drafter_options=drafter_options,
                               draft_anyway=args.draft_anyway,
                               exit_vocabulary=args.exit_vocabulary,
                               test_limit=args.test_limit, dev_limit=args.dev_limit,
                               train_limit=args.train_limit, batch_size=args.batch_size, num_beams=args.num_beams,
                               max_new_tokens=args.max_new_tokens,
                               retrain=args.retrain, output=args.output, **placement,
                               deepspeed=_deepspeed(args, strategy_cls, options, placement["dtype"]))
        check_settings(settings)
        check_writable(args.output, folder=True)  # before hours of work, not after
        if args.json is not None:  # `--json ''` is a mistake to name, not "no JSON"
            check_writable(args.json, option="--json")
        quiet_transformers()
        report = run(settings, registry, log=lambda message: print(message, file=sys.stderr))
        if report is None:  # a non-zero rank of a multi-process run: rank 0 reports
            return 0
        screen = sys.stderr if args.json == STDOUT else sys.stdout  # `--json -`: stdout holds the JSON alone
        print(format_run(report, color=screen.isatty()), file=screen)
        if args.json:
            payload = {"command": "earlyexit " + " ".join(shlex.quote(a) for a in args.argv),
                       **{k: v for k, v in report.items() if k != "tokenizer"}}
            write_json_atomically(args.json, payload)
            if args.json != STDOUT:
                print(f"wrote {args.json}")
        return 0


def _deepspeed(args, strategy_cls, options: dict, dtype: str) -> dict | None:
    batch_size = options.get("batch_size") or getattr(strategy_cls.Config(), "batch_size", 16)
    return config_from_arguments(args, batch_size, dtype=dtype)


def drafter_settings(registry, args) -> dict:
    """`--drafter-option` values, checked against `--drafter`'s config before any work."""
    if args.drafter is None:
        if args.drafter_option:
            raise ConfigError("--drafter-option needs a --drafter (e.g. --drafter corpus)")
        if args.draft_anyway:
            raise ConfigError("--draft-anyway decodes a drafter's row; add --drafter (e.g. --drafter corpus)")
        return {}
    if args.no_speculative:
        raise ConfigError("--drafter drafts the speculative row; drop --no-speculative or --drafter")
    drafter_cls = registry.drafter(args.drafter)
    if drafter_cls.decoder_only and registry.backend(args.backend).is_encoder_decoder:
        raise ConfigError(f"--drafter {args.drafter} needs a decoder-only backbone ({args.backend} is an "
                          "encoder-decoder); use --drafter corpus")
    values = strategy_overrides(drafter_cls, None, args.drafter_option, flag="--drafter-option")
    drafter_cls.Config(**values)  # its own range checks, now
    return values


def _given(options: list[str]) -> list[str]:
    return [option.partition("=")[0].strip().replace("-", "_") for option in options]
