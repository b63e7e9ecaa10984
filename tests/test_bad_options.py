"""Bad strategy options and gate numbers through the CLI, in this process: each must exit 2 with
exactly one line on stderr that names the problem, never a traceback, and nothing may train or load
(`run`'s pipeline and the backbone's loading are replaced by a marker that fails the case).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import make_backend
from PIL import Image
from test_bad_inputs import assert_one_clean_line, call


class WorkStarted(BaseException):
    """Raised where work would start: a BaseException, so no handler hides it."""


def work_starts(*args, **kwargs):
    raise WorkStarted


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-options")
    make_backend(seed=3, num_layers=4).save_pretrained(str(root / "model"))
    Image.fromarray(np.full((20, 20, 3), 120, dtype=np.uint8)).save(root / "image.png")
    return str(root / "model")


@pytest.fixture
def no_work(monkeypatch):
    from earlyexit.backends.blip2_opt import Blip2OptBackend
    from earlyexit.pipeline import run as pipeline_run

    monkeypatch.setattr(pipeline_run, "run", work_starts)  # the CLI imports it at call time
    monkeypatch.setattr(Blip2OptBackend, "from_pretrained", classmethod(work_starts))


def run(model, tmp, *extra, strategy="free"):
    return ["run", "--backend", "blip2-opt", "--strategy", strategy, "--model", model, "--test-limit", "2",
            "--dev-limit", "2", "--output", str(tmp / "runs"), *extra]


def generate(model, tmp, *extra):
    image = os.path.join(os.path.dirname(model), "image.png")
    return ["generate", "--backend", "blip2-opt", "--model", model, "--image", image,
            "--max-new-tokens", "2", *extra]


def evaluate(model, tmp, *extra):
    return ["eval", "--backend", "blip2-opt", "--model", model, "--data", "scenes", "--split", "dev", "--limit", "2",
            *extra]


# (case id, argv from the model folder and a scratch folder, a fragment the one line must contain)
CASES = [
    # -- strategy options: NaN, inf, negative, wrong type ---------------------------------------------
    ("run/epochs inf", lambda m, t: run(m, t, "--option", "epochs=inf"), "epochs must be a number in [0, inf)"),
    ("run/epochs nan", lambda m, t: run(m, t, "--option", "epochs=nan"), "epochs must be a number in [0, inf)"),
    ("run/learning rate inf", lambda m, t: run(m, t, "--option", "learning_rate=inf"), "learning_rate must be"),
    ("run/adversarial weight nan", lambda m, t: run(m, t, "--option", "adversarial_weight=nan"),
     "adversarial_weight must be"),
    ("run/classifier width negative", lambda m, t: run(m, t, "--option", "classifier_width=-1"),
     "classifier_width must be a number in [0, inf)"),
    ("run/integer option negative", lambda m, t: run(m, t, "--option", "capfilt_samples=-2"),
     "capfilt_samples must be an integer >= 0"),
    ("run/integer option a fraction", lambda m, t: run(m, t, "--option", "capfilt_keep=1.5"),
     "capfilt_keep expects a int"),
    ("run/bool option a word", lambda m, t: run(m, t, "--option", "adversarial=often"), "bad --option"),
    ("run/option of another strategy", lambda m, t: run(m, t, "--option", "every=2"), "bad --option 'every=2'"),
    ("run/patience negative", lambda m, t: run(m, t, "--option", "patience=-1", strategy="pabee"),
     "patience must be an integer >= 0"),
    ("run/threshold inf", lambda m, t: run(m, t, "--threshold", "inf", strategy="confidence"),
     "--threshold Infinity: must be a number in [0, inf)"),
    ("run/grid with NaN", lambda m, t: run(m, t, "--grid", "0.5,nan", strategy="confidence"),
     "--grid [0.5, NaN]: must be a non-empty list of numbers"),
    # -- gate numbers ------------------------------------------------------------------------------------
    ("run/gate mode without a gate", lambda m, t: run(m, t, "--gate", "none", "--gate-mode", "replace"),
     "--gate-mode needs a gate"),
    ("run/cosine gate threshold nan", lambda m, t: run(m, t, "--gate", "cosine", "--gate-threshold", "nan"),
     "cosine gate's threshold must be a number in [-1, 1]"),
    ("run/cosine gate threshold below -1", lambda m, t: run(m, t, "--gate", "cosine", "--gate-threshold", "-3"),
     "cosine gate's threshold must be a number in [-1, 1]"),
    ("run/learned gate threshold 2", lambda m, t: run(m, t, "--gate-threshold", "2"),
     "learned gate's threshold must be a number in [0, 1]"),
    ("run/learned gate threshold nan", lambda m, t: run(m, t, "--gate-threshold", "nan"),
     "learned gate's threshold must be a number in [0, 1]"),
    ("generate/gate mode without a gate", lambda m, t: generate(m, t, "--strategy", "confidence", "--gate-mode",
                                                                "replace"), "--gate-mode needs a --gate"),
    ("generate/cosine gate threshold nan", lambda m, t: generate(m, t, "--strategy", "confidence", "--gate", "cosine",
                                                                 "--gate-threshold", "nan"),
     "cosine gate's threshold must be"),
    ("generate/learned gate threshold 2", lambda m, t: generate(m, t, "--strategy", "confidence", "--gate",
                                                                f"learned:{t}", "--gate-threshold", "2"),
     "learned gate's threshold must be a number in [0, 1]"),
    ("generate/option inf", lambda m, t: generate(m, t, "--strategy", "free", "--option", "adversarial_weight=inf"),
     "adversarial_weight must be"),
    # -- drafters -----------------------------------------------------------------------------------------
    ("run/unknown drafter", lambda m, t: run(m, t, "--drafter", "corpuss"), "Did you mean 'corpus'"),
    ("run/drafter option of no drafter", lambda m, t: run(m, t, "--drafter", "corpus", "--drafter-option", "every=2"),
     "bad --drafter-option 'every=2'"),
    ("run/drafter stop_below above 1", lambda m, t: run(m, t, "--drafter", "corpus", "--drafter-option",
                                                        "stop_below=2"), "stop_below is a probability in [0, 1]"),
    ("run/drafter length nan", lambda m, t: run(m, t, "--drafter", "corpus", "--drafter-option", "max_match=nan"),
     "max_match expects a int"),
    ("run/drafter option without a drafter", lambda m, t: run(m, t, "--drafter-option", "draft_length=2"),
     "--drafter-option needs a --drafter"),
    ("run/drafter without its row", lambda m, t: run(m, t, "--drafter", "corpus", "--no-speculative"),
     "drop --no-speculative or --drafter"),
    ("run/draft anyway without a drafter", lambda m, t: run(m, t, "--draft-anyway"),
     "--draft-anyway decodes a drafter's row; add --drafter"),
    ("run/feature drafter on T5", lambda m, t: run(m, t, "--drafter", "hybrid", "--backend", "blip2-flant5"),
     "--drafter hybrid needs a decoder-only backbone (blip2-flant5 is an encoder-decoder)"),
    ("run/feature drafter vocabulary 0", lambda m, t: run(m, t, "--drafter", "feature", "--drafter-option",
                                                          "vocabulary=0"), "vocabulary must be at least 1"),
    ("run/hybrid drafter learning rate nan", lambda m, t: run(m, t, "--drafter", "hybrid", "--drafter-option",
                                                              "learning_rate=nan"), "learning_rate"),
    ("generate/drafter without a folder", lambda m, t: generate(m, t, "--decode", "speculative", "--drafter",
                                                                "corpus"), "pass --drafter corpus:FOLDER"),
    ("generate/drafter folder without a config", lambda m, t: generate(m, t, "--decode", "speculative",
                                                                       "--drafter", f"corpus:{t}"),
     "holds no drafter_config.json"),
    ("generate/drafter without speculative", lambda m, t: generate(m, t, "--drafter", f"corpus:{t}"),
     "add --decode speculative"),
    ("eval/the exits as a drafter", lambda m, t: evaluate(m, t, "--decode", "speculative", "--drafter", "exits"),
     "drop --drafter and pass --strategy"),
    ("eval/unknown drafter", lambda m, t: evaluate(m, t, "--decode", "speculative", "--drafter", "corpuss:x"),
     "Did you mean 'corpus'"),
    ("eval/learned gate threshold nan", lambda m, t: evaluate(m, t, "--strategy", "confidence", "--gate",
                                                              f"learned:{t}", "--gate-threshold", "nan"),
     "learned gate's threshold must be"),
]


@pytest.mark.parametrize("case,build,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_option_is_one_line_and_exit_2(model, tmp_path, capsys, no_work, case, build, fragment):
    code, _ = call(build(model, tmp_path))  # WorkStarted fails the case
    err = capsys.readouterr().err
    assert_one_clean_line(code, err, fragment)
    assert not (tmp_path / "runs").exists()


def test_good_options_reach_the_work(model, tmp_path, no_work):
    """The cases' base commands are fine: each case fails for its one change."""
    with pytest.raises(WorkStarted):
        call(run(model, tmp_path, "--option", "epochs=1", "--option", "classifier_width=0.5", "--gate", "cosine",
                 "--gate-threshold", "-0.5", "--gate-mode", "replace"))


def test_configs_check_their_fields_whoever_builds_them():
    """Not only the CLI: a config built in code (a plugin, a bench spec) refuses inf, NaN, negatives
    and wrong types too, before anything trains."""
    from earlyexit.errors import ConfigError
    from earlyexit.plugins.registry import get_registry

    free = get_registry(load_entrypoints=False).strategy("free")
    for bad in ({"epochs": float("inf")}, {"adversarial_weight": float("nan")}, {"classifier_width": -1},
                {"adversarial": "yes"}, {"batch_size": "4"}):
        with pytest.raises(ConfigError):
            free.Config(**bad)
