"""Early exits on a real pretrained language model: the embedded `smol` (MiniGPT-4 on the frozen
SmolLM2-135M-Instruct) on the scene captions' test split.

    python benchmarks/smol.py --json benchmarks/results/smol.json             # 200 test images
    python benchmarks/smol.py --json out.json --test-limit 8 --dev-limit 8    # a quick check
    python benchmarks/smol.py --json benchmarks/results/smol-exit-vocabulary.json \
        --exit-vocabulary 1024 --gate none                                     # exits over smol's own words

Measures, each part cached under --work (a rerun skips what is done; --again redoes it; the exits
and gates are cached by `earlyexit run` itself):
- the build: time and machine load (from the built model's earlyexit_build.json);
- the full model: CIDEr and the other caption metrics, and grounding (colours, shapes, numbers
  named, and named right; VQA per question type) on the test split;
- `earlyexit run` with FREE and with `confidence` (budget rule: <= 1 % relative CIDEr loss on dev;
  learned filter gate, or --gate; exits over the whole vocabulary, or over --exit-vocabulary;
  self-speculative decoding over FREE's exits): quality, param/layer/wall speed-ups split by
  prompt and decode phase, tokens/s, exit-training time;
- the per-exit teacher-forced accuracy of the untrained exits (the shared head, at every layer)
  and FREE's trained exits (the paper's Fig. 3 mid-crisis), on dev;
- the cost of one exit decision: the LM head (what a decision costs without a gate) and the
  learned gate, in layer equivalents (parameters) and in milliseconds (timed here).
Wall-clock numbers mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MODEL, BACKEND = "smol", "minigpt4-llama"
# FREE on smol, chosen on dev (agreement of each exit with the final layer's token): label-free
# distillation (KL to the final layer + cross-entropy on smol's own tokens), a higher learning
# rate and more epochs than FREE's defaults (which suit the embedded `tiny`), and no adversarial
# term: on SmolLM2 the feature classifier separates the last layer's states from the exits'
# almost perfectly and the generator's adversarial loss then pulls the exits away from the
# final layer's tokens (see docs/measurements.md, the smol section)
FREE_RECIPE = "mode=distill,ce=true,adversarial=false,learning_rate=5e-4,epochs=8"
# the classifier exits (DeeBERT, PABEE, LeeBERT) on smol: their read-out copies start from the
# final layer's channel statistics, at a learning rate ten times their default, one epoch (with
# the defaults their cross-entropy stays at 15-19 nats; `benchmarks/results/smol-training-time.json`)
CLASSIFIER_RECIPE = "match_statistics=true,learning_rate=1e-3,epochs=1"
CLASSIFIER_EXITS = ("deebert", "pabee", "leebert")


def parse_options(text: str) -> list[tuple[str, object]]:
    """KEY=VALUE,... with JSON values where they parse (numbers, true/false), strings otherwise."""
    options = []
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            value = json.loads(value)
        except ValueError:
            pass
        options.append((key.strip(), value))
    return options


def cached(work: str, name: str, again: bool, compute):
    """`compute()`'s result, stored as work/name.json, or read back from there."""
    path = os.path.join(work, f"{name}.json")
    if os.path.isfile(path) and not again:
        with open(path) as handle:
            return json.load(handle)
    began = time.perf_counter()
    result = compute()
    result["seconds"] = time.perf_counter() - began
    from earlyexit.util.files import write_json_atomically

    os.makedirs(work, exist_ok=True)
    write_json_atomically(path, result)
    return result


def run_strategy(strategy: str, args) -> dict:
    from earlyexit.pipeline.run import RunSettings, run
    from earlyexit.plugins.registry import get_registry

    settings = RunSettings(backend=BACKEND, strategy=strategy, model=MODEL, test_limit=args.test_limit,
                           dev_limit=args.dev_limit, train_limit=args.train_limit, batch_size=args.batch_size,
                           exit_layers=args.exit_layers, output=os.path.join(args.work, "runs"),
                           grid=tuple(args.grid) if args.grid else None,
                           options=dict(recipe_for(strategy, args)),
                           speculative=strategy == "free", draft_vocabulary=args.draft_vocabulary or None,
                           exit_vocabulary=args.exit_vocabulary or None, gate=args.gate, progress=args.progress)
    report = run(settings, get_registry(load_entrypoints=False), log=lambda text: print(f"  {text}", flush=True))
    report.pop("tokenizer", None)
    return json.loads(json.dumps(report, default=str))


