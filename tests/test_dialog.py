"""VisDial ranking: forced option tokens, scores equal to a teacher-forced forward (full depth, or
read out at the exit the strategy takes), ranks and MRR as computed by hand, refusals before work."""

import math
import os
import pathlib

import pytest
import torch
from helpers import make_backend

from earlyexit.cli import main
from earlyexit.core.engine import EarlyExitForCausalLM
from earlyexit.data.prompts import dialog_prompt
from earlyexit.data.visdial import load_visdial
from earlyexit.evaluation.common import EvalSettings
from earlyexit.evaluation.dialog import ForcedOptions, option_scores
from earlyexit.evaluation.evaluate import evaluate

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "visdial"


@pytest.fixture(scope="module")
def dialogs():
    return load_visdial(FIXTURES / "visdial_1.0_val.json", FIXTURES / "VisualDialog_val2018", "val")


@pytest.fixture(scope="module")
def backend():
    return make_backend(seed=21, num_layers=4, words=["yes", "no", "dog", "white", "two", "it", "is", "sunny", "a",
                                                      "on", "lawn", "photo", "how", "many", "people", "what"])


def test_forced_options_force_each_row_and_add_up_the_log_probabilities():
    forcing = ForcedOptions([[1, 2], [0]], filler=2)
    scores = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    step0 = forcing(torch.zeros(2, 3, dtype=torch.long), scores)
    assert step0.argmax(-1).tolist() == [1, 0] and torch.isinf(step0).sum() == 4
    forcing(torch.zeros(2, 4, dtype=torch.long), torch.tensor([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]))
    log_z0 = math.log(1 + math.e + math.e ** 2)
    first = (1.0 - log_z0) + math.log(1 / 3)  # token 1 at step 0, then token 2 among three equal scores
    second = 3.0 - math.log(math.e ** 3 + 2)  # one token; its row is ignored at step 1
    assert forcing.mean_log_probability() == pytest.approx([first / 2, second])


def test_prompt_holds_caption_history_and_question(dialogs):
    second_round = dialogs[1]
    prompt = dialog_prompt(second_round)
    assert prompt.startswith("a dog on a lawn. Question: is it a photo? Answer: ")
    assert prompt.endswith(f"Question: {second_round.question} Answer:")
    assert dialog_prompt(second_round, rounds=0) == f"a dog on a lawn. Question: {second_round.question} Answer:"


def teacher_forced_mean_log_probability(backend, image, prompt, option, exit_layer=None):
    """One plain forward over prompt + option + end-of-sequence; with `exit_layer`, every option
    token after the first is read out at that layer (the first comes from the full-depth prompt pass)."""
    tokenizer = backend.processor.tokenizer
    eos = backend.language_model.generation_config.eos_token_id
    target = tokenizer(" " + option, add_special_tokens=False)["input_ids"] + [eos]
    inputs = backend.prepare_inputs([image], [prompt])
    ids = torch.cat([inputs["input_ids"], torch.tensor([target[:-1]], dtype=torch.long)], 1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        embeds = backend.decoder_inputs_embeds(inputs["pixel_values"], ids)
        out = backend.language_model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    start = inputs["input_ids"].shape[1] - 1  # the position whose logits predict the first option token
    logits = out.logits[0, start:]
    if exit_layer is not None:
        logits = torch.cat([logits[:1], backend.logits(out.hidden_states[exit_layer][0, start + 1:])])
    chosen = logits.log_softmax(-1).gather(1, torch.tensor(target)[:, None])
    return chosen.mean().item()


def test_full_model_scores_are_the_teacher_forced_likelihoods(backend, dialogs):
    sample = dialogs[1]
    image, prompt, options = sample.load_image(), dialog_prompt(sample), sample.extra["options"][:12]
    model = EarlyExitForCausalLM(backend, None)
    scores, work = option_scores(model.generate, backend, image, prompt, options)
    expected = [teacher_forced_mean_log_probability(backend, image, prompt, o) for o in options]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert work["rows"] == 12 and work["tokens"] > 12 and work["seconds"] > work["prompt_seconds"] > 0


def test_early_exit_scores_are_read_out_at_the_exit_taken(backend, dialogs, registry):
    sample = dialogs[0]
    image, prompt, options = sample.load_image(), dialog_prompt(sample), ["a white dog", "yes", "it is sunny"]
    fixed = registry.strategy("fixed")
    model = EarlyExitForCausalLM(backend, fixed(backend, [2], fixed.Config()))
    scores, _ = option_scores(model.generate, backend, image, prompt, options)
    expected = [teacher_forced_mean_log_probability(backend, image, prompt, o, exit_layer=2) for o in options]
    assert scores == pytest.approx(expected, abs=1e-4)
    full = [teacher_forced_mean_log_probability(backend, image, prompt, o) for o in options]
    assert max(abs(a - b) for a, b in zip(scores, full)) > 1e-3  # the exit really changed the scores


def test_ranks_and_mrr_are_the_hand_computed_ones(backend, dialogs):
    result = evaluate(backend, None, dialogs, EvalSettings(progress=False))
    for sample in dialogs:
        image, options = sample.load_image(), sample.extra["options"]
        scores = [teacher_forced_mean_log_probability(backend, image, dialog_prompt(sample), o) for o in options]
        truth = scores[sample.extra["gt_index"]]
        # by hand: 1 + options scored higher + options tied with it (pessimistic), with a tolerance
        # for the two code paths' float noise
        better = sum(s > truth + 1e-4 for s in scores)
        tied = sum(abs(s - truth) <= 1e-4 for s in scores) - 1
        assert better + 1 <= result["ranks"][sample.id] <= better + tied + 1, sample.id
    ranks = [result["ranks"][s.id] for s in dialogs]
    quality = result["quality"]
    assert quality["MRR"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks))
    assert quality["R@10"] == sum(r <= 10 for r in ranks) / len(ranks)
    assert quality["mean_rank"] == sum(ranks) / len(ranks) and quality["rounds"] == 4
    assert set(result["exit_layer_histogram"]) == {4} and result["speed"]["tokens"] > 0


