"""Wall-clock speed of the early-exit model next to the plain backbone, in one process.

    python benchmarks/speed.py                # OPT-125m-shaped decoder in a tiny BLIP-2, fp32
    python benchmarks/speed.py --repeats 9 --json results/speed.json

Every configuration is timed alternately with the plain backbone's own `generate` on the same
inputs and settings (batch 1, greedy, a fixed number of new tokens), and medians are compared:

- tokens/s of the plain backbone and of the early-exit model with exits off (overhead check);
- `fixed` exits on every token and on every other token, under each kv policy, where
  `wall_speedup` (clock) is printed next to `layer_speedup` (layer-equivalents counted from the
  trace, heads and catch-up included) and `param_speedup` (the paper's parameter count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from earlyexit.accounting import CostModel, summarize
from earlyexit.backends.blip2_opt import Blip2OptBackend
from earlyexit.engine import EarlyExitForCausalLM
from earlyexit.strategies.fixed import FixedStrategy

OPT_125M_SHAPE = dict(num_layers=12, hidden_size=768, num_heads=12, ffn_dim=3072, vocab_size=50272,
                      init_std=0.02, image_size=32, num_query_tokens=32, vision_hidden=64)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_alternately(reference, candidate, repeats: int) -> tuple[list[float], list[float]]:
    reference(), candidate()  # warm-up
    ref_times, cand_times = [], []
    for _ in range(repeats):
        ref_times.append(timed(reference))
        cand_times.append(timed(candidate))
    return ref_times, cand_times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--exit-layer", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    backend = Blip2OptBackend.from_tiny_config(seed=0, **OPT_125M_SHAPE)
    image = torch.rand(3, 32, 32).mul(255).byte().permute(1, 2, 0).numpy()
    from PIL import Image

    inputs = backend.prepare_inputs([Image.fromarray(image)], ["a photo of"])
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def plain():
        with torch.no_grad():
            return backend.plain_generate(**inputs, **settings)

    rows = []
    print(f"decoder: {backend.num_layers} layers, width {backend.text_config.hidden_size}, "
          f"vocab {backend.text_config.vocab_size}; batch 1, {args.new_tokens} new tokens, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating runs")

    exits_off = EarlyExitForCausalLM(backend)
    ref, cand = measure_alternately(plain, lambda: exits_off.generate(**inputs, **settings), args.repeats)
    plain_tps, off_tps = args.new_tokens / statistics.median(ref), args.new_tokens / statistics.median(cand)
    print(f"\n(a) tokens/s  plain generate {plain_tps:.1f}   early-exit model, exits off {off_tps:.1f}   "
          f"ratio {off_tps / plain_tps:.3f} (goal >= 0.97)")
    rows.append({"config": "exits off", "plain_tokens_per_s": plain_tps, "tokens_per_s": off_tps,
                 "ratio": off_tps / plain_tps})

    print(f"\n(b) fixed exit at layer {args.exit_layer}")
    header = f"{'every':>5} {'kv policy':>10} {'param':>7} {'layer':>7} {'wall':>7} {'wall/layer':>10}"
    print(header + "\n" + "-" * len(header))
    for every in (1, 2):
        for policy in ("catchup", "propagate", "skip"):
            strategy = FixedStrategy(backend, [args.exit_layer], FixedStrategy.Config(every=every))
            model = EarlyExitForCausalLM(backend, strategy, kv_policy=policy)
            ref, cand = measure_alternately(plain, lambda: model.generate(**inputs, **settings), args.repeats)
            summary = summarize(model.last_trace, CostModel.for_model(model))
            wall = statistics.median(ref) / statistics.median(cand)
            print(f"{every:>5} {policy:>10} {summary['param_speedup']:>6.2f}x {summary['layer_speedup']:>6.2f}x "
                  f"{wall:>6.2f}x {wall / summary['layer_speedup']:>10.2f}")
            rows.append({"config": f"fixed@{args.exit_layer} every {every}", "kv_policy": policy,
                         "param_speedup": summary["param_speedup"], "layer_speedup": summary["layer_speedup"],
                         "wall_speedup": wall, "wall_over_layer": wall / summary["layer_speedup"],
                         "plain_median_s": statistics.median(ref), "early_exit_median_s": statistics.median(cand)})
    print("\nparam: the paper's parameter ratio; layer: layer-equivalents incl. LM heads and catch-up; "
          "wall: median clock time of plain generate / early-exit generate")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
