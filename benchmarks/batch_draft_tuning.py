"""Each drafter's draft length k and stop threshold τ, chosen on dev for a batch size, then
measured on test: a batch verifies rows x (k + 1) positions in one forward, so past batch 1 the
verification stops being nearly free and a shorter, more cautious draft may pay where k = 4 did not.

    python benchmarks/batch_draft_tuning.py --model smol --batches 8,32 --drafters corpus,feature,hybrid \
        --json benchmarks/results/batch-draft-tuning-smol-drafters.json

For each batch size, every (k, τ) of the grid decodes the first `--images` dev images with
batched speculative decoding (`BatchedDraftVerifyDecoder`) beside the backbone's own batched
`generate` of the same batches, alternating; the setting with the best decode-phase ratio on dev
is then measured the same way on the first `--images` test images, beside the drafter's default
k and τ. Every row's tokens must equal the backbone's (checked). Each drafter is fitted
once, as `run --drafter NAME` fits it at its defaults (the corpus: the backbone's greedy outputs on
the exit-training split; the feature drafter: trained on the first 400 of them; the hybrid: both,
the same trained feature drafter), and drafts at every (k, τ) of the grid (`Drafter.with_drafting`).
Batches of every drafter decode together (one drafter cache for the whole batch).
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
    parser.add_argument("--drafters", default="corpus", help="drafters to tune (comma-separated): corpus, feature, hybrid")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from drafter_replay import measure_batched

    from earlyexit.data.splits import load_split, splits_for
    from earlyexit.drafters.corpus import CorpusDrafter
    from earlyexit.drafters.feature import FeatureDrafter, HybridDrafter
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
    train = load_split("scenes", train_split, None)
    corpus = backbone_token_outputs(backend, train, batch_size=32, max_new_tokens=args.max_new_tokens)[0]
    outputs_seconds = time.perf_counter() - began
    dev, test = load_split("scenes", dev_split, args.images), load_split("scenes", test_split, args.images)
    quiet = dict(log=lambda *_: None)

    fitted, fit_seconds = {}, {}
    for name in [d for d in args.drafters.split(",") if d]:
        began = time.perf_counter()
        if name == "corpus":
            fitted[name] = CorpusDrafter(backend)
            fitted[name].fit(corpus, **quiet)
        elif name in ("feature", "hybrid"):
            if "feature" not in fitted and "hybrid" not in fitted:
                feature = FeatureDrafter(backend)
                feature.fit(corpus, samples=train, log=print)
            if name == "feature":
                fitted[name] = feature
            else:
                fitted[name] = HybridDrafter(backend)
                fitted[name].corpus.fit(corpus, **quiet)
                fitted[name].feature.module = feature.module  # the same trained layer
        else:
            parser.error(f"unknown drafter {name!r}: corpus, feature or hybrid")
        fit_seconds[name] = time.perf_counter() - began

    def measured(name: str, dataset, size: int, length: int, stop_below: float) -> dict:
        drafter = fitted[name].with_drafting(draft_length=length, stop_below=stop_below)
        result = measure_batched(backend, drafter, dataset, size, args.max_new_tokens)
        result.update(drafter=name, length=length, stop_below=stop_below, split=dataset.split)
        print(f"  {name}, batch {size}, {dataset.split}, k={length} τ={stop_below}: decode "
              f"{result['decode_wall_speedup']:.2f}x, end to end {result['wall_speedup']:.2f}x, "
              f"α {result['acceptance_rate']:.3f}", flush=True)
        return result

    by_drafter = {}
    for name in fitted:
        default = type(fitted[name]).Config()
        by_batch = by_drafter[name] = {}
        for size in [int(b) for b in args.batches.split(",") if b]:
            on_dev = [measured(name, dev, size, length, stop_below) for length, stop_below in GRID]
            best = max(on_dev, key=lambda r: r["decode_wall_speedup"])
            on_test = [measured(name, test, size, best["length"], best["stop_below"])]
            if (best["length"], best["stop_below"]) != (default.draft_length, default.stop_below):
                on_test.append(measured(name, test, size, default.draft_length, default.stop_below))
            by_batch[size] = {"dev": on_dev, "chosen": {"length": best["length"], "stop_below": best["stop_below"]},
                              "default": {"length": default.draft_length, "stop_below": default.stop_below},
                              "test": on_test}
    write_json_atomically(args.json, {
        "command": "python benchmarks/batch_draft_tuning.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": name, "model": args.model, "corpus_captions": len(corpus), "outputs_seconds": outputs_seconds,
        "images": args.images, "grid": GRID, "fit_seconds": fit_seconds, "by_drafter": by_drafter,
        "provenance": provenance(),
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
