"""The `earlyexit` command line.

One module per subcommand (`listing`, `run`, `generate`, `evaluation`, `train`, `build_tiny`, `bench`),
each with a command object of two functions:

    add_parser(subparsers) -> argparse.ArgumentParser   # builds and returns its sub-parser
    run(args) -> int                                    # does the work, returns the exit code

Options and helpers they share live in `common`. Command modules import from `common` only,
never from this package module, so there is no import circle. They import torch/transformers
inside `run`, so `earlyexit --help` and `earlyexit list` stay instant.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from earlyexit import __version__
from earlyexit.cli.bench import BenchCommand
from earlyexit.cli.build_tiny import BuildSmolCommand, BuildTinyCommand
from earlyexit.cli.common import report_plugin_failures
from earlyexit.cli.evaluation import EvalCommand
from earlyexit.cli.generate import GenerateCommand
from earlyexit.cli.listing import ListCommand, format_table
from earlyexit.cli.run import RunCommand
from earlyexit.cli.train import TrainCommand
from earlyexit.errors import EarlyExitError, first_line
from earlyexit.util.files import check_cache_location
from earlyexit.util.quiet import quiet_libraries

__all__ = ["main", "build_parser", "SUBCOMMANDS", "report_plugin_failures", "format_table"]

SUBCOMMANDS: tuple = (ListCommand, RunCommand, GenerateCommand, EvalCommand, TrainCommand, BuildTinyCommand,
                      BuildSmolCommand, BenchCommand)

CACHE_FREE = ("list",)  # commands that never read or write the cache


class OneLineArgumentParser(argparse.ArgumentParser):
    """Usage mistakes in one line too: the problem and where the usage is, not a usage block
    (subcommand parsers are built with the same class)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
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


def single_line(text: str) -> str:
    """A message on one line, whatever an underlying library put in it (JSON errors, paths)."""
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `earlyexit` console script; returns the exit code.

    Usage errors exit 2 through argparse (SystemExit). Our own errors print one line and return
    their `exit_code`; anything else is a bug and returns 1. `--debug` adds the traceback.
    """
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in result files
    try:
        if args.command not in CACHE_FREE:
            check_cache_location()  # a cache that is a file or read-only: refused before a tiny build starts
        with quiet_libraries(debug=args.debug):
            return args.run(args)
    except EarlyExitError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {single_line(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - turn bugs into one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(f"internal error: {first_line(error, with_type=True)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
