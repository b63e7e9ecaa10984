"""`earlyexit list`: every backend and strategy, and the plugin that provides it."""

from __future__ import annotations

import argparse
import json

from .common import report_plugin_failures


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
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from ..plugins import get_registry

        registry = get_registry()
        report_plugin_failures(registry)
        entries = registry.entries()
        if args.json:
            print(json.dumps(entries, indent=2))
        elif entries:
            print(format_table(entries, ["name", "kind", "plugin", "description"]))
        else:
            print("no backends or strategies are registered")
        return 0