def recipe_for(strategy: str, args) -> list:
    if strategy == "free":
        return args.free_options
    return args.classifier_options if strategy in CLASSIFIER_EXITS else []


def summary(report: dict) -> dict:
    """The numbers docs/measurements.md quotes, for each method the run evaluated on test."""
    full = report["results"]["full"]["quality"]
    rows = {}
    for name, result in report["results"].items():
        speed, quality = result["speed"], result["quality"]
        rows[name] = {"CIDEr": quality.get("CIDEr"),
                      "relative_cider_loss": (1 - quality["CIDEr"] / full["CIDEr"]) if full.get("CIDEr") else None,
                      **{k: speed.get(k) for k in ("param_speedup", "layer_speedup", "decode_layer_speedup",
                                                   "wall_speedup", "decode_wall_speedup", "tokens_per_s",
                                                   "mean_exit_layer")}}
    return {"threshold": report["threshold"], "knob": report["knob"], "exit_layers": report["exit_layers"],
            "draft_exit_layer": report.get("draft_exit_layer"), "draft_choice": report.get("draft_choice"),
            "speculative": {k: v for name, result in report["results"].items() if name.endswith("speculative")
                            for k, v in result["speed"].items() if k in ("acceptance_rate", "mean_draft_length",
                                                                          "draft_vocabulary", "draft_length")},
            "strategy_config": report.get("strategy_config"), "methods": rows,
            "thresholds": report.get("thresholds"), "budget_check": report.get("budget_check"),
            "train_exits_s": report["timings"].get("train_exits_s"), "timings": report["timings"]}


def decision_costs(gate_folder: str | None, exit_vocabulary: list | None, repeats: int = 50, rows: int = 32) -> dict:
    """One exit decision for `rows` rows at one position: the LM head (final norm + 49k-word
    head, what deciding without a gate costs) versus the learned gate and the head over the exit
    vocabulary (when the run used one), in layer equivalents (parameters over a decoder layer's)
    and timed (median of `repeats`)."""
    import torch

    from earlyexit.backends.minigpt4_llama import Minigpt4LlamaBackend
    from earlyexit.core.gates import LearnedGate
    from earlyexit.models import embedded

    backend = Minigpt4LlamaBackend.load(embedded.resolve(MODEL, BACKEND))
    layer_params = backend.layer_param_counts()
    mean_layer = sum(layer_params) / len(layer_params)
    hidden = torch.randn(rows, 1, backend.text_config.hidden_size)

    def timed(function) -> float:
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                began = time.perf_counter()
                function()
                times.append(time.perf_counter() - began)
        return statistics.median(times) * 1000

    result = {"rows": rows, "head_layer_equivalents": backend.head_param_count() / mean_layer,
              "head_ms": timed(lambda: backend.logits(hidden)),
              "decoder_layer_mlp_ms": timed(lambda: backend.language_model.model.layers[0].mlp(hidden))}
    if exit_vocabulary:
        vocabulary = torch.tensor(exit_vocabulary, dtype=torch.long)
        result.update(exit_vocabulary=len(vocabulary),
                      vocabulary_head_layer_equivalents=backend.head_param_count(len(vocabulary)) / mean_layer,
                      vocabulary_head_ms=timed(lambda: backend.logits(hidden, vocabulary)))
    if gate_folder and os.path.isdir(gate_folder):
        gate = LearnedGate.load(gate_folder)
        result.update(gate_layer_equivalents=gate.param_count(0) / mean_layer,
                      gate_ms=timed(lambda: gate.score(0, hidden.squeeze(1))), gate_folder=gate_folder)
    return result


def matching_gate(exit_layers) -> str | None:
    """The newest cached learned gate for FREE at `exit_layers` on SmolLM2's width."""
    from earlyexit.models import embedded

    root = os.path.join(embedded.cache_root(), "gates")
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, name, "gate_config.json")) as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            continue
        if config.get("strategy") == "free" and config.get("exit_layers") == exit_layers and config.get("width") == 576:
            found.append(os.path.join(root, name))
    return max(found, key=os.path.getmtime) if found else None


