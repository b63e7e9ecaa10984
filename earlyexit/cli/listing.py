"""`earlyexit list`: every backend and strategy, and the plugin that provides it."""

from __future__ import annotations

import argparse
import json

from earlyexit.cli.common import quiet_transformers, report_plugin_failures
from earlyexit.core.param_counts import strategy_parameter_counts
from earlyexit.errors import ConfigError
from earlyexit.plugins.registry import get_registry


def format_table(rows: list[dict[str, str]], columns: list[str]) -> str:
    widths = {col: max([len(col)] + [len(str(row[col])) for row in rows]) for col in columns}

    def line(values: dict[str, str]) -> str:
        return "  ".join(str(values[col]).ljust(widths[col]) for col in columns).rstrip()

    header = line({col: col.upper() for col in columns})
    return "\n".join([header] + [line(row) for row in rows])


class ListCommand:
    """`earlyexit list`: every backend and strategy, and the plugin that provides it."""

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(
            "list", help="list backends and strategies", description=ListCommand.__doc__
        )
        parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
        parser.add_argument("--params", metavar="BACKEND:MODEL",
                            help="also load this backbone (e.g. blip2-opt:tiny) and state each strategy's knob, "
                                 "default exits, trainable and inference-time parameters for it")
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        registry = get_registry()
        report_plugin_failures(registry)
        entries = registry.entries()
        if args.params:
            entries = with_parameter_counts(registry, entries, args.params)
        if args.json:
            print(json.dumps(entries, indent=2))
        elif entries and args.params:
            rows = [{**e, "knob": e.get("knob") or "", "exits": e.get("exit_layers", ""),
                     "trainable": f"{e['trainable']:,}" if "trainable" in e else e.get("error", ""),
                     "inference": f"{e['inference']:,}" if "inference" in e else ""}
                    for e in entries if e["kind"] == "strategy"]
            print(format_table(rows, ["name", "knob", "exits", "trainable", "inference"]))
        elif entries:
            print(format_table(entries, ["name", "kind", "plugin", "description"]))
        else:
            print("no backends or strategies are registered")
        return 0


def with_parameter_counts(registry, entries: list[dict], spec: str) -> list[dict]:
    """`entries` with each strategy's knob, default exits and parameter counts on BACKEND:MODEL."""
    backend_name, sep, model = spec.partition(":")
    if not sep or not model:
        raise ConfigError(f"--params {spec!r}: give BACKEND:MODEL, e.g. --params blip2-opt:tiny")
    quiet_transformers()
    from earlyexit.models.loading import load_backend  # lazy: torch-free --help and list

    backend = load_backend(registry.backend(backend_name), model)
    counts = {row["strategy"]: row for row in strategy_parameter_counts(registry, backend)}
    return [{**entry, **{k: v for k, v in counts.get(entry["name"], {}).items() if k != "strategy"}}
            if entry["kind"] == "strategy" else entry for entry in entries]
