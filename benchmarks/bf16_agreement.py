"""bfloat16 against float32 on the embedded model, on this CPU: do full-depth tokens agree, and does
`earlyexit run` complete in bfloat16?

    python benchmarks/bf16_agreement.py --json benchmarks/results/bf16-agreement.json

1. Full-depth greedy captions of the test split (exits off, the engine's own `generate`) in both
   dtypes; the share of generated positions whose token ids agree (a position past one side's end
   counts as a disagreement), and the share of captions that agree exactly.
2. `run` with `--dtype bfloat16` and the `confidence` strategy (no exit modules to train; the
   learned gate trains in seconds) on a small test/dev slice: it must complete and report.

bf16 is ~25x slower than fp32 on these CPUs, so this measures agreement, not speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def full_depth_ids(backend, dataset, batch_size: int, max_new_tokens: int) -> list[list[int]]:
    import torch

    from earlyexit.core.engine import EarlyExitForCausalLM
    from earlyexit.data.prompts import prompt_for

    model = EarlyExitForCausalLM(backend)
    eos = backend.text_config.eos_token_id
    rows = []
    for start in range(0, len(dataset.samples), batch_size):
        batch = dataset.samples[start:start + batch_size]
        inputs = backend.prepare_inputs([s.load_image() for s in batch], [prompt_for(s, dataset.task) for s in batch])
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            rows.append(row[:row.index(eos)] if eos in row else row)
    return rows


def agreement(want: list[list[int]], got: list[list[int]]) -> dict:
    positions = sum(max(len(a), len(b)) for a, b in zip(want, got))
    same = sum(x == y for a, b in zip(want, got) for x, y in zip(a, b))
    return {"token_agreement": same / positions, "positions": positions,
            "exact_captions": sum(a == b for a, b in zip(want, got)) / len(want), "captions": len(want)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="test images for the agreement (default 200)")
    parser.add_argument("--run-limit", type=int, default=32, help="test and dev images for the bf16 run")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    import torch

    from earlyexit.backends.blip2_opt import Blip2OptBackend
    from earlyexit.data.splits import load_split
    from earlyexit.models import embedded
    from earlyexit.pipeline.run import RunSettings, run
    from earlyexit.plugins.registry import get_registry

    path = embedded.ensure_built()
    fp32 = Blip2OptBackend.load(path)
    bf16 = copy.deepcopy(fp32).to(dtype="bfloat16")
    test = load_split("scenes", "test", args.limit)
    began = time.perf_counter()
    want = full_depth_ids(fp32, test, 32, args.max_new_tokens)
    fp32_seconds = time.perf_counter() - began
    began = time.perf_counter()
    got = full_depth_ids(bf16, test, 32, args.max_new_tokens)
    bf16_seconds = time.perf_counter() - began
    result = {"full_depth": {**agreement(want, got), "fp32_seconds": fp32_seconds, "bf16_seconds": bf16_seconds}}
    print(f"full depth, {len(want)} test captions: bf16 tokens agree with fp32 on "
          f"{result['full_depth']['token_agreement']:.1%} of positions, "
          f"{result['full_depth']['exact_captions']:.1%} of captions identical")

    settings = RunSettings(backend="blip2-opt", strategy="confidence", dtype="bfloat16", speculative=False,
                           test_limit=args.run_limit, dev_limit=args.run_limit, output="runs-bf16", progress=False)
    began = time.perf_counter()
    report = run(settings, get_registry(load_entrypoints=False), log=lambda text: print(f"  {text}", flush=True))
    label = report["strategy_label"]
    result["run_bf16"] = {
        "completed": True, "seconds": time.perf_counter() - began, "strategy": label,
        "knob_value": report["threshold"], "test_images": args.run_limit,
        "quality": {k: report["results"][name]["quality"].get("CIDEr") for k, name in
                    (("full", "full"), ("early_exit", label))},
        "layer_speedup": report["results"][label]["speed"].get("layer_speedup"),
    }
    print(f"run --dtype bfloat16 --strategy confidence completed in {result['run_bf16']['seconds']:.0f} s")
    result["provenance"] = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                            "machine": platform.processor() or platform.machine(),
                            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    if args.json:
        from earlyexit.util.files import atomic_write

        with atomic_write(args.json) as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
