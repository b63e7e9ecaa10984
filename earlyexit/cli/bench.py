"""`earlyexit bench SPEC`: every cell of a spec (cached), then its tables and figures."""

from __future__ import annotations

import argparse
import shlex
import sys

from earlyexit.cli.common import add_device_arguments, device_options, quiet_transformers, report_plugin_failures
from earlyexit.errors import ConfigError
from earlyexit.plugins.registry import get_registry
from earlyexit.util.files import check_writable, write_json_atomically


class BenchCommand:
    """`earlyexit bench SPEC`: run the cells of a spec (built-in `embedded` or `paper`, or a TOML
    file) that are not cached yet, then write its tables (Markdown, LaTeX, CSV, JSON) and figures (PNG)."""

    @staticmethod
    def add_parser(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("bench", help="paper-style tables and figures from a spec",
                                       description=BenchCommand.__doc__)
        parser.add_argument("spec", help="embedded, paper, or a path to a TOML spec")
        parser.add_argument("--output", help="folder for cells, tables and figures (default: bench/<spec name>)")
        parser.add_argument("--dry-run", action="store_true",
                            help="list the cells, whether each is cached, and each cell's peak memory and "
                                 "roofline GPU-hours (totals per table)")
        parser.add_argument("--probe", action="store_true",
                            help="with --dry-run: also time one layer of each cell's model on --device (default: "
                                 "a GPU if there is one) and print measured hours per cell (about a minute on a CPU)")
        parser.add_argument("--plan-json", metavar="PATH", help="with --dry-run: write the cost plan as JSON to PATH")
        parser.add_argument("--render-only", action="store_true",
                            help="only write tables and figures from the cells already computed")
        parser.add_argument("--force", action="store_true", help="recompute cells even if cached")
        parser.add_argument("--only", help="comma-separated table names to run and render")
        parser.add_argument("--data-root", help="folder that {data_root} in the spec's data names stands for "
                                                "(default: the spec's, else $EARLYEXIT_DATA, else ./data)")
        add_device_arguments(parser)
        return parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import os

        from earlyexit.bench import describe, execute, load_spec, render  # lazy: keeps --help and list free of torch

        if args.dry_run and args.render_only:
            raise ConfigError("--dry-run and --render-only exclude each other; pass one")
        if (args.probe or args.plan_json) and not args.dry_run:
            raise ConfigError("--probe and --plan-json go with --dry-run; add --dry-run")
        only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else None
        spec = load_spec(args.spec, data_root=args.data_root, only=only)
        if args.device or args.dtype:  # the machine's device and precision override the spec's
            placement = device_options(args)
            for table in spec.tables.values():
                for cell in table.cells:
                    cell.settings.update(placement)
        output = os.path.join("bench", spec.name) if args.output is None else args.output  # '' is refused, not defaulted
        registry = get_registry()
        report_plugin_failures(registry)
        if args.dry_run:
            print("\n".join(describe(spec, output, registry)))
            print("\n".join(BenchCommand.plan_lines(args, spec, registry)))
            return 0
        check_writable(output, folder=True)
        quiet_transformers()
        counts, load = None, os.getloadavg()
        if not args.render_only:
            counts = execute(spec, output, registry, force=args.force, progress=True,
                             log=lambda text: print(text, file=sys.stderr))
            if counts.get("rank"):  # another torchrun rank: rank 0 renders the tables and reports
                return 0
            print(f"cells: {counts['cells']} ({counts['cached']} cached, {counts['computed']} computed, "
                  f"{counts['unavailable']} unavailable, {counts['failed']} failed) in {counts['seconds']:.0f} s")
        command = "earlyexit " + " ".join(shlex.quote(a) for a in args.argv)
        paths = render(spec, output, registry, command=command)
        if counts is not None:  # what this run cost, on what machine, how busy it was (wall clocks suffer)
            from earlyexit.bench import hardware  # lazy: keeps --help and list free of torch
            from earlyexit.util.provenance import provenance  # lazy: keeps --help and list free of torch

            summary = os.path.join(output, "bench.json")
            write_json_atomically(summary, {"command": command, "spec": spec.name, "cells": counts,
                                            "load_average_before": load, "load_average_after": os.getloadavg(),
                                            "provenance": provenance(), "hardware": hardware(), "artifacts": paths})
            paths.append(summary)
        for path in paths:
            print(f"wrote {path}")
        return 1 if counts and counts["failed"] else 0

    @staticmethod
    def plan_lines(args: argparse.Namespace, spec, registry) -> list[str]:
        """--dry-run's costs: per cell, then per table; the plan written to --plan-json."""
        from earlyexit.bench.costs import cost_line, plan_report  # lazy: keeps --help and list free of torch
        from earlyexit.util.devices import available_memory_bytes, resolve_device  # lazy: keeps --help free of torch

        device = resolve_device(args.device) if args.probe else None
        available = available_memory_bytes(device) if device else None  # cells that will not fit are flagged
        command = "earlyexit " + " ".join(shlex.quote(a) for a in args.argv)
        report = plan_report(spec, registry, device, command)
        lines = [f"{key}  {cell['label']:<24} {cost_line(cell if 'peak_bytes' in cell else None, device, available)}"
                 for key, cell in report["cells"].items()]
        lines += [f"table {name:<9} {totals['cells']} cells  {cost_line(totals, device)}"
                  for name, totals in report["tables"].items()]
        if device is not None and not device.startswith("cuda"):
            lines.append(f"note: hours were measured on {device}, not a GPU; rerun with --probe on a GPU for GPU-hours")
        if args.plan_json:
            write_json_atomically(args.plan_json, report)
            lines.append(f"wrote {args.plan_json}")
        return lines