def test_eval_command_scores_visdial(backend, tmp_path, capsys):
    backend.save_pretrained(str(tmp_path / "model"))
    code = main(["eval", "--backend", "blip2-opt", "--model", str(tmp_path / "model"), "--data", f"visdial:{FIXTURES}",
                 "--split", "val", "--strategy", "confidence", "--threshold", "0.2", "--exit-layers", "1,2"])
    out = capsys.readouterr().out
    assert code == 0 and "MRR" in out and "R@10" in out and "mean_rank" in out and "wall" in out


@pytest.mark.parametrize("extra,fragment", [
    (["--split", "test"], "use --split val"),
    (["--split", "val", "--strategy", "confidence", "--decode", "speculative"], "drop --decode speculative"),
    (["--split", "val", "--num-beams", "2"], "drop --num-beams"),
])
def test_what_ranking_cannot_do_is_refused_before_any_work(backend, tmp_path, capsys, extra, fragment):
    backend.save_pretrained(str(tmp_path / "model"))
    code = main(["eval", "--backend", "blip2-opt", "--model", str(tmp_path / "model"), "--data",
                 f"visdial:{FIXTURES}", *extra])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1 and "rank visdial" not in err


# -- `earlyexit run` on VisDial: exits train on val's first 80 %, the knob is calibrated on the next
# 10 % by MRR, the last 10 % is ranked ---------------------------------------------------------------

def visdial_layout(folder: pathlib.Path, dialogs: int = 10) -> pathlib.Path:
    """The fixture's val dialogs repeated under new image ids (2 rounds each): enough rounds for
    three disjoint val slices."""
    import json
    import shutil

    source = json.loads((FIXTURES / "visdial_1.0_val.json").read_text())
    originals = source["data"]["dialogs"]
    images = folder / "VisualDialog_val2018"
    images.mkdir(parents=True)
    copies = []
    for k in range(dialogs):
        original = originals[k % len(originals)]
        image_id = 1000 + k
        shutil.copy(FIXTURES / "VisualDialog_val2018" / f"VisualDialog_val2018_{original['image_id']:012d}.jpg",
                    images / f"VisualDialog_val2018_{image_id:012d}.jpg")
        copies.append({**original, "image_id": image_id})
    source["data"]["dialogs"] = copies
    (folder / "visdial_1.0_val.json").write_text(json.dumps(source))
    return folder


@pytest.fixture(scope="module")
def visdial_run(backend, tmp_path_factory):
    root = tmp_path_factory.mktemp("visdial-run")
    backend.save_pretrained(str(root / "model"))
    return root / "model", visdial_layout(root / "visdial")


def test_val_slices_are_disjoint_dialogs(visdial_run):
    from earlyexit.data.splits import load_split, splits_for

    _, data = visdial_run
    slices = [load_split(f"visdial:{data}", split, None) for split in splits_for(f"visdial:{data}")]
    assert [len(s) for s in slices] == [16, 2, 2]
    images = [{s.extra["image_id"] for s in part} for part in slices]
    assert not images[0] & images[1] and not images[1] & images[2] and not images[0] & images[2]
    # a cut inside a dialog moves to the next dialog's first round
    assert [len(load_split(f"visdial:{data}", split, None)) for split in ("val:0.0-0.45", "val:0.45-1.0")] == [10, 10]


