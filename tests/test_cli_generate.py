"""`earlyexit generate`: output, error paths, and a third-party plugin used end to end."""

import json

import pytest
import torch
from helpers import make_backend, make_images

from earlyexit.cli import main
from earlyexit.core.engine import EarlyExitForCausalLM

THIRD_PARTY = """
    import torch
    from earlyexit import hookimpl
    from earlyexit.backends.blip2_opt import Blip2OptBackend
    from earlyexit.strategy import Strategy

    class FirstExit(Strategy):
        name = "first-exit"
        description = "leaves at the first exit, always"

        def should_exit(self, exit_index, view, context):
            return torch.ones(view.hidden.shape[0], dtype=torch.bool)

    class MyBlip2(Blip2OptBackend):
        name = "my-blip2"
        description = "a third-party backend"

    @hookimpl
    def earlyexit_register_strategies():
        return [FirstExit]

    @hookimpl
    def earlyexit_register_backends():
        return [MyBlip2]
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_backend(seed=5, num_layers=6).save_pretrained(str(folder / "model"))
    make_images(1, seed=6)[0].save(folder / "image.png")
    return folder


def run_json(capsys, *argv):
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_matches_library(capsys, model_dir, registry):
    model_path, image = str(model_dir / "model"), str(model_dir / "image.png")
    result = run_json(capsys, "generate", "--backend", "blip2-opt", "--model", model_path, "--image", image,
                      "--prompt", "a red", "--strategy", "fixed", "--exit-layers", "2", "--option", "every=2",
                      "--max-new-tokens", "6")
    # the same generation through the library
    backend = registry.backend("blip2-opt").from_pretrained(model_path)
    strategy = registry.strategy("fixed")(backend, [2], registry.strategy("fixed").Config(every=2))
    model = EarlyExitForCausalLM(backend, strategy)
    inputs = backend.prepare_inputs(make_images(1, seed=6), ["a red"])
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = backend.language_model.generation_config.eos_token_id
    expected = expected[:expected.index(eos) + 1] if eos in expected else expected  # nothing after the end
    length = len(result["token_ids"])
    assert length >= 1 and result["token_ids"] == expected
    assert result["exit_layers"] == [6, 6, 2, 6, 2, 6][:length]  # the first token: prompt pass, full depth
    assert len(result["exit_layers"]) == length and result["num_layers"] == 6
    assert set(result) >= {"text", "token_ids", "exit_layers"}


def test_generate_without_strategy_goes_full_depth(capsys, model_dir):
    result = run_json(capsys, "generate", "--backend", "blip2-opt", "--model", str(model_dir / "model"),
                      "--image", str(model_dir / "image.png"), "--max-new-tokens", "4", "--num-beams", "2")
    assert result["exit_layers"] and set(result["exit_layers"]) == {6}


def test_generate_text_output_marks_exit_layers(capsys, model_dir):
    code = main(["generate", "--backend", "blip2-opt", "--model", str(model_dir / "model"), "--image",
                 str(model_dir / "image.png"), "--strategy", "fixed", "--exit-layers", "3", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[3]" in out and "param" in out and "layer" in out


ERRORS = [
    (["--backend", "blip2-opx"], "Did you mean 'blip2-opt'"),
    (["--strategy", "confidense"], "Did you mean 'confidence'"),
    (["--image", "missing.png"], "does not exist"),
    (["--exit-layers", "2,9"], "out of range"),
    (["--strategy", "fixed", "--threshold", "0.5"], "has no threshold"),
    (["--strategy", "fixed", "--exit-layers", "2,4"], "exactly one layer"),
    (["--strategy", "fixed", "--option", "every=0"], "positive integer"),
    (["--strategy", "fixed", "--option", "bogus=1"], "bad --option"),
    (["--threshold", "0.5"], "need a --strategy"),
    (["--model", "./no/such/folder"], "does not exist"),
]


@pytest.mark.parametrize("change,message", ERRORS, ids=[m for _, m in ERRORS])
def test_user_mistakes_are_one_line_and_exit_2(capsys, model_dir, change, message):
    args = {"--backend": "blip2-opt", "--model": str(model_dir / "model"), "--image": str(model_dir / "image.png"),
            "--strategy": "confidence"}
    extra = []
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[change[i]] = change[i + 1]
        else:
            extra += change[i:i + 2]
    if change == ["--threshold", "0.5"]:
        del args["--strategy"]
    argv = ["generate"] + [x for kv in args.items() for x in kv] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_values_rejected_by_argparse(capsys, model_dir):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--backend", "blip2-opt", "--model", "x", "--image", "y", "--max-new-tokens", "0"])
    assert exit_info.value.code == 2


def test_debug_shows_traceback(capsys, model_dir):
    assert main(["generate", "--backend", "blip2-opt", "--model", str(model_dir / "model"),
                 "--image", "missing.png", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_hub_id_offline_says_so(capsys, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--backend", "blip2-opt", "--model", "Salesforce/blip2-opt-2.7b",
                 "--image", str(model_dir / "image.png")]) == 2
    err = capsys.readouterr().err
    assert "not available offline" in err and "local folder" in err


def test_third_party_plugin_is_listed_and_generates(capsys, model_dir, install_distribution):
    install_distribution("earlyexit-firstexit", {"ee_firstexit": THIRD_PARTY}, {"firstexit": "ee_firstexit"})
    entries = run_json(capsys, "list")
    mine = {(e["name"], e["kind"], e["plugin"]) for e in entries}
    assert ("first-exit", "strategy", "earlyexit-firstexit") in mine
    assert ("my-blip2", "backend", "earlyexit-firstexit") in mine
    result = run_json(capsys, "generate", "--backend", "my-blip2", "--model", str(model_dir / "model"),
                      "--image", str(model_dir / "image.png"), "--strategy", "first-exit",
                      "--exit-layers", "2,4", "--max-new-tokens", "5")
    assert result["backend"] == "my-blip2" and result["strategy"] == "first-exit"
    # the first token comes from the prompt pass at full depth; every later one leaves at 2
    assert result["exit_layers"][0] == 6 and set(result["exit_layers"][1:]) == {2}


def test_tiny_random_needs_no_files(capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).parent.parent)
    result = run_json(capsys, "generate", "--backend", "blip2-opt", "--model", "tiny-random", "--image",
                      "examples/shapes.png", "--strategy", "fixed", "--max-new-tokens", "3")
    assert result["num_layers"] == 12 and result["exit_layers"][:2] == [12, 6]


@pytest.mark.parametrize("argv,message", [
    (["run", "--backend", "blip2-opt", "--strategy", "free", "--json", "/proc/nope/run.json"], "not writable"),
    (["run", "--backend", "blip2-opt", "--strategy", "free", "--output", "README.md"], "is a file"),
    (["run", "--backend", "blip2-opt", "--strategy", "free", "--json", "benchmarks"], "is a folder"),
    (["run", "--backend", "blip2-opt", "--strategy", "free", "--threshold", "-1"], "the threshold must be >= 0"),
    (["eval", "--backend", "blip2-opt", "--model", "tiny-random", "--data", "scenes", "--noise", "nan"], "--noise"),
    (["train", "backbone", "--backend", "blip2-opt", "--model", "tiny-random", "--data", "scenes",
      "--output", "README.md"], "is a file"),
    (["train", "backbone", "--backend", "blip2-opt", "--model", "tiny-random", "--data", "scenes",
      "--output", "/tmp/ee-lr", "--learning-rate", "nan"], "learning rate"),
])
def test_bad_outputs_and_values_fail_before_any_work(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).parent.parent)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_exit_layers_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--backend", "blip2-opt", "--model", "tiny-random", "--image", "x.png",
              "--exit-layers", ""])
    assert exit_info.value.code == 2 and "3,6,9" in capsys.readouterr().err


def test_generation_beyond_the_context_is_refused_before_generating(capsys):
    import pathlib

    root = pathlib.Path(__file__).parent.parent
    code = main(["generate", "--backend", "blip2-opt", "--model", "tiny-random", "--image",
                 str(root / "examples" / "shapes.png"), "--max-new-tokens", "5000"])
    err = capsys.readouterr().err
    assert code == 2 and "exceeds the model's context" in err and len(err.strip().splitlines()) == 1


def test_beams_that_cannot_fit_in_memory_are_refused_before_generating(capsys):
    import pathlib

    root = pathlib.Path(__file__).parent.parent
    code = main(["generate", "--backend", "blip2-opt", "--model", "tiny-random", "--image",
                 str(root / "examples" / "shapes.png"), "--num-beams", "100000000", "--max-new-tokens", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "lower --num-beams" in err and len(err.strip().splitlines()) == 1


def test_generate_with_trained_exits_from_a_folder(capsys, model_dir, registry):
    """--exits: strategy, exit layers and config come from the adapter; --threshold overrides."""
    from earlyexit.models.adapters import save_exits

    backend = registry.backend("blip2-opt").from_pretrained(str(model_dir / "model"))
    free = registry.strategy("free")
    save_exits(free(backend, [2, 4], free.Config(threshold=0.7)), str(model_dir / "exits"))
    result = run_json(capsys, "generate", "--backend", "blip2-opt", "--model", str(model_dir / "model"),
                      "--image", str(model_dir / "image.png"), "--exits", str(model_dir / "exits"),
                      "--threshold", "0.01", "--max-new-tokens", "4")
    assert result["strategy"] == "free" and result["exit_layer_choices"] == [2, 4]
    assert result["strategy_config"]["threshold"] == 0.01
    assert set(result["exit_layers"][1:]) <= {2, 4, 6}
