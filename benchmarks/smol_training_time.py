"""How long each strategy's exit training takes on `smol` (the frozen SmolLM2-135M), with its
defaults, on the whole exit-training split (400 scenes), alone on the machine.

    python benchmarks/smol_training_time.py --strategies deebert --json benchmarks/results/smol-training-time.json
    python benchmarks/smol_training_time.py --strategies deebert,pabee \
        --options match_statistics=true,learning_rate=1e-3,epochs=1 --json benchmarks/results/smol-training-time.json

Each strategy trains at its default exits with its default options (FREE's smol recipe is in
`benchmarks/smol.py`); the file records seconds, optimiser steps, whether the trainer reused the
backbone's features across epochs, the last logged losses, and each exit's teacher-forced
next-token accuracy on --dev-limit dev images next to the untrained shared head's at the same
layers. `--options` (KEY=VALUE,...) changes the strategies' options; the run is filed under the
strategy's name and its options. A rerun with other strategies or options adds them to the
same file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from earlyexit.models.loading import load_backend


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--strategies", default="deebert")
    parser.add_argument("--train-limit", type=int, help="exit-training images (default: all 400)")
    parser.add_argument("--dev-limit", type=int, default=40, help="dev images for the exits' accuracy (default 40)")
    parser.add_argument("--options", default="", help="strategy options, KEY=VALUE,... (JSON values)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from smol import parse_options

    from earlyexit.data.splits import load_split
    from earlyexit.evaluation.layer_accuracy import exit_accuracy
    from earlyexit.plugins.registry import get_registry
    from earlyexit.training.exits import train_exits
    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    registry = get_registry(load_entrypoints=False)
    backend = load_backend(registry.backend("minigpt4-llama"), "smol")
    train = load_split("scenes", "exit_train", args.train_limit)
    result = {"runs": {}}
    if os.path.isfile(args.json):
        with open(args.json) as handle:
            result = json.load(handle)
    options = dict(parse_options(args.options))
    dev = load_split("scenes", "dev", args.dev_limit)
    for name in args.strategies.split(","):
        cls = registry.strategy(name)
        strategy = cls(backend, cls.default_exit_layers(backend.num_layers), cls.Config(**options))
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            losses = train_exits(strategy, backend, train, work, progress=False)
        seconds = time.perf_counter() - began
        untrained = registry.strategy("confidence")(backend, strategy.exit_layers)
        key = name + "".join(f",{k}={v}" for k, v in sorted(options.items()))
        accuracy = {"images": len(dev), "exits": exit_accuracy(backend, strategy, dev),
                    "untrained": exit_accuracy(backend, untrained, dev)}
        result["runs"][key] = {"seconds": seconds, "options": options, "dev_accuracy": accuracy,
                                "steps": len(losses), "exit_layers": strategy.exit_layers,
                                "config": strategy.config.to_dict(), "images": len(train),
                                "reuses_backbone_features": strategy.reuses_backbone_features,
                                "trainable_parameters": strategy.parameter_counts()["trainable"],
                                "last_losses": losses[-1], "load_average_1min": os.getloadavg()[0],
                                "command": "python benchmarks/smol_training_time.py " + " ".join(
                                    argv if argv is not None else sys.argv[1:]), "provenance": provenance()}
        print(key, json.dumps({k: result["runs"][key][k] for k in ("seconds", "steps", "exit_layers", "last_losses",
                                                                   "dev_accuracy")}), flush=True)
        write_json_atomically(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
