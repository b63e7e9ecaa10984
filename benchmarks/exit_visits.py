"""What an exit that no row leaves costs per visit, as a share of a decode step, at batch 1.

    python benchmarks/exit_visits.py --json benchmarks/results/exit-visits-smollm2.json

A SmolLM2-135M-shaped MiniGPT-4 (random weights, fp32; `speed.py`'s shape) decodes a fixed number
of tokens greedily, timed alternately with the engine with exits off. Then with six exits
(layers 6, 10, …, 26) where no row ever leaves, under rules that cost more and more to ask:

- `never`: the rule decides on the host (a Python False): the engine's bookkeeping alone;
- a learned gate in `replace` mode whose threshold no row reaches: the gate's small MLP;
- `confidence` that never leaves (threshold above 1) over a 50-token exit vocabulary, and over
  the whole 49,152-token head: the read-out the rule asks for;
- FREE behind a learned gate (`filter`) that no row passes: the exit transformer's own K/V,
  filled for every position that reaches the exit.

Per visit: (decode time with exits / without - 1) / 6. The issue's goal: at most 0.01 of a token
for a visit where no row leaves.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import COMMON, SHAPES, measure  # noqa: E402

from earlyexit.core.engine import EarlyExitForCausalLM  # noqa: E402
from earlyexit.core.gates import LearnedGate  # noqa: E402
from earlyexit.core.generation import timed  # noqa: E402
from earlyexit.core.strategy import Strategy  # noqa: E402
from earlyexit.strategies.confidence import ConfidenceStrategy  # noqa: E402
from earlyexit.strategies.free import FreeStrategy  # noqa: E402
from earlyexit.util.provenance import provenance  # noqa: E402

EXITS = [6, 10, 14, 18, 22, 26]


class Never(Strategy):
    """Exits no row ever leaves, decided on the host: nothing computed, nothing read back."""

    name = "never"

    def should_exit(self, exit_index, view, context):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from earlyexit.plugins.registry import get_registry

    backend = get_registry(load_entrypoints=False).backend("minigpt4-llama").from_tiny_config(
        seed=0, **SHAPES["minigpt4-llama"]["smollm2-135m"], **COMMON)
    from PIL import Image

    inputs = backend.prepare_inputs([Image.fromarray(torch.rand(32, 32, 3).mul(255).byte().numpy())], ["a photo of"])
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    exits_off = EarlyExitForCausalLM(backend)

    def reference():
        with torch.no_grad():
            return timed(exits_off.generate, inputs, settings)

    width = backend.text_config.hidden_size
    never_gate = LearnedGate(width, len(EXITS), threshold=0.9, mode="replace")
    with torch.no_grad():  # it scores every visit (and the engine reads its verdict), but no row passes
        for scorer in never_gate.scorers:
            scorer[-1].bias.fill_(-100.0)
    confidence = ConfidenceStrategy(backend, EXITS, ConfidenceStrategy.Config(threshold=1.5))
    vocabulary = torch.arange(50)
    configs = {
        "never (decided on the host)": EarlyExitForCausalLM(backend, Never(backend, EXITS)),
        "learned gate, replace, never passes": EarlyExitForCausalLM(backend, Never(backend, EXITS), gate=never_gate),
        "confidence never, 50-token exit vocabulary": EarlyExitForCausalLM(backend, confidence),
        "confidence never, whole head": EarlyExitForCausalLM(backend, confidence),
        # FREE's exit transformer keeps its own K/V: every position reaching an exit fills it
        "free + learned gate (filter), never passes": EarlyExitForCausalLM(
            backend, FreeStrategy(backend, EXITS), gate=LearnedGate(width, len(EXITS), threshold=0.9, mode="filter")),
    }
    with torch.no_grad():
        for scorer in configs["free + learned gate (filter), never passes"].gate.scorers:
            scorer[-1].bias.fill_(-100.0)
    configs["confidence never, 50-token exit vocabulary"].exit_vocabulary = vocabulary
    rows = []
    print(f"SmolLM2-135M shape, batch 1, {args.new_tokens} tokens, exits at {EXITS}, median of {args.repeats} "
          f"alternating runs, {torch.get_num_threads()} threads")
    for name, model in configs.items():
        def candidate(model=model):
            with torch.no_grad():
                return timed(model.generate, inputs, settings)

        result = measure(reference, candidate, args.repeats, args.new_tokens, 1)
        per_visit = (1 / result["decode_wall_speedup"] - 1) / len(EXITS)
        print(f"  {name}: decode {result['decode_wall_speedup']:.3f}x of exits off; {per_visit:+.4f} of a token "
              f"per visit (goal <= 0.01)")
        rows.append({"config": name, "per_visit_token_share": per_visit, **result})
    if args.json:
        from earlyexit.util.files import write_json_atomically

        write_json_atomically(args.json, {
            "command": "python benchmarks/exit_visits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "exits": EXITS, "rows": rows, "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