def run_visdial(model, data, output, strategy, *extra):
    import json

    argv = ["run", "--backend", "blip2-opt", "--strategy", strategy, "--model", str(model), "--data", f"visdial:{data}",
            "--exit-layers", "1,2", "--gate", "none", "--rule", "best", "--output", str(output / "runs"),
            "--json", str(output / "run.json"), *extra]
    assert main(argv) == 0
    return json.loads((output / "run.json").read_text())


def check_calibrated_by_dev_mrr_and_scored_by_ranking(report, strategy, data):
    """Each calibration point's quality is the dev slice's MRR at that knob; the knob is the best
    one; the test MRR is `evaluate`'s at that knob and the mean reciprocal of its ranks."""
    from earlyexit.data.splits import load_split

    dev = load_split(f"visdial:{data}", "val:0.8-0.9", None)
    test = load_split(f"visdial:{data}", "val:0.9-1.0", None)
    settings = EvalSettings(progress=False, measure_wall=False)
    backend = strategy.backend
    points = report["calibration"]["points"]
    for point in points:
        strategy.set_knob(point["threshold"])
        assert point["quality"] == pytest.approx(evaluate(backend, strategy, dev, settings)["quality"]["MRR"])
    assert report["calibration"]["full_quality"] == pytest.approx(
        evaluate(backend, None, dev, settings)["quality"]["MRR"])
    best = max(points, key=lambda p: (p["quality"], p["layer_speedup"]))
    assert report["threshold"] == best["threshold"]
    strategy.set_knob(report["threshold"])
    expected = evaluate(backend, strategy, test, settings)
    result = report["results"][report["strategy_label"]]
    assert result["config"]["split"] == "val:0.9-1.0" and result["quality"]["rounds"] == 2
    assert result["quality"]["MRR"] == pytest.approx(expected["quality"]["MRR"])
    assert result["ranks"] == expected["ranks"]
    assert result["quality"]["MRR"] == pytest.approx(sum(1 / r for r in result["ranks"].values()) / 2)
    assert not any(name.endswith("speculative") for name in report["results"]) and report["mid_crisis"] is None


def test_run_calibrates_confidence_by_dev_mrr_and_ranks_the_test_slice(backend, visdial_run, registry, tmp_path,
                                                                       capsys):
    model, data = visdial_run
    report = run_visdial(model, data, tmp_path, "confidence", "--grid", "0.05,0.3,0.9")
    captured = capsys.readouterr()
    assert "MRR" in captured.out and "ranked first" in captured.out and "no self-speculative row" in captured.err
    confidence = registry.strategy("confidence")
    strategy = confidence(backend, [1, 2], confidence.Config())
    check_calibrated_by_dev_mrr_and_scored_by_ranking(report, strategy, data)
    assert len({p["quality"] for p in report["calibration"]["points"]}) > 1  # the knob changes the ranking


def test_run_trains_unsupervised_free_exits_and_ranks_with_them(backend, visdial_run, registry, tmp_path):
    from earlyexit.models.adapters import load_exits

    model, data = visdial_run
    report = run_visdial(model, data, tmp_path, "free", "--grid", "0.2,0.9", "--option", "mode=distill",
                         "--option", "epochs=1", "--option", "batch_size=4")
    assert report["strategy_config"]["mode"] == "distill" and set(report["results"]) == {"full", "free", "confidence"}
    folder = max((p for p in (pathlib.Path(os.environ["EARLYEXIT_CACHE"]) / "exits").iterdir()
                  if "-free-" in p.name), key=lambda p: p.stat().st_mtime)
    strategy = load_exits(str(folder), backend, registry)
    check_calibrated_by_dev_mrr_and_scored_by_ranking(report, strategy, data)


@pytest.mark.parametrize("extra,fragment", [
    (["--num-beams", "2"], "drop --num-beams"),
    (["--draft-exit", "1"], "drop --draft-exit"),
    (["--exit-vocabulary", "8"], "ranks candidate answers over the whole vocabulary"),
])
def test_run_refuses_decoding_options_on_visdial(visdial_run, tmp_path, capsys, extra, fragment):
    model, data = visdial_run
    code = main(["run", "--backend", "blip2-opt", "--strategy", "confidence", "--model", str(model),
                 "--data", f"visdial:{data}", "--output", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
