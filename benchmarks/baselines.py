"""The paper's comparison (its Tables 2 and 4 layout) on the embedded model, through the bench:
every trained strategy run by `earlyexit run` (exits trained on the exit-training split, knob
calibrated on dev, scored on test), captioning and VQA, one JSON with both tables and provenance.

    python benchmarks/baselines.py --json benchmarks/results/baselines-embedded.json

It is `earlyexit bench embedded --only table2,table4` with a choice of strategies, tasks and test
size (default: the whole test split, where the spec takes 500 questions): cells are cached under
--work (an interrupted benchmark resumes; a re-run computes nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

STRATEGIES = ("free", "deebert", "pabee", "leebert", "mue")
TABLES = {"caption": "table4", "vqa": "table2"}


def main(argv=None) -> int:
    from earlyexit.bench import execute, parse_spec, render
    from earlyexit.bench.spec import builtin_text
    from earlyexit.cli.common import quiet_transformers
    from earlyexit.plugins.registry import get_registry
    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--work", default="runs/baselines", help="the bench's output folder (cells, tables)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--tasks", default=",".join(TABLES))
    parser.add_argument("--test-limit", type=int, help="test samples (default: all: 500 images, 2,500 questions)")
    parser.add_argument("--again", action="store_true", help="recompute cached cells")
    args = parser.parse_args(argv)
    text = builtin_text("embedded")
    raw = tomllib.loads(text)
    wanted = [TABLES[t] for t in args.tasks.split(",")]
    raw["tables"] = {name: {**table, "strategies": args.strategies.split(",")}
                     for name, table in raw["tables"].items() if name in wanted}
    raw["figures"] = {}
    raw["defaults"]["test_limit"] = args.test_limit  # None: every test sample, as this script always did
    raw["name"] = "baselines"
    spec = parse_spec(raw, text)
    quiet_transformers()
    registry = get_registry(load_entrypoints=False)
    counts = execute(spec, args.work, registry, force=args.again)
    paths = render(spec, args.work, registry, command="python benchmarks/baselines.py " + " ".join(argv or sys.argv[1:]))
    tables = {}
    for path in paths:
        if path.endswith(".json"):
            with open(path) as handle:
                tables[os.path.basename(path)[:-5]] = json.load(handle)
    markdown = "\n".join(open(p).read() for p in paths if p.endswith(".md"))
    print(markdown)
    result = {"command": "python benchmarks/baselines.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "provenance": provenance(), "cells": counts, "tables": tables, "markdown": markdown}
    write_json_atomically(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
