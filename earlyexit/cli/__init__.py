"""The `earlyexit` command line.

Each subcommand is an object (a module or a class) with two functions:

    add_parser(subparsers) -> argparse.ArgumentParser   # builds and returns its sub-parser
    run(args) -> int                                    # does the work, returns the exit code

and is listed in SUBCOMMANDS at the bottom of this file. Subcommands import torch/transformers
inside `run` only, so `earlyexit --help` and `earlyexit list` stay instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from . import __version__
from .errors import EarlyExitError
from .plugins import Registry, get_registry, one_line


def report_plugin_failures(registry: Registry) -> None:
    """One warning line on stderr per plugin that could not be loaded."""
    for failure in registry.failures:
        print(f"warning: {failure}", file=sys.stderr)


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


# Add new subcommands here (e.g. `from . import cli_generate` and append it). They may import
# helpers from this module, as this list is built after everything above is defined.
from .cli_eval import EvalCommand  # noqa: E402 - these import helpers defined above
from .cli_generate import GenerateCommand  # noqa: E402
from .cli_run import RunCommand  # noqa: E402
from .cli_train import BuildTinyCommand, TrainCommand  # noqa: E402

SUBCOMMANDS: list = [ListCommand, RunCommand, GenerateCommand, EvalCommand, TrainCommand, BuildTinyCommand]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="earlyexit",
        description="Early-exit generation for vision-language models, with pluggable exit strategies.",
    )
    parser.add_argument("--version", action="version", version=f"earlyexit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    # the deepspeed launcher passes --local_rank=N to every process; the rank comes from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in SUBCOMMANDS:
        subparser = command.add_parser(subparsers)
        subparser.set_defaults(run=command.run)
        # also accept --debug after the subcommand; SUPPRESS keeps a global --debug intact
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the full traceback on errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `earlyexit` console script; returns the exit code.

    Usage errors exit 2 through argparse (SystemExit). Our own errors print one line and return
    their `exit_code`; anything else is a bug and returns 1. `--debug` adds the traceback.
    """
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in result files
    try:
        return args.run(args)
    except EarlyExitError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - turn bugs into one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"internal error: {one_line(error)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
