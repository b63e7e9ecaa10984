"""`earlyexit list`, `--help`, and the CLI's error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from earlyexit import cli
from earlyexit.cli import main
from earlyexit.errors import ConfigError
from earlyexit.plugins.registry import BUILTIN_SOURCE, DISABLE_AUTOLOAD_ENV


@pytest.fixture(autouse=True)
def builtins_only(monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")


def test_list_prints_a_table_with_one_row_per_entry(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["NAME", "KIND", "PLUGIN", "DESCRIPTION"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert {"blip2-opt", "confidence", "fixed"} <= set(rows)
    assert rows["fixed"].split()[1] == "strategy"
    assert rows["blip2-opt"].split()[1] == "backend"
    assert BUILTIN_SOURCE in rows["fixed"]
    # Columns line up: every row's kind starts where the header's KIND does.
    kind_column = lines[0].index("KIND")
    assert all(line[kind_column:].startswith(("backend", "strategy", "drafter")) for line in lines[1:])
    assert rows["corpus"].split()[1] == "drafter"


@pytest.mark.parametrize("name, family", [
    ("blip2-opt", ("BLIP-2", "OPT")), ("blip2-flant5", ("BLIP-2", "FlanT5")),
    ("instructblip-vicuna", ("InstructBLIP", "Llama")), ("instructblip-flant5", ("InstructBLIP", "FlanT5")),
    ("minigpt4-llama", ("MiniGPT-4", "Llama")),
])
def test_list_names_each_backends_family(capsys, name, family):
    assert main(["list", "--json"]) == 0
    entry = next(e for e in json.loads(capsys.readouterr().out) if e["name"] == name)
    assert entry["kind"] == "backend" and all(word in entry["description"] for word in family)


@pytest.mark.parametrize("backend", ["blip2-flant5", "instructblip-vicuna", "instructblip-flant5", "minigpt4-llama"])
def test_an_embedded_model_asked_of_another_backend_is_one_line(backend, capsys, tmp_path):
    # never a hub lookup for the name `tiny`; no model is built
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["generate", "--backend", backend, "--model", "tiny", "--image", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "runs on --backend blip2-opt, not " + backend in err


def test_list_json_has_exactly_the_documented_keys(capsys):
    assert main(["list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries and all(set(e) == {"name", "kind", "plugin", "description"} for e in entries)
    assert {e["kind"] for e in entries} == {"backend", "strategy", "drafter"}
    assert {"name": "fixed", "kind": "strategy", "plugin": BUILTIN_SOURCE}.items() <= next(
        e for e in entries if e["name"] == "fixed"
    ).items()


def test_unknown_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["frobnicate"])
    assert excinfo.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_missing_subcommand_exits_2():
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2


def fail_with(error):
    def run(args):
        raise error
    return run


def test_earlyexit_error_prints_one_line_and_its_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(cli.ListCommand, "run", staticmethod(fail_with(ConfigError("bad --threshold; use 0..1"))))
    assert main(["list"]) == 2
    assert capsys.readouterr().err == "error: bad --threshold; use 0..1\n"


def test_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys):
    monkeypatch.setattr(cli.ListCommand, "run", staticmethod(fail_with(ValueError("boom\nsecond line"))))
    assert main(["list"]) == 1
    assert capsys.readouterr().err == (
        "internal error: ValueError: boom (rerun with --debug for the traceback)\n"
    )
    assert main(["--debug", "list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: boom" in err


CHECK_NO_HEAVY_IMPORTS = """
import sys
from earlyexit.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
assert not heavy, f"imported {heavy}"
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["list", "--json"]])
@pytest.mark.parametrize("autoload_disabled", [False, True])
def test_help_and_list_do_not_import_torch(argv, autoload_disabled):
    env = {k: v for k, v in os.environ.items() if k != DISABLE_AUTOLOAD_ENV}
    if autoload_disabled:
        env[DISABLE_AUTOLOAD_ENV] = "1"
    result = subprocess.run(
        [sys.executable, "-c", CHECK_NO_HEAVY_IMPORTS, *argv], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert ("usage: earlyexit" in result.stdout) if argv == ["--help"] else ("fixed" in result.stdout)


def test_list_params_states_each_strategys_parameters_for_the_backbone(capsys):
    import json

    from earlyexit.cli import main

    assert main(["list", "--json", "--params", "blip2-opt:tiny-random"]) == 0
    rows = {e["name"]: e for e in json.loads(capsys.readouterr().out) if e["kind"] == "strategy"}
    assert rows["confidence"]["trainable"] == rows["confidence"]["inference"] == 0
    assert rows["free"]["knob"] == "threshold" and rows["pabee"]["knob"] == "patience"
    assert rows["free"]["trainable"] > rows["free"]["inference"] > 0  # feature classifiers train, then go
    assert rows["deebert"]["trainable"] == rows["deebert"]["inference"] > 0
    assert rows["mue"]["inference"] == 0 < rows["mue"]["trainable"]
    assert main(["list", "--params", "blip2-opt"]) == 2
