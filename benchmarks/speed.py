"""Wall-clock speed of the early-exit engine next to the plain backbone, in one process.

    python benchmarks/speed.py                              # OPT-125m-shaped decoder, batch 1 and 8
    python benchmarks/speed.py --shape opt-1.3b --batch-sizes 1,8 --json benchmarks/results/speed-opt-1.3b.json
    python benchmarks/speed.py --backend minigpt4-llama     # SmolLM2-135M-shaped Llama (grouped-query)
    python benchmarks/speed.py --backend minigpt4-llama --shape llama-tiny

Random weights in a tiny BLIP-2 or MiniGPT-4 (the vision side is small; the language model has
the named shape, fp32). Every configuration is timed alternately with the plain backbone's own
`generate` on the same inputs and settings (greedy, a fixed number of new tokens), medians
compared, and split into the prompt pass (vision tower, Q-Former, prompt; ends at the first
logits-processor call) and the decode phase (per generated token after the first):

- (a) the engine with exits off against the plain `generate` (overhead; goal >= 0.97);
- (b) `fixed` exits (every token, or every other token) under each kv policy: the decode-phase
  wall speed-up next to the decode-phase layer speed-up (layer-equivalents counted from the
  trace: heads, K/V and catch-up included); `wall/layer` near 1 means the clock gets what the
  layer count promises;
- (c) what one exit decision costs, in layer-equivalents, for `confidence` and FREE-style exits,
  with and without a gate (from the cost model: module shapes).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from earlyexit.core.accounting import CostModel, summarize
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.core.gates import LearnedGate
from earlyexit.core.generation import timed
from earlyexit.strategies.confidence import ConfidenceStrategy
from earlyexit.strategies.fixed import FixedStrategy
from earlyexit.strategies.free import FreeStrategy
from earlyexit.util.provenance import provenance

SHAPES = {  # backend -> language-model shapes (the first is the default)
    "blip2-opt": {
        "opt-125m": dict(num_layers=12, hidden_size=768, num_heads=12, ffn_dim=3072, vocab_size=50272),
        "opt-1.3b": dict(num_layers=24, hidden_size=2048, num_heads=32, ffn_dim=8192, vocab_size=50272),
        "opt-tiny": dict(num_layers=12, hidden_size=64, num_heads=4),  # like llama-tiny: overheads show
    },
    "minigpt4-llama": {
        "smollm2-135m": dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                             vocab_size=49152),
        "llama-tiny": dict(num_layers=12, hidden_size=64, num_heads=4, num_kv_heads=2),
    },
}
COMMON = dict(init_std=0.02, image_size=32, num_query_tokens=32, vision_hidden=64)


def measure(reference, candidate, repeats: int, new_tokens: int, rows: int) -> dict:
    """Alternating runs; medians of end-to-end and decode-phase seconds per generated token."""
    reference(), candidate()  # warm-up
    sides = {"reference": [], "candidate": []}
    for _ in range(repeats):
        for name, fn in (("reference", reference), ("candidate", candidate)):
            _, seconds, prompt = fn()
            sides[name].append((seconds / (new_tokens * rows), (seconds - prompt) / ((new_tokens - 1) * rows), prompt))
    out = {}
    for name, values in sides.items():
        out[name] = {"per_token_s": statistics.median(v[0] for v in values),
                     "decode_per_token_s": statistics.median(v[1] for v in values),
                     "prompt_s": statistics.median(v[2] for v in values)}
    out["wall_speedup"] = out["reference"]["per_token_s"] / out["candidate"]["per_token_s"]
    out["decode_wall_speedup"] = out["reference"]["decode_per_token_s"] / out["candidate"]["decode_per_token_s"]
    return out


def decision_costs(backend) -> list[dict]:
    """Layer-equivalents one exit decision costs for a row that does not leave there."""
    rows = []
    width = backend.text_config.hidden_size
    for name, strategy in (("confidence", ConfidenceStrategy(backend, [2])), ("free", FreeStrategy(backend, [2]))):
        for gate in (None, LearnedGate(width, 1)):
            costs = CostModel.for_model(EarlyExitForCausalLM(backend, strategy, gate=gate))
            if gate is None:  # the rule reads the exit (module + read-out) for every row present
                cost = costs.exit_module_costs[0] + costs.exit_readout_costs[0] + costs.exit_kv_costs[0]
            else:  # the gate decides on the hidden state; the exit slot still gets its K/V
                cost = costs.gate_costs[0] + costs.exit_kv_costs[0]
            rows.append({"strategy": name, "gate": "learned" if gate is not None else "none",
                         "decision_cost_layers": cost})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=sorted(SHAPES), default="blip2-opt")
    parser.add_argument("--shape", choices=sorted(name for shapes in SHAPES.values() for name in shapes),
                        help="the language model's shape (default: the backend's first)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--exit-layer", type=int, help="the fixed exit (default: a third of the depth)")
    parser.add_argument("--policies", default="catchup,propagate,skip")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (benchmarks/gpu_check.sh uses cuda)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights' dtype (measure CPU speed in float32: bf16 is emulated there)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = SHAPES[args.backend]
    args.shape = args.shape or next(iter(shapes))
    if args.shape not in shapes:
        parser.error(f"shape {args.shape} is not a {args.backend} shape; choose one of {', '.join(shapes)}")
    from earlyexit.plugins.registry import get_registry

    torch.manual_seed(0)
    backend = get_registry(load_entrypoints=False).backend(args.backend).from_tiny_config(
        seed=0, **shapes[args.shape], **COMMON).to(args.device, args.dtype)
    exit_layer = args.exit_layer or backend.num_layers // 3
    from PIL import Image

    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    print(f"{args.backend}, decoder {args.shape}: {backend.num_layers} layers, "
          f"width {backend.text_config.hidden_size}, "
          f"vocab {backend.text_config.vocab_size}; {args.new_tokens} new tokens, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating runs")
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        images = [Image.fromarray(torch.rand(32, 32, 3).mul(255).byte().numpy()) for _ in range(batch)]
        inputs = backend.prepare_inputs(images, ["a photo of"] * batch)

        def plain():
            with torch.no_grad():
                return timed(backend.plain_generate, inputs, settings)

        exits_off = EarlyExitForCausalLM(backend)
        result = measure(plain, lambda: timed(exits_off.generate, inputs, settings), args.repeats, args.new_tokens,
                         batch)
        print(f"\nbatch {batch}\n(a) exits off / plain generate: {result['wall_speedup']:.3f} end to end, "
              f"{result['decode_wall_speedup']:.3f} decoding (goal >= 0.97); plain decodes "
              f"{1 / result['reference']['decode_per_token_s']:.1f} tokens/s")
        rows.append({"backend": args.backend, "shape": args.shape, "batch": batch, "config": "exits off", **result})
        print(f"(b) fixed exit at layer {exit_layer}")
        header = f"{'every':>5} {'kv policy':>10} {'param':>7} {'layer':>7} {'wall':>7} {'l-dec':>7} {'w-dec':>7} {'w/l dec':>8}"
        print(header + "\n" + "-" * len(header))
        for every in (1, 2):
            for policy in args.policies.split(","):
                strategy = FixedStrategy(backend, [exit_layer], FixedStrategy.Config(every=every))
                model = EarlyExitForCausalLM(backend, strategy, kv_policy=policy)
                result = measure(plain, lambda: timed(model.generate, inputs, settings), args.repeats,
                                 args.new_tokens, batch)
                summary = summarize(model.last_trace, CostModel.for_model(model))
                ratio = result["decode_wall_speedup"] / summary["decode_layer_speedup"]
                print(f"{every:>5} {policy:>10} {summary['param_speedup']:>6.2f}x {summary['layer_speedup']:>6.2f}x "
                      f"{result['wall_speedup']:>6.2f}x {summary['decode_layer_speedup']:>6.2f}x "
                      f"{result['decode_wall_speedup']:>6.2f}x {ratio:>8.2f}")
                rows.append({"backend": args.backend, "shape": args.shape, "batch": batch,
                             "config": f"fixed@{exit_layer} every {every}",
                             "kv_policy": policy, "param_speedup": summary["param_speedup"],
                             "layer_speedup": summary["layer_speedup"],
                             "decode_layer_speedup": summary["decode_layer_speedup"],
                             "decode_wall_over_layer": ratio, **result})
    decisions = decision_costs(backend)
    print("\n(c) one exit decision, in layer-equivalents (rows that do not leave): " + ", ".join(
        f"{d['strategy']} gate={d['gate']}: {d['decision_cost_layers']:.4f}" for d in decisions))
    print("\nparam: the paper's parameter ratio; layer / l-dec: layer-equivalents incl. LM heads, K/V and catch-up, "
          "end to end / decoding; wall / w-dec: median clock time per token of plain generate / early-exit "
          "generate, end to end / decoding")
    if args.json:
        from earlyexit.util.files import write_json_atomically

        write_json_atomically(args.json, {
            "command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "settings": vars(args), "rows": rows, "decision_costs": decisions, "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