def main(argv=None) -> int:
    from earlyexit.cli.common import parse_int_list
    from earlyexit.util.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the results here (with command and provenance)")
    parser.add_argument("--work", default="runs/smol", help="cached parts (default runs/smol)")
    parser.add_argument("--test-limit", type=int, default=200, help="test images (default 200; 0: all 500)")
    parser.add_argument("--dev-limit", type=int, help="dev images for calibration (default: all 500)")
    parser.add_argument("--train-limit", type=int, help="exit-training images (default: all 400)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--exit-layers", type=parse_int_list, help="FREE's and confidence's exits (default: "
                        "the strategies' own, after each quarter of the 30 layers)")
    parser.add_argument("--strategies", default="free,confidence")
    parser.add_argument("--grid", type=lambda text: [float(x) for x in text.split(",")],
                        help="thresholds to calibrate over (default: each strategy's grid)")
    parser.add_argument("--free-options", type=parse_options, default=parse_options(FREE_RECIPE),
                        help=f"FREE's training options, KEY=VALUE,... (default {FREE_RECIPE}: chosen on dev)")
    parser.add_argument("--classifier-options", type=parse_options, default=parse_options(CLASSIFIER_RECIPE),
                        help=f"DeeBERT's, PABEE's and LeeBERT's options (default {CLASSIFIER_RECIPE})")
    parser.add_argument("--draft-vocabulary", type=int, default=256,
                        help="speculative drafts read out the N tokens smol writes most (default 256; 0: all)")
    parser.add_argument("--exit-vocabulary", type=int, default=0,
                        help="exits decide and emit over the N tokens smol writes most (`run --exit-vocabulary`; "
                             "default 0: the whole vocabulary)")
    parser.add_argument("--gate", default="learned", choices=["learned", "cosine", "none"],
                        help="the runs' gate (`run --gate`, default learned)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--again", action="store_true", help="recompute the cached parts")
    args = parser.parse_args(argv)
    args.test_limit = args.test_limit or None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import grounding

    from earlyexit.models import embedded

    began = time.perf_counter()
    recipe = embedded.recipe_of(MODEL)
    embedded.ensure_built(recipe)
    build = embedded.build_info(recipe)
    result = {"command": "python benchmarks/smol.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "test_limit": args.test_limit, "dev_limit": args.dev_limit, "train_limit": args.train_limit,
              "grid": args.grid, "load_average_1min_at_start": os.getloadavg()[0],
              "build": {k: build.get(k) for k in ("fingerprint", "train_seconds", "seconds", "torch_threads",
                                                  "load_average_1min", "final_loss", "final_words_loss")}}

    def grounded():
        from earlyexit.plugins.registry import get_registry

        backend = get_registry(load_entrypoints=False).backend(BACKEND).load(embedded.resolve(MODEL, BACKEND))
        return grounding.report(backend, args.test_limit or 500, "test")

    result["grounding_test"] = cached(args.work, f"grounding-test-{args.test_limit}", args.again, grounded)
    runs, reports = {}, {}
    for strategy in args.strategies.split(","):
        key = "-".join(str(x) for x in ("run", strategy, args.test_limit, args.dev_limit, args.train_limit, args.grid,
                                          args.exit_layers, args.draft_vocabulary, *sorted(recipe_for(strategy, args)),
                                          *((f"exitvocab{args.exit_vocabulary}",) if args.exit_vocabulary else ()),
                                          *((f"gate{args.gate}",) if args.gate != "learned" else ()),
                                          *((f"batch{args.batch_size}",) if args.batch_size != 32 else ())))
        report = reports[strategy] = cached(args.work, key, args.again, lambda: run_strategy(strategy, args))
        calibration = report.get("calibration") or {}
        runs[strategy] = {"summary": summary(report), "mid_crisis": report.get("mid_crisis"),
                          "calibration_why": calibration.get("why"), "calibration_points": calibration.get("points"),
                          "calibration_full_quality": calibration.get("full_quality"),
                          "full_quality": report["results"]["full"]["quality"]}
    result["runs"] = runs
    gate_folder = reports["free"].get("gate_folder") if "free" in reports else None
    if gate_folder is None and "free" in reports:  # a report cached before runs recorded their gate
        gate_folder = matching_gate(reports["free"]["exit_layers"])
    exit_vocabulary = reports["free"].get("exit_vocabulary") if "free" in reports else None
    result["exit_decision_cost"] = decision_costs(gate_folder, exit_vocabulary)
    result["seconds"] = time.perf_counter() - began
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    result["provenance"] = provenance()
    from earlyexit.util.files import write_json_atomically

    write_json_atomically(args.json, result)
    print(json.dumps({k: result[k] for k in ("build", "exit_decision_cost")}, indent=2))
    for strategy, entry in runs.items():
        print(strategy, json.dumps(entry["summary"]["methods"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
