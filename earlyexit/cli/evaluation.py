"""`earlyexit eval`: quality, the three speed-ups and the exit-layer histogram on a data set."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from earlyexit.cli.common import (add_batch_size_argument, add_generation_arguments, add_json_file_argument,
                                  add_model_arguments, add_vocabulary_arguments, cli_drafter, device_options,
                                  draft_exit_index, load_model, positive_int, report_plugin_failures)
from earlyexit.data.registry import load_dataset
from earlyexit.data.splits import splits_for
from earlyexit.data.tasks import task_of
from earlyexit.errors import ConfigError
from earlyexit.evaluation.common import EvalSettings
from earlyexit.plugins.registry import get_registry, notify
from earlyexit.training.deepspeed_config import launched_world_size
from earlyexit.util.files import STDOUT, check_writable, write_json_atomically


def format_report(result: dict) -> str:
    lines = []
    config = result["config"]
    lines.append(f"{config['backend']} / {config['strategy'] or 'full model'} on {config['data']}/{config['split']} "
                 f"({config['samples']} samples, kv policy {config['kv_policy']})")
    quality = {k: v for k, v in result["quality"].items() if isinstance(v, (int, float))}
    lines.append("quality: " + "  ".join(f"{k} {v:.4g}" for k, v in quality.items()))
    for metric, reason in result["quality"].get("skipped", {}).items():
        lines.append(f"  ({metric} skipped: {reason})")
    speed = result["speed"]
    wall = (f"{speed['wall_speedup']:.2f}x end to end, {speed['decode_wall_speedup']:.2f}x decoding"
            if speed.get("wall_speedup") else "n/a (full model)")
    lines.append(f"speed-up: param {speed['param_speedup']:.2f}x  layer {speed['layer_speedup']:.2f}x "
                 f"(decoding {speed['decode_layer_speedup']:.2f}x)  wall {wall}"
                 f"   ({speed['tokens']} tokens, {speed['tokens_per_s']:.1f} tokens/s, mean exit layer "
                 f"{speed['mean_exit_layer']:.2f} of {result['num_layers']})")
    if "acceptance_rate" in speed:
        over = f" over {speed['draft_vocabulary']} tokens" if speed.get("draft_vocabulary") else ""
        where = (f"at layer {speed['draft_exit_layer']}{over}" if speed.get("draft_exit_layer") is not None
                 else f"with the {speed.get('drafter')} drafter")
        lines.append(f"speculative: drafts {where}, {speed['mean_draft_length']:.2f} "
                     f"tokens per round, {100 * speed['acceptance_rate']:.1f}% accepted")
    if speed.get("exit_vocabulary"):
        lines.append(f"exits read out {speed['exit_vocabulary']} tokens; the final layer reads the whole vocabulary")
    total = sum(result["exit_layer_histogram"].values()) or 1
    lines.append("exit layers: " + "  ".join(f"{k}: {100 * v / total:.1f}%"
                                             for k, v in result["exit_layer_histogram"].items()))
    return "\n".join(lines)


class EvalCommand:
    """`earlyexit eval`: evaluate a model (optionally with an exit strategy) on a data set."""

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("eval", help="quality and speed-up on a data set",
                                       description=EvalCommand.__doc__)
        add_model_arguments(parser)
        parser.add_argument("--data", required=True,
                            help="scenes, scenes-vqa, easy-vqa, or NAME:ROOT for coco, nocaps, vqav2, okvqa, "
                                 "vizwiz, gqa, visdial (answer ranking: MRR, R@k), ... (see docs/data-and-metrics.md)")
        parser.add_argument("--split", default="test", help="data split (default: test)")
        parser.add_argument("--limit", type=positive_int, help="evaluate the first N samples only")
        add_batch_size_argument(parser, 16)
        add_generation_arguments(parser)
        parser.add_argument("--noise", type=float, default=0.0,
                            help="add Gaussian noise of this standard deviation to the images (pixels in 0..1)")
        parser.add_argument("--no-wall", action="store_true",
                            help="do not time the full model next to the early-exit one (halves the work)")
        add_vocabulary_arguments(parser)
        add_json_file_argument(parser)
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from earlyexit.evaluation.evaluate import evaluate  # lazy: keeps --help and list free of torch
        from earlyexit.util.ranks import process_group  # lazy: keeps --help and list free of torch

        placement = device_options(args)  # a device or dtype this machine cannot run fails first
        if args.json is not None:  # `--json ''` too: refused as empty, not taken as absent
            check_writable(args.json, option="--json")
        settings = EvalSettings(batch_size=args.batch_size, num_beams=args.num_beams,
                                max_new_tokens=args.max_new_tokens, noise=args.noise, limit=args.limit,
                                measure_wall=not args.no_wall)
        if launched_world_size() > 1:  # torchrun / deepspeed launcher: shard the data
            from earlyexit.training.deepspeed import init_distributed  # lazy: keeps --help and list free of torch

            init_distributed(placement["device"])
        registry = get_registry()
        report_plugin_failures(registry)
        dataset = load_dataset(args.data, args.split)
        task = task_of(dataset)  # what the task cannot score or use, refused before the model loads
        task.check(dataset, args.decode, settings.num_beams)
        if args.exit_vocabulary:
            task.refuse_exit_vocabulary()
        if (args.exit_vocabulary or args.draft_vocabulary) and not args.strategy and not getattr(args, "exits", None):
            raise ConfigError("--exit-vocabulary and --draft-vocabulary restrict what exits read out; pass --strategy "
                              "or --exits")
        if args.draft_vocabulary and args.decode != "speculative":
            raise ConfigError("--draft-vocabulary is for --decode speculative (exits deciding use --exit-vocabulary)")
        backend, strategy, model = load_model(registry, args)
        exit_vocabulary = draft_vocabulary = None
        if args.exit_vocabulary or args.draft_vocabulary:
            # lazy: keeps --help and list free of torch
            from earlyexit.training.vocabularies import backbone_vocabularies

            source = splits_for(args.data)[0]  # the exit-training split: never the one scored
            exit_vocabulary, draft_vocabulary = backbone_vocabularies(
                backend, args.data, source, (args.exit_vocabulary, args.draft_vocabulary),
                batch_size=args.batch_size, progress=False, max_new_tokens=args.max_new_tokens)
        config = {"command": "eval", "backend": args.backend, "model": args.model, "strategy": args.strategy,
                  "data": args.data, "split": args.split, "settings": dataclasses.asdict(settings)}
        notify(registry, "run_start", config=config)
        drafter = cli_drafter(registry, args, backend)
        result = evaluate(backend, strategy, dataset, settings, kv_policy=args.kv_policy, gate=model.gate,
                          decode=args.decode, drafter=drafter,
                          draft_exit=draft_exit_index(args, strategy) if drafter is None else None,
                          draft_length=args.draft_length, exit_vocabulary=exit_vocabulary,
                          draft_vocabulary=draft_vocabulary,
                          on_batch=lambda stats: notify(registry, "batch_stats", stats=stats))
        if exit_vocabulary is not None:
            result["exit_vocabulary"] = exit_vocabulary.tolist()
        if process_group()[0] != 0:  # every rank has the result; rank 0 reports for everyone
            return 0
        notify(registry, "run_end", config=config, results={"quality": result["quality"]})
        print(format_report(result), file=sys.stderr if args.json == STDOUT else sys.stdout)
        if args.json:
            write_json_atomically(args.json, result)
            if args.json != STDOUT:
                print(f"wrote {args.json}")
        return 0
