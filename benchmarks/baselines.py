"""The paper's comparison (its Tables 1-2 layout) on the embedded model: every trained strategy
run by `earlyexit run` (exits trained on the exit-training split, knob calibrated on dev, scored
on test), captioning and VQA, one JSON with every number and the command that made it.

    python benchmarks/baselines.py --json benchmarks/results/baselines-embedded.json

Each strategy runs with `run`'s defaults (the learned gate in filter mode where the strategy's rule
accepts one; PABEE, LeeBERT and MuE decide without). Runs are cached per strategy and task under
--work, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

STRATEGIES = ("free", "deebert", "pabee", "leebert", "mue")
TASKS = {"caption": "scenes", "vqa": "scenes-vqa"}
CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def run_one(strategy: str, data: str, work: str, args) -> dict:
    from earlyexit.plugins import get_registry
    from earlyexit.run import RunSettings, run

    path = os.path.join(work, f"{data}-{strategy}.json")
    if os.path.isfile(path) and not args.again:
        with open(path) as handle:
            return json.load(handle)
    settings = RunSettings(backend="blip2-opt", strategy=strategy, data=data, speculative=False,
                           output=os.path.join(work, "runs"), progress=False, test_limit=args.test_limit)
    began = time.perf_counter()
    report = run(settings, get_registry(load_entrypoints=False), log=lambda text: print(f"  {text}", flush=True))
    report.pop("tokenizer", None)
    report["seconds"] = time.perf_counter() - began
    os.makedirs(work, exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return report


def row(report: dict, task: str) -> dict:
    results = report["results"]
    label = report["strategy_label"]
    mine, full = results[label], results["full"]
    speed = mine["speed"]
    quality = ({m: mine["quality"][m] for m in CAPTION_METRICS} if task == "caption"
               else {"vqa_accuracy": mine["quality"]["overall"]})
    full_quality = ({m: full["quality"][m] for m in CAPTION_METRICS} if task == "caption"
                    else {"vqa_accuracy": full["quality"]["overall"]})
    untrained = report["mid_crisis"]["untrained"] if report.get("mid_crisis") else None
    return {"strategy": label, "knob": report.get("knob"), "knob_value": report["threshold"],
            "quality": quality, "full_quality": full_quality,
            "param_speedup": speed["param_speedup"], "layer_speedup": speed["layer_speedup"],
            "decode_layer_speedup": speed["decode_layer_speedup"], "wall_speedup": speed["wall_speedup"],
            "decode_wall_speedup": speed["decode_wall_speedup"], "tokens_per_s": speed["tokens_per_s"],
            "full_tokens_per_s": speed["wall"]["full"]["tokens_per_s"] if speed["wall"].get("full") else None,
            "mean_exit_layer": speed["mean_exit_layer"], "exit_layer_histogram": mine["exit_layer_histogram"],
            "vision_layer_speedup": speed.get("vision_layer_speedup"),
            "trainable_parameters": report["parameters"]["trainable"],
            "inference_parameters": report["parameters"]["inference"],
            "per_exit_accuracy": report["mid_crisis"]["trained"] if report.get("mid_crisis") else None,
            "untrained_per_exit_accuracy": ({k: v for k, v in untrained.items() if int(k) in
                                             [int(x) for x in report["mid_crisis"]["trained"]]}
                                            if untrained else None),
            "train_seconds": report["timings"].get("train_exits_s"), "run_seconds": report.get("seconds")}


def markdown(table: dict) -> str:
    lines = []
    for task, rows in table.items():
        metrics = list(rows[0]["quality"]) if rows else []
        lines.append(f"\n{task} (test split)\n")
        lines.append("| strategy | knob | " + " | ".join(metrics) + " | param× | layer× | wall× | tok/s | trainable |")
        lines.append("|---" * (len(metrics) + 7) + "|")
        first = rows[0]
        lines.append("| full model | | " + " | ".join(f"{first['full_quality'][m]:.3f}" for m in metrics)
                     + f" | 1.00 | 1.00 | 1.00 | {first['full_tokens_per_s'] or 0:.0f} | 0 |")
        for r in rows:
            lines.append(f"| {r['strategy']} | {r['knob']}={r['knob_value']} | "
                         + " | ".join(f"{r['quality'][m]:.3f}" for m in metrics)
                         + f" | {r['param_speedup']:.2f} | {r['layer_speedup']:.2f} | {r['wall_speedup'] or 0:.2f}"
                         f" | {r['tokens_per_s']:.0f} | {r['trainable_parameters']:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from earlyexit.evaluate import provenance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--work", default="runs/baselines")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--test-limit", type=int)
    parser.add_argument("--again", action="store_true", help="recompute cached runs")
    args = parser.parse_args(argv)
    table = {}
    for task in args.tasks.split(","):
        table[task] = []
        for strategy in args.strategies.split(","):
            print(f"{task}: {strategy}", flush=True)
            table[task].append(row(run_one(strategy, TASKS[task], args.work, args), task))
    text = markdown(table)
    print(text)
    result = {"command": "python benchmarks/baselines.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "provenance": provenance(), "settings": "earlyexit run defaults (budget rule 1% on dev, layer speed "
              "target, learned filter gate where the rule accepts one, catchup, batch 32, greedy, 20 new tokens)",
              "table": table, "markdown": text}
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
