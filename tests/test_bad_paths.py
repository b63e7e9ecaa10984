"""Bad exit folders, output paths and cache locations through the CLI: each exits 2 with exactly
one stderr line naming the problem, no traceback, and no work done (no generation printed, no
model loaded where the check comes before loading, nothing written at the bad path)."""

from __future__ import annotations

import json
import os

import pytest
from test_bad_inputs import (assert_one_clean_line, call, evaluate, generate, run, train,  # noqa: F401
                             world)  # world: a fixture

from earlyexit.models.adapters import CONFIG, WEIGHTS

LONG_NAME = "n" * 300  # over every common file system's 255-byte name limit


@pytest.fixture(scope="module")
def exits(world):  # noqa: F811 - the fixture imported above
    """Adapters cut from the table's good FREE exits: one wrong value or tensor each."""
    from safetensors.torch import load_file, save_file

    good = world["root"] / "exits"
    saved = json.loads((good / CONFIG).read_text())
    tensors = load_file(str(good / WEIGHTS))
    name = sorted(tensors)[0]
    out = {}

    def adapter(key: str, config: dict, weights: dict) -> None:
        folder = world["root"] / f"paths-{key}"
        folder.mkdir()
        (folder / CONFIG).write_text(json.dumps(config))
        save_file(weights, str(folder / WEIGHTS))
        out[key] = str(folder)

    def strategy_config(**values) -> dict:
        return {**saved, "strategy_config": {**saved["strategy_config"], **values}}

    adapter("threshold_string", strategy_config(threshold="high"), tensors)
    adapter("epochs_string", strategy_config(epochs="3"), tensors)
    adapter("batch_float", strategy_config(batch_size=2.5), tensors)
    adapter("flag_string", strategy_config(adversarial="yes"), tensors)
    adapter("threshold_bool", strategy_config(threshold=True), tensors)
    adapter("epochs_zero", strategy_config(epochs=0), tensors)
    adapter("wrong_shape", saved, {**tensors, name: tensors[name].reshape(-1)[:1].clone()})
    adapter("extra_tensor", saved, {**tensors, "bogus.weight": tensors[name].clone()})
    adapter("missing_tensor", saved, {k: v for k, v in tensors.items() if k != name})
    spec = world["root"] / "paths-spec.toml"  # a good bench spec: only its --output is bad
    spec.write_text(BENCH_SPEC.format(model=world["model"]))
    out["spec"] = str(spec)
    return out


BENCH_SPEC = """
name = "paths"
[defaults]
backend = "blip2-opt"
model = "{model}"
exit_layers = [1, 2]
dev_limit = 2
test_limit = 2
grid = [0.5]
batch_size = 2
max_new_tokens = 2
gate = "none"
[strategies]
conf = {{ strategy = "confidence" }}
[tables.t]
data = ["scenes-vqa"]
"""


def ex(key):
    return lambda w, e: generate(w, "--exits", e[key])


