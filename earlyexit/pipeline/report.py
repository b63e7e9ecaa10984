"""Step 6 of a run: the per-exit accuracy of untrained versus trained exits (the paper's
mid-crisis plot) and the report `run` returns."""

from __future__ import annotations

import csv
import dataclasses
import os

from earlyexit.evaluation.layer_accuracy import exit_accuracy, per_layer_accuracy
from earlyexit.pipeline.context import RunContext
from earlyexit.pipeline.drafting import Drafting
from earlyexit.pipeline.scoring import row_label
from earlyexit.plugins.registry import notify
from earlyexit.util.files import atomic_write, save_figure
from earlyexit.util.provenance import provenance


def mid_crisis_report(backend, strategy, dataset, folder: str, limit: int = 100) -> dict:
    """Per-exit teacher-forced accuracy: untrained (shared head) versus the strategy's exits."""
    import matplotlib  # a file-only backend chosen here, not for whoever imports this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    untrained = per_layer_accuracy(backend, dataset, limit=limit)
    trained = exit_accuracy(backend, strategy, dataset, limit=limit)
    os.makedirs(folder, exist_ok=True)
    csv_path, png_path = os.path.join(folder, "mid_crisis.csv"), os.path.join(folder, "mid_crisis.png")
    with atomic_write(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "untrained_accuracy", f"{strategy.name}_accuracy"])
        for row in untrained:
            writer.writerow([row["layer"], row["accuracy"], trained.get(row["layer"], "")])
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([r["layer"] for r in untrained], [r["accuracy"] for r in untrained], "o-",
              label="untrained exits (shared head)")
    axis.plot(list(trained), list(trained.values()), "s-", label=f"{strategy.name} exits")
    axis.set_xlabel("exit layer")
    axis.set_ylabel("next-token accuracy (teacher forced)")
    axis.set_title("per-exit accuracy on the dev split")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, png_path)
    plt.close(figure)
    return {"untrained": {r["layer"]: r["accuracy"] for r in untrained}, "trained": trained,
            "csv": csv_path, "png": png_path}



def final_report(run: RunContext, knob, gate, calibration, drafting: Drafting, results: dict, mid_crisis,
                 exit_vocabulary, untrained: dict, untrained_calibration: dict) -> dict:
    """What `run` returns (rank 0), after telling the lifecycle hooks the run ended. `untrained`:
    {row name: Knob} of the compared `confidence` exits, `untrained_calibration` what calibrated them."""
    settings, strategy, backend = run.settings, run.strategy, run.backend
    label = row_label(run, gate)
    thresholds = {name: comparison.value for name, comparison in untrained.items()}
    if knob is not None:
        thresholds = {label: knob.value, **thresholds}
    checks = {name: budget_check(record, results, name)
              for name, record in {label: calibration, **untrained_calibration}.items()}
    notify(run.registry, "run_end", config=dataclasses.asdict(settings),
           results={name: {"quality": r["quality"], "speed": {k: v for k, v in r["speed"].items() if k != "wall"}}
                    for name, r in results.items()})
    return {"settings": dataclasses.asdict(settings), "threshold": knob.value if knob is not None else None,
            "knob": knob.name if knob is not None else None, "parameters": strategy.parameter_counts(),
            "strategy_label": label, "thresholds": thresholds,
            "draft_exit_layer": strategy.exit_layers[drafting.exit] if drafting.exit is not None else None,
            "draft_choice": drafting.choice,
            "drafter_choice": drafting.drafter_choice,
            "exit_layers": strategy.exit_layers, "strategy_config": strategy.config.to_dict(),
            "calibration": calibration, "untrained_calibration": untrained_calibration,
            "budget_check": {name: check for name, check in checks.items() if check is not None} or None,
            "results": results, "mid_crisis": mid_crisis, "timings": run.timings,
            "gate_folder": getattr(gate, "folder", None),
            "exit_vocabulary": exit_vocabulary.tolist() if exit_vocabulary is not None else None,
            "num_layers": backend.num_layers, "output": run.output, "provenance": provenance(),
            "tokenizer": backend.processor.tokenizer}


def budget_check(calibration: dict | None, results: dict, label: str) -> dict | None:
    """The calibrated row's loss on dev (what the rule saw) beside its loss on test, against the
    budget: the relative quality loss for `budget`, the share of outputs that differ from the full
    model's for `risk`. None where nothing was calibrated against a budget."""
    if not calibration or calibration.get("rule") not in ("budget", "risk") or label not in results:
        return None
    knob = calibration.get("knob")
    point = next((p for p in calibration.get("points", []) if knob and p.get(knob) == calibration.get(knob)), None)
    if point is None or not calibration.get("full_quality"):
        return None
    full, row = results["full"], results[label]
    key = next((k for k in ("CIDEr", "overall", "MRR") if k in full["quality"]), None)
    bound = None
    if calibration["rule"] == "budget":
        dev, bound = 1 - point["quality"] / calibration["full_quality"], point.get("loss_bound")
        test = 1 - row["quality"][key] / full["quality"][key] if key and full["quality"][key] else None
        measure = f"relative {key} loss"
    else:
        dev = point["disagreements"] / point["samples"] if point.get("samples") else None
        same = [row["predictions"][k] == v for k, v in full.get("predictions", {}).items() if k in row["predictions"]]
        test = 1 - sum(same) / len(same) if same else None
        measure = "share of outputs that differ from the full model's"
    budget = calibration["budget"]
    return {"rule": calibration["rule"], "measure": measure, "budget": budget, "dev_loss": dev,
            "dev_loss_bound": bound, "epsilon": calibration.get("epsilon"), "test_loss": test,
            "holds_on_test": None if test is None else test <= budget + 1e-12}
