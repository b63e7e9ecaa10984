"""Few-row linear layers on this CPU: `F.linear` against `W @ xᵀ` (earlyexit.core.kernels), per weight
shape and row count, and what it does to plain greedy decoding.

    python benchmarks/small_rows.py --json benchmarks/results/small-rows.json

1. Kernels: for every distinct linear shape of the given model (30 copies each, so the weights
   come from memory as in a real forward, not from cache), the best of 7 timings of
   `F.linear(x, W)` and of what `kernels.small_row_linear` runs, at 1-32 rows.
2. Decoding: the backbone's own `generate` (no early-exit code at all) at batch 1 and batch 32,
   greedy, 20 new tokens, with the few-row route installed and without it, alternated.
Run it alone (two torch jobs on two cores distort each other).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from earlyexit.models.loading import load_backend

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROWS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 32)


def best_ms(call, repeats: int = 7, inner: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            call()
        times.append((time.perf_counter() - start) / inner)
    return 1000 * min(times)


def kernel_table(shapes, copies: int = 30) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from earlyexit.core.kernels import chooses_transposed, small_row_linear

    table = []
    for out_features, in_features in shapes:
        many = copies if out_features * in_features < (1 << 24) else 2  # the head: 113 MB a copy
        weights = [torch.randn(out_features, in_features) for _ in range(many)]
        for rows in ROWS:
            x = torch.randn(rows, in_features)
            with torch.no_grad():
                plain = best_ms(lambda: [F.linear(x, w) for w in weights])
                routed = best_ms(lambda: [small_row_linear(x, w) for w in weights])
                plain = min(plain, best_ms(lambda: [F.linear(x, w) for w in weights]))  # both sides of `routed`
            table.append({"shape": [out_features, in_features], "rows": rows, "copies": many,
                          "transposed": chooses_transposed(weights[0], rows), "linear_ms": plain,
                          "routed_ms": routed, "ratio": routed / plain})
        print(f"{out_features}x{in_features}: " + "  ".join(f"{r['rows']}:{r['ratio']:.2f}" for r in table[-len(ROWS):]),
              flush=True)
    return table


def decoding(backend, batch_sizes, max_new_tokens: int, repeats: int) -> list[dict]:
    import torch

    from earlyexit.core import kernels
    from earlyexit.data.splits import load_split

    samples = load_split("scenes", "dev", max(batch_sizes)).samples
    out = []
    for batch in batch_sizes:
        inputs = backend.prepare_inputs([s.load_image() for s in samples[:batch]], [""] * batch)
        timings = {"linear": [], "routed": []}
        tokens = {}
        for _ in range(repeats):
            for name in ("linear", "routed"):
                (kernels.install if name == "routed" else kernels.uninstall)(backend.model)
                with torch.no_grad():
                    backend.plain_generate(**inputs, max_new_tokens=2, do_sample=False)  # warm
                    start = time.perf_counter()
                    ids = backend.plain_generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                                 do_sample=False)
                    timings[name].append(time.perf_counter() - start)
                tokens[name] = ids
        kernels.install(backend.model)
        row = {"batch": batch, "new_tokens": max_new_tokens, "linear_s": min(timings["linear"]),
               "routed_s": min(timings["routed"]), "same_tokens": bool(torch.equal(tokens["linear"], tokens["routed"]))}
        row["speedup"] = row["linear_s"] / row["routed_s"]
        out.append(row)
        print(f"plain generate, batch {batch}: F.linear {row['linear_s']:.2f} s, routed {row['routed_s']:.2f} s "
              f"({row['speedup']:.2f}x), same tokens: {row['same_tokens']}", flush=True)
    return out


def main(argv=None) -> None:
    import torch

    from earlyexit.plugins.registry import get_registry
    from earlyexit.util.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="minigpt4-llama")
    parser.add_argument("--model", default="smol")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here (with command and provenance)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    backend = load_backend(get_registry().backend(args.backend), args.model)
    shapes = sorted({tuple(m.weight.shape) for m in backend.language_model.modules() if isinstance(m, torch.nn.Linear)})
    result = {"command": "python benchmarks/small_rows.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "backend": args.backend, "model": args.model,
              "kernels": kernel_table(shapes),
              "decoding": decoding(backend, [int(b) for b in args.batch_sizes.split(",")], args.max_new_tokens,
                                   args.repeats),
              "provenance": provenance()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
