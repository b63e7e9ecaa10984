"""Trainable and inference-time parameters of every strategy on the paper's backbone shapes.

    python benchmarks/param_counts.py --json benchmarks/results/params.json

The backbones are built on the `meta` device (shapes only, no weights, no download), so the counts
are those of the real checkpoints' language models; exits at each strategy's default layers
(FREE's: after each quarter of the depth).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {  # BLIP-2's OPT language models (hidden, layers, heads, ffn); vocabulary 50272
    "opt-2.7b": dict(hidden_size=2560, num_layers=32, num_heads=32, ffn_dim=10240),
    "opt-6.7b": dict(hidden_size=4096, num_layers=32, num_heads=32, ffn_dim=16384),
}


def meta_backend(shape: dict):
    import torch

    from earlyexit.backends.blip2_opt import Blip2OptBackend

    with torch.device("meta"):
        return Blip2OptBackend.from_tiny_config(seed=0, vocab_size=50272, **shape)


def layers_text(layers: list[int]) -> str:
    consecutive = len(layers) > 3 and layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}..{layers[-1]} (all)" if consecutive else str(layers)


def main(argv=None) -> int:
    from earlyexit.core.param_counts import strategy_parameter_counts
    from earlyexit.plugins.registry import get_registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args(argv)
    registry = get_registry(load_entrypoints=False)
    result = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "note": "backbones built on the meta device from the paper's OPT shapes (language model only is "
                      "real-sized; the vision side is the tiny one)", "shapes": {}}
    for name, shape in SHAPES.items():
        rows = strategy_parameter_counts(registry, meta_backend(shape))
        result["shapes"][name] = {"shape": shape, "strategies": rows}
        print(f"\n{name}: {shape}")
        print(f"{'strategy':<12}{'exits':<22}{'trainable':>14}{'inference':>14}")
        for row in rows:
            if "error" in row:
                print(f"{row['strategy']:<12}{layers_text(row['exit_layers']):<22}  {row['error']}")
                continue
            print(f"{row['strategy']:<12}{layers_text(row['exit_layers']):<22}{row['trainable']:>14,}{row['inference']:>14,}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
