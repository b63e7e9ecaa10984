"""Exit placement under a budget of k exits (earlyexit.evaluation.placement) on the embedded model: the greedy
search on dev statistics for each k, then each chosen set confirmed by `earlyexit run` with the
untrained `confidence` exits (knob calibrated on dev, scored on test) next to evenly spaced exits.

    python benchmarks/placement.py --json benchmarks/results/placement-embedded.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from earlyexit.models.loading import load_backend

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def confirm(exits: list[int], args, registry) -> dict:
    from earlyexit.pipeline.run import RunSettings, run

    settings = RunSettings(backend="blip2-opt", strategy="confidence", exit_layers=exits, gate="none",
                           speculative=False, compare_untrained=False, progress=False, test_limit=args.test_limit,
                           output=os.path.join(args.work, "-".join(map(str, exits))), budget=args.budget)
    began = time.perf_counter()
    report = run(settings, registry, log=lambda text: None)
    result = report["results"][report["strategy_label"]]
    return {"exits": exits, "threshold": report["threshold"], "CIDEr": result["quality"]["CIDEr"],
            "full_CIDEr": report["results"]["full"]["quality"]["CIDEr"],
            "param_speedup": result["speed"]["param_speedup"], "layer_speedup": result["speed"]["layer_speedup"],
            "seconds": time.perf_counter() - began}


def main(argv=None) -> int:
    from earlyexit.data.splits import load_split
    from earlyexit.evaluation.placement import greedy_placement, layer_statistics
    from earlyexit.plugins.registry import get_registry
    from earlyexit.util.files import write_json_atomically
    from earlyexit.util.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--budgets", default="1,2,3,4", help="numbers of exits to place")
    parser.add_argument("--budget", type=float, default=0.01, help="allowed disagreement with the full model")
    parser.add_argument("--test-limit", type=int, default=200)
    parser.add_argument("--work", default="runs/placement")
    args = parser.parse_args(argv)
    registry = get_registry(load_entrypoints=False)
    backend = load_backend(registry.backend("blip2-opt"), "tiny")
    stats = layer_statistics(backend, load_split("scenes", "dev", None), limit=None)
    n = backend.num_layers
    rows = []
    for k in map(int, args.budgets.split(",")):
        search = greedy_placement(stats, k, budget=args.budget)
        even = sorted({round(n * (i + 1) / (k + 1)) for i in range(k)})
        row = {"k": k, "search": search, "greedy": confirm(search["exits"], args, registry),
               "evenly_spaced": confirm(even, args, registry)}
        rows.append(row)
        print(f"k={k}: greedy {search['exits']} (proxy {search['rounds'][-1]['speedup']:.2f}x, "
              f"{search['sets_evaluated']} sets in {search['search_seconds']:.2f} s + statistics "
              f"{stats.seconds:.1f} s) -> layer {row['greedy']['layer_speedup']:.2f}x CIDEr "
              f"{row['greedy']['CIDEr']:.3f}; evenly {even} -> layer {row['evenly_spaced']['layer_speedup']:.2f}x "
              f"CIDEr {row['evenly_spaced']['CIDEr']:.3f}", flush=True)
    write_json_atomically(args.json, {"command": "python benchmarks/placement.py " + " ".join(argv or sys.argv[1:]),
                                      "provenance": provenance(), "budget": args.budget, "tokens": int(
                                          stats.confidence.shape[0]), "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
