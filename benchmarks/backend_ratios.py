"""The two speed ratios every backend is held to, measured side by side in one process:

(a) exits off: tokens/s of the early-exit engine / tokens/s of the backend's plain `generate`,
    end to end (goal >= 0.97);
(b) `fixed` exits on every token at a third of the depth (kv policy `catchup` unless given):
    decode-phase wall speed-up / decode-phase layer speed-up (layer-equivalents from the trace,
    heads and K/V included; goal >= 0.9).

    python benchmarks/backend_ratios.py --backend minigpt4-llama --shape llama-tiny
    python benchmarks/backend_ratios.py --backend minigpt4-llama --shape smollm2-135m --batch-sizes 1,8
    python benchmarks/backend_ratios.py --backend instructblip-vicuna --shape llama-tiny
    python benchmarks/backend_ratios.py --backend blip2-flant5 --shape t5-tiny
    python benchmarks/backend_ratios.py --backend instructblip-flant5 --shape t5-tiny

Encoder-decoder backends (blip2-flant5, instructblip-flant5): the plain `generate` runs the encoder
once and then the decoder; exits and layer counts are the decoder's.

Random weights, fp32, the shapes of `benchmarks/speed.py`. Runs alternate (plain, candidate) and
each ratio is the median over pairs of the pair's own ratio, so the slow drifts of a shared
machine cancel. Both wall-clock and this process's CPU time are given: on a machine other jobs
share, CPU time is what their contention disturbs least (with one thread it is the work done).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from earlyexit.core.accounting import CostModel, summarize
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.plugins.registry import get_registry
from earlyexit.strategies.fixed import FixedStrategy
from earlyexit.util.provenance import provenance

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import COMMON, SHAPES  # noqa: E402  (the shapes speed.py measures)

# encoder-decoder shapes (speed.py measures decoder-only families): encoder as deep as the decoder
T5_SHAPES = {
    "t5-tiny": dict(num_layers=12, hidden_size=64, num_heads=4),  # like opt-tiny and llama-tiny
    "flan-t5-small": dict(num_layers=8, hidden_size=512, num_heads=6, d_kv=64, d_ff=1024, vocab_size=32128),
}
SHAPES = {**SHAPES, "instructblip-vicuna": SHAPES["minigpt4-llama"], "blip2-flant5": T5_SHAPES,
          "instructblip-flant5": T5_SHAPES}
T5_COMMON = {k: v for k, v in COMMON.items() if k != "init_std"}  # T5 has its own init
BACKEND_COMMON = {"blip2-flant5": T5_COMMON, "instructblip-flant5": T5_COMMON}


class PromptDone(LogitsProcessor):
    """Notes the clocks when the first logits arrive: the prompt pass ends there."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = (time.perf_counter(), time.process_time())
        return scores


def timed(generate, inputs, settings) -> dict:
    """Wall and CPU seconds of one generation, end to end and after the prompt pass."""
    done = PromptDone()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        generate(**inputs, **settings, logits_processor=LogitsProcessorList([done]))
    end_wall, end_cpu = time.perf_counter(), time.process_time()
    return {"wall": end_wall - wall, "cpu": end_cpu - cpu,
            "decode_wall": end_wall - done.at[0], "decode_cpu": end_cpu - done.at[1]}


def paired(reference, candidate, repeats: int) -> dict:
    """Median over alternating pairs of reference time / candidate time, per clock."""
    reference(), candidate()  # warm-up
    ratios = {key: [] for key in ("wall", "cpu", "decode_wall", "decode_cpu")}
    for _ in range(repeats):
        plain, early = reference(), candidate()
        for key in ratios:
            ratios[key].append(plain[key] / early[key])
    return {key: statistics.median(values) for key, values in ratios.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=sorted(SHAPES), default="minigpt4-llama")
    parser.add_argument("--shape", help="the language model's shape (default: the backend's first in speed.py)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kv-policy", default="catchup")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    shapes = SHAPES[args.backend]
    args.shape = args.shape or next(iter(shapes))
    if args.shape not in shapes:
        parser.error(f"shape {args.shape} is not a {args.backend} shape; choose one of {', '.join(shapes)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backend = get_registry(load_entrypoints=False).backend(args.backend).from_tiny_config(
        seed=0, **shapes[args.shape], **BACKEND_COMMON.get(args.backend, COMMON))
    exit_layer = backend.num_layers // 3
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    print(f"{args.backend}, decoder {args.shape}: {backend.num_layers} layers, width "
          f"{backend.text_config.hidden_size}, vocab {backend.text_config.vocab_size}; {args.new_tokens} new tokens, "
          f"fp32, {torch.get_num_threads()} thread(s), median over {args.repeats} alternating pairs")
    from PIL import Image

    load_before = os.getloadavg()[0]  # other jobs on a shared machine: said next to the numbers
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        images = [Image.fromarray(torch.rand(32, 32, 3).mul(255).byte().numpy()) for _ in range(batch)]
        inputs = backend.prepare_inputs(images, ["a photo of"] * batch)

        def plain():
            return timed(backend.plain_generate, inputs, settings)

        exits_off = EarlyExitForCausalLM(backend)
        off = paired(plain, lambda: timed(exits_off.generate, inputs, settings), args.repeats)
        strategy = FixedStrategy(backend, [exit_layer], FixedStrategy.Config(every=1))
        model = EarlyExitForCausalLM(backend, strategy, kv_policy=args.kv_policy)
        fixed = paired(plain, lambda: timed(model.generate, inputs, settings), args.repeats)
        layer = summarize(model.last_trace, CostModel.for_model(model))["decode_layer_speedup"]
        print(f"batch {batch}: (a) exits off / plain tokens/s: {off['wall']:.3f} wall, {off['cpu']:.3f} CPU time   "
              f"(b) fixed@{exit_layer} {args.kv_policy}, decode wall / layer speed-up: "
              f"{fixed['decode_wall'] / layer:.3f} wall, {fixed['decode_cpu'] / layer:.3f} CPU time "
              f"(layer {layer:.2f}x, wall {fixed['decode_wall']:.2f}x)")
        rows.append({"batch": batch, "exits_off_over_plain": off, "fixed_exit_layer": exit_layer,
                     "decode_layer_speedup": layer, "fixed_decode_speedup": fixed,
                     "fixed_wall_over_layer": fixed["decode_wall"] / layer,
                     "fixed_cpu_over_layer": fixed["decode_cpu"] / layer})
    load = {"before": load_before, "after": os.getloadavg()[0]}
    print(f"machine load average (1 min): {load['before']:.2f} before, {load['after']:.2f} after")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({"command": "python benchmarks/backend_ratios.py " + " ".join(
                argv if argv is not None else sys.argv[1:]), "settings": vars(args), "rows": rows,
                "load_average": load, "provenance": provenance()}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
