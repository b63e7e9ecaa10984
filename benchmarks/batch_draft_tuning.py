"""The corpus drafter's draft length k and stop threshold τ, chosen on dev for a batch size, then
measured on test: a batch verifies rows x (k + 1) positions in one forward, so past batch 1 the
verification stops being nearly free and a shorter, more cautious draft may pay where k = 4 did not.

    python benchmarks/batch_draft_tuning.py --model smol --batches 8,32 \
        --json benchmarks/results/batch-draft-tuning-smol.json

For each batch size, every (k, τ) of the grid decodes the first `--images` dev images with
batched speculative decoding (`BatchedDraftVerifyDecoder`) beside the backbone's own batched
`generate` of the same batches, alternating; the setting with the best decode-phase ratio on dev
is then measured the same way on the first `--images` test images, beside k = 4, τ = 0 (the
drafter's default). Every row's tokens must equal the backbone's (checked). The corpus is the
backbone's greedy outputs on the exit-training split, as `run --drafter corpus` builds it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

GRID = ((1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0), (2, 0.3), (3, 0.3), (4, 0.3), (6, 0.3), (4, 0.6), (8, 0.6))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smol", help="tiny or smol (the embedded models)")
    parser.add_argument("--batches", default="8,32", help="batch sizes (comma-separated)")
    parser.add_argument("--images", type=int, default=64, help="dev images to choose on, test images to measure")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from drafter_replay import measure_batched

    from earlyexit.data.splits import load_split, splits_for
    from earlyexit.drafters.corpus import CorpusDrafter
    from earlyexit.models.loading import load_backend
    from earlyexit.plugins.registry import get_registry
    from earlyexit.training.drafters import backbone_token_outputs
    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    torch.set_num_threads(int(os.environ.get("EARLYEXIT_THREADS", "2")))
    name = "minigpt4-llama" if args.model == "smol" else "blip2-opt"
    backend = load_backend(get_registry(load_entrypoints=False).backend(name), args.model)
    train_split, dev_split, test_split = splits_for("scenes")
    began = time.perf_counter()
    corpus = backbone_token_outputs(backend, load_split("scenes", train_split, None), batch_size=32,
                                    max_new_tokens=args.max_new_tokens)[0]
    outputs_seconds = time.perf_counter() - began
    dev, test = load_split("scenes", dev_split, args.images), load_split("scenes", test_split, args.images)

    def measured(dataset, size: int, length: int, stop_below: float) -> dict:
        drafter = CorpusDrafter(backend, CorpusDrafter.Config(draft_length=length, stop_below=stop_below))
        drafter.fit(corpus, log=lambda *_: None)
        result = measure_batched(backend, drafter, dataset, size, args.max_new_tokens)
        result.update(length=length, stop_below=stop_below, split=dataset.split)
        print(f"  batch {size}, {dataset.split}, k={length} τ={stop_below}: decode {result['decode_wall_speedup']:.2f}x, "
              f"end to end {result['wall_speedup']:.2f}x, α {result['acceptance_rate']:.3f}", flush=True)
        return result

    by_batch = {}
    for size in [int(b) for b in args.batches.split(",") if b]:
        on_dev = [measured(dev, size, length, stop_below) for length, stop_below in GRID]
        best = max(on_dev, key=lambda r: r["decode_wall_speedup"])
        on_test = [measured(test, size, best["length"], best["stop_below"])]
        if (best["length"], best["stop_below"]) != (4, 0.0):
            on_test.append(measured(test, size, 4, 0.0))
        by_batch[size] = {"dev": on_dev, "chosen": {"length": best["length"], "stop_below": best["stop_below"]},
                          "test": on_test}
    write_json_atomically(args.json, {
        "command": "python benchmarks/batch_draft_tuning.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": name, "model": args.model, "corpus_captions": len(corpus), "outputs_seconds": outputs_seconds,
        "images": args.images, "grid": GRID, "by_batch": by_batch, "provenance": provenance(),
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