# (case id, argv from the world and the adapters, a fragment of the one line, environment to set)
CASES = [
    # -- exit folders: config types and tensor shapes ---------------------------------------------
    ("exits/threshold a string", ex("threshold_string"), 'threshold = "high" must be a number', None),
    ("exits/epochs a string", ex("epochs_string"), 'epochs = "3" must be a number or null', None),
    ("exits/batch size a fraction", ex("batch_float"), "batch_size = 2.5 must be an integer", None),
    ("exits/flag a string", ex("flag_string"), 'adversarial = "yes" must be true or false', None),
    ("exits/threshold a boolean", ex("threshold_bool"), "threshold = true must be a number", None),
    ("exits/epochs out of range", ex("epochs_zero"), "epochs must be positive", None),
    ("exits/tensor of the wrong shape", ex("wrong_shape"), "but the strategy built for this backbone needs", None),
    ("exits/unknown tensor", ex("extra_tensor"), "holds an unknown tensor bogus.weight", None),
    ("exits/missing tensor", ex("missing_tensor"), "exits.safetensors lacks tensor", None),
    # -- output paths: empty, too long, unwritable -------------------------------------------------
    ("paths/eval --json empty", lambda w, e: evaluate(w, "--json", ""), "--json is empty", None),
    ("paths/run --json empty", lambda w, e: run(w, "--json", ""), "--json is empty", None),
    ("paths/run --output empty", lambda w, e: ["run", "--backend", "blip2-opt", "--strategy", "confidence",
                                               "--model", w["model"], "--output", ""], "--output is empty", None),
    ("paths/train --output empty", lambda w, e: train(w, output=""), "--output is empty", None),
    ("paths/eval --json name too long", lambda w, e: evaluate(w, "--json", str(w["root"] / LONG_NAME)),
     "longer than the", None),
    ("paths/eval --json path too long", lambda w, e: evaluate(w, "--json", str(w["root"] / "/".join(["d" * 200] * 25))),
     "the path is", None),
    ("paths/run --output name too long", lambda w, e: run(w, "--output", str(w["root"] / LONG_NAME)),
     "longer than the", None),
    ("paths/train --output name too long", lambda w, e: train(w, output=str(w["root"] / LONG_NAME / "x")),
     "longer than the", None),
    ("paths/bench --output empty", lambda w, e: ["bench", e["spec"], "--output", ""], "--output is empty", None),
    ("paths/bench --output name too long", lambda w, e: ["bench", e["spec"], "--output", str(w["root"] / LONG_NAME)],
     "longer than the", None),
    ("paths/eval --json under a file", lambda w, e: evaluate(w, "--json", os.path.join(w["file"], "r.json")),
     "which is a file", None),
    ("paths/eval --json unwritable", lambda w, e: evaluate(w, "--json", "/proc/earlyexit-test/r.json"),
     "is not writable", None),
    # -- the cache location --------------------------------------------------------------------------
    ("cache/a file", lambda w, e: ["build-tiny"], "EARLYEXIT_CACHE", "file"),
    ("cache/under a file", lambda w, e: ["build-tiny"], "which is a file", "under-file"),
    ("cache/not writable", lambda w, e: ["build-tiny"], "is not writable", "/proc/earlyexit-test/cache"),
    ("cache/empty", lambda w, e: ["build-tiny"], "EARLYEXIT_CACHE is set but empty", ""),
    ("cache/a file, for generate", lambda w, e: generate(w), "set EARLYEXIT_CACHE to a writable folder", "file"),
]


def _id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def _cache_value(w, value: str | None) -> str | None:
    return {"file": w["file"], "under-file": os.path.join(w["file"], "cache")}.get(value, value)


@pytest.mark.parametrize("case,build,fragment,cache", CASES, ids=[_id(c) for c in CASES])
def test_bad_path_is_one_line_exit_2_and_no_work(world, exits, capsys, monkeypatch, case, build, fragment, cache):  # noqa: F811
    import earlyexit.models.loading as loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(world["root"])  # an empty path is the current folder: never the checkout
    if cache is not None:
        monkeypatch.setenv("EARLYEXIT_CACHE", _cache_value(world, cache))
    loads = []
    real_load = loading.load_backend
    monkeypatch.setattr(loading, "load_backend", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    argv = build(world, exits)
    before = set(os.listdir(world["root"]))
    code, _ = call(argv)
    out, err = capsys.readouterr()
    assert_one_clean_line(code, err, fragment)
    assert not out.strip(), out  # no caption, no result
    assert set(os.listdir(world["root"])) <= before  # nothing half-written beside the inputs
    if not case.startswith("exits/"):  # exit folders need the backbone they are checked against
        assert not loads, f"a model was loaded before the refusal: {loads}"


def test_the_table_is_broad():
    assert len(CASES) >= 20
    assert {_id(case).split("/")[0] for case in CASES} == {"exits", "paths", "cache"}


def test_good_exits_still_load(world, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _ = call(generate(world, "--exits", world["exits"]))
    assert code == 0, capsys.readouterr().err
