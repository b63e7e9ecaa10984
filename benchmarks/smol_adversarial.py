"""Why FREE's recipe on `smol` leaves the adversarial term out: exits trained with and without it
(and at a tenth of its weight), everything else as in `benchmarks/smol.py`'s recipe, compared by
how often each exit's token agrees with the final layer's on the backbone's own dev captions
(teacher forced), with the losses the players ended on.

    python benchmarks/smol_adversarial.py --json benchmarks/results/smol-adversarial.json

A small, quick ablation (exits at 14 and 22, 100 training images, 6 epochs, 20 dev images); run
alone on the machine. Tuned on dev only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from earlyexit.models.loading import load_backend


def agreement(backend, strategy, dataset) -> list[float]:
    """Per exit: the share of target positions where its argmax is the final layer's."""
    import torch

    from earlyexit.training.features import teacher_forced_features

    agree, total = [0] * len(strategy.exit_layers), 0
    with torch.no_grad():
        for features in teacher_forced_features(backend, dataset, None, 20):
            where = features.targets != -100
            final = features.final_logits[:, :-1].argmax(-1)[where]
            for e, state in enumerate(strategy.teacher_forced_states(features)):
                agree[e] += int((strategy.exit_logits(e, state[:, :-1][where]).argmax(-1) == final).sum())
            total += int(where.sum())
    return [a / total for a in agree]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--exit-layers", default="14,22")
    parser.add_argument("--train-limit", type=int, default=100)
    parser.add_argument("--dev-limit", type=int, default=20)
    parser.add_argument("--epochs", type=float, default=6)
    args = parser.parse_args(argv)

    from earlyexit.data.splits import load_split
    from earlyexit.plugins.registry import get_registry
    from earlyexit.training.exits import backbone_captions, train_exits, with_own_targets
    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    registry = get_registry(load_entrypoints=False)
    backend = load_backend(registry.backend("minigpt4-llama"), "smol")
    train = load_split("scenes", "exit_train", args.train_limit)
    dev = load_split("scenes", "dev", args.dev_limit)
    own_dev = with_own_targets(dev, backbone_captions(backend, dev, progress=False))
    layers = [int(k) for k in args.exit_layers.split(",")]
    free = registry.strategy("free")
    rows = []
    for adversarial, weight in ((True, 1.0), (True, 0.1), (False, 1.0)):
        began = time.perf_counter()
        strategy = free(backend, layers, free.Config(mode="distill", ce=True, learning_rate=5e-4, epochs=args.epochs,
                                                     adversarial=adversarial, adversarial_weight=weight))
        with tempfile.TemporaryDirectory() as work:
            losses = train_exits(strategy, backend, train, work, progress=False)
        rows.append({"adversarial": adversarial, "adversarial_weight": weight if adversarial else None,
                     "agreement_with_final": dict(zip(map(str, layers), agreement(backend, strategy, own_dev))),
                     "first_losses": losses[0], "last_losses": losses[-1], "steps": len(losses),
                     "seconds": time.perf_counter() - began})
        print(json.dumps(rows[-1]), flush=True)
    write_json_atomically(args.json, {"command": "python benchmarks/smol_adversarial.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "exit_layers": layers, "train_limit": args.train_limit,
        "dev_limit": args.dev_limit, "epochs": args.epochs, "rows": rows, "load_average_1min": os.getloadavg()[0],
        "provenance": provenance()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
