"""`earlyexit run` end to end on a micro configuration."""

import json
import os

from helpers import make_backend

from earlyexit.cli import main


def test_run_free_end_to_end(tmp_path, capsys):
    model = tmp_path / "micro"
    make_backend(seed=8, num_layers=4, image_size=64, patch_size=16, init_std=0.1).save_pretrained(str(model))
    argv = ["run", "--backend", "blip2-opt", "--strategy", "free", "--model", str(model), "--data", "scenes",
            "--exit-layers", "1,2", "--train-limit", "6", "--dev-limit", "6", "--test-limit", "4",
            "--grid", "0.2,0.9", "--batch-size", "4", "--max-new-tokens", "4", "--output", str(tmp_path / "runs"),
            "--option", "epochs=1", "--option", "batch_size=4", "--speed-target", "wall",
            "--json", str(tmp_path / "run.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "free + learned gate @" in out and "confidence @" in out and "full" in out and "CIDEr" in out
    assert "free speculative" in out and "% accepted" in out
    report = json.loads((tmp_path / "run.json").read_text())
    assert set(report["results"]) == {"full", "free + learned gate", "confidence", "confidence + learned gate",
                                      "free speculative"}
    # speculative decoding is the full model, token for token
    assert report["results"]["free speculative"]["predictions"] == report["results"]["full"]["predictions"]
    assert report["threshold"] in (0.2, 0.9) and report["calibration"]["rule"] == "budget"
    # every calibrated row: dev's loss beside test's, against the budget; the untrained exits are
    # calibrated by the same rule, on their own
    checks = report["budget_check"]
    assert set(checks) == {"free + learned gate", "confidence", "confidence + learned gate"}
    for name, check in checks.items():
        assert check["budget"] == 0.01 and check["holds_on_test"] == (check["test_loss"] <= 0.01)
        assert f"budget (budget: relative CIDEr loss), {name}: loss on dev" in out
    assert set(report["untrained_calibration"]) == {"confidence", "confidence + learned gate"}
    for name, record in report["untrained_calibration"].items():
        assert report["thresholds"][name] == record["threshold"] and f"{name} @{record['threshold']:g}" in out
        assert [p["threshold"] for p in record["points"]] == [0.2, 0.9]  # the learned gate filters: --grid applies
    assert report["calibration"]["speed_target"] == "wall" and report["results"]["free + learned gate"]["config"]["gate"] == "learned"
    assert [p["threshold"] for p in report["calibration"]["points"]] == [0.2, 0.9]
    for name in ("calibration.csv", "calibration.png", "mid_crisis.csv", "mid_crisis.png"):
        assert os.path.getsize(tmp_path / "runs" / "blip2-opt-free" / name) > 0
    free = report["results"]["free + learned gate"]
    assert free["speed"]["wall_speedup"] > 0 and free["speed"]["decode_wall_speedup"] > 0
    assert free["speed"]["layer_speedup"] > 0 and free["speed"]["tokens_per_s"] > 0
    assert free["config"]["gate"] == "learned" and report["timings"]["train_gate_s"] > 0
    assert os.path.isfile(os.path.join(report["gate_folder"], "gate_config.json"))  # which cached gate it used
    assert set(report["mid_crisis"]["trained"]) == {"1", "2"}
    assert "train_exits_s" in report["timings"]
    choice = report["draft_choice"]  # the draft exit was chosen on dev, beside plain decoding
    assert set(choice["dev_tokens_per_s"]) == {"1", "2"} and choice["dev_plain_tokens_per_s"] > 0
    # then the draft length at that exit, and the test row drafts what was chosen
    by_length = choice["dev_tokens_per_s_by_length"]
    assert set(by_length) == {"1", "2", "3", "4"} and by_length[str(choice["draft_length"])] == max(by_length.values())
    assert report["results"]["free speculative"]["speed"]["draft_length"] == choice["draft_length"]

    # a second run reuses the trained exits; its drafts read out only the tokens the backbone writes,
    # and so do its exits (calibration included), over their own vocabulary
    second = tmp_path / "second.json"
    assert main(argv[:-2] + ["--draft-vocabulary", "8", "--exit-vocabulary", "5", "--json", str(second)]) == 0
    captured = capsys.readouterr()
    assert "exits: reusing" in captured.err and "training a learned gate" not in captured.err
    assert "speculative: drafts read out" in captured.err and " tokens, " in captured.out
    assert "exits read out" in captured.err and "exits read out the" in captured.out
    report = json.loads(second.read_text())
    vocabulary = report["exit_vocabulary"]
    assert 1 <= len(vocabulary) <= 5 and report["settings"]["exit_vocabulary"] == 5
    for name in ("free + learned gate", "confidence", "confidence + learned gate"):
        result = report["results"][name]
        assert result["speed"]["exit_vocabulary"] == len(vocabulary)
        for example in result["examples"]:  # every token an exit wrote is one of them
            assert all(token in vocabulary for token, layer in zip(example["token_ids"], example["exit_layers"])
                       if layer < report["num_layers"])
    assert report["results"]["full"]["speed"]["exit_vocabulary"] is None
    assert report["results"]["free speculative"]["predictions"] == report["results"]["full"]["predictions"]


def test_run_with_a_corpus_drafter(tmp_path, capsys):
    """`run --drafter corpus` fits the drafter on the backbone's own outputs (then reuses it), times
    it on dev beside plain decoding, and reports its speculative row: the full model's predictions."""
    model = tmp_path / "micro"
    make_backend(seed=8, num_layers=4, image_size=64, patch_size=16, init_std=0.1).save_pretrained(str(model))
    argv = ["run", "--backend", "blip2-opt", "--strategy", "confidence", "--model", str(model), "--gate", "none",
            "--threshold", "0.9", "--train-limit", "8", "--dev-limit", "4", "--test-limit", "4", "--batch-size", "4",
            "--max-new-tokens", "6", "--output", str(tmp_path / "runs"), "--drafter", "corpus",
            "--drafter-option", "stop_below=0.3", "--draft-length", "3", "--json", str(tmp_path / "run.json"),
            "--draft-anyway"]  # its row whatever dev says (a micro model's timings are noise)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "drafter corpus: fitted on 8 of the backbone's own outputs" in captured.err
    assert "corpus speculative" in captured.out and "with the corpus drafter" in captured.out
    report = json.loads((tmp_path / "run.json").read_text())
    row = report["results"]["corpus speculative"]
    assert row["predictions"] == report["results"]["full"]["predictions"]
    assert row["config"]["decode"] == "speculative" and row["speed"]["drafter"] == "corpus"
    assert row["speed"]["draft_length"] == 3 and row["speed"]["decode_wall_speedup"] > 0
    assert report["settings"]["drafter_options"] == {"stop_below": 0.3}
    choice = report["drafter_choice"]  # timed on dev beside the full model, at the run's batch size
    assert choice["dev_plain_tokens_per_s"] > 0 and choice["pays"] == (choice["dev_speedup"] > 1)
    assert choice["given"] == {"draft_length": 3, "stop_below": 0.3} and len(choice["tried"]) == 1  # none searched
    assert "up to 3 a round, τ = 0.3, as given" in captured.out
    assert "confidence speculative" not in report["results"]
    argv[argv.index("stop_below=0.3")] = "stop_below=0.5"  # another knob: the same fit drafts with it
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "drafter corpus: reusing" in captured.err
    assert json.loads((tmp_path / "run.json").read_text())["drafter_choice"]["stop_below"] == 0.5


def test_run_with_the_hybrid_drafter_trains_caches_and_reuses_it(tmp_path, capsys):
    """`run --drafter hybrid` trains the feature drafter on the backbone's own outputs (and indexes
    the corpus), caches both, and its row is the full model's predictions; a second run reuses it."""
    model = tmp_path / "micro"
    make_backend(seed=8, num_layers=4, image_size=64, patch_size=16, init_std=0.1).save_pretrained(str(model))
    argv = ["run", "--backend", "blip2-opt", "--strategy", "confidence", "--model", str(model), "--gate", "none",
            "--threshold", "0.9", "--train-limit", "8", "--dev-limit", "4", "--test-limit", "4", "--batch-size", "4",
            "--max-new-tokens", "6", "--output", str(tmp_path / "runs"), "--drafter", "hybrid",
            "--drafter-option", "epochs=2", "--drafter-option", "vocabulary=32", "--draft-anyway",
            "--json", str(tmp_path / "run.json")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "drafter feature: trained on 8 outputs" in captured.err and "drafter corpus: 8 outputs" in captured.err
    report = json.loads((tmp_path / "run.json").read_text())
    row = report["results"]["hybrid speculative"]
    assert row["predictions"] == report["results"]["full"]["predictions"]
    choice = report["drafter_choice"]  # k and τ not given: chosen on dev (k first, the hybrid's own 6 among them)
    assert choice["drafter"] == "hybrid" and choice["given"] == {}
    assert {(t["draft_length"], t["stop_below"]) for t in choice["tried"]} == {
        (1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0), (6, 0.0), (choice["draft_length"], 0.3)}
    best = max(choice["tried"], key=lambda t: t["dev_speedup"])
    assert choice["dev_speedup"] == best["dev_speedup"]
    assert row["speed"]["drafter"] == "hybrid" and row["speed"]["draft_length"] == choice["draft_length"]
    assert f"up to {choice['draft_length']} a round" in captured.out and "chosen on dev" in captured.out
    assert main(argv) == 0
    assert "drafter hybrid: reusing" in capsys.readouterr().err


def test_run_decodes_plainly_where_the_drafter_does_not_pay(tmp_path, capsys, monkeypatch):
    """Where dev says drafting is slower than the full model's own decoding, the test split is
    decoded plainly (no drafter row), and the run says so."""
    from earlyexit.pipeline import drafting

    timed = drafting.evaluate

    def slower(*args, **kwargs):  # dev's timing, made slower than plain decoding
        result = timed(*args, **kwargs)
        result["speed"]["wall_speedup"] = 0.8
        return result

    monkeypatch.setattr(drafting, "evaluate", slower)
    model = tmp_path / "micro"
    make_backend(seed=8, num_layers=4, image_size=64, patch_size=16, init_std=0.1).save_pretrained(str(model))
    argv = ["run", "--backend", "blip2-opt", "--strategy", "confidence", "--model", str(model), "--gate", "none",
            "--threshold", "0.9", "--train-limit", "8", "--dev-limit", "4", "--test-limit", "4", "--batch-size", "4",
            "--max-new-tokens", "6", "--output", str(tmp_path / "runs"), "--drafter", "corpus",
            "--json", str(tmp_path / "run.json")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "does not pay on dev at batch 4 (0.80x): the test split is decoded plainly" in captured.err
    assert "the corpus drafter is slower than plain decoding on dev at batch 4 (0.80x end to end)" in captured.out
    report = json.loads((tmp_path / "run.json").read_text())
    assert "corpus speculative" not in report["results"] and "confidence speculative" not in report["results"]
    assert report["drafter_choice"]["decode"] == "plain" and report["drafter_choice"]["pays"] is False
