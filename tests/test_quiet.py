"""A quiet terminal: the Java PTB tokenizer's and DeepSpeed's chatter stays off stderr/stdout
unless --debug (EARLYEXIT_DEBUG=1 for library use) asks for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from earlyexit.util.quiet import quiet_libraries

java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")


def _tokenize_and_capture(capfd, debug: bool) -> str:
    from earlyexit.metrics.caption import _tokenize

    with quiet_libraries(debug=debug):
        tokenized = _tokenize({1: ["A red circle."], 2: ["two blue squares"]})
    assert tokenized == {1: ["a red circle"], 2: ["two blue squares"]}
    return capfd.readouterr().err


@java
def test_scoring_prints_no_tokenizer_line(capfd):
    assert "PTBTokenizer" not in _tokenize_and_capture(capfd, debug=False)


@java
def test_debug_shows_the_tokenizer_line(capfd):  # the silenced line is real: this test can fail
    assert "PTBTokenizer tokenized" in _tokenize_and_capture(capfd, debug=True)


def _deepspeed_output(debug: bool) -> str:
    pytest.importorskip("deepspeed")
    # what the CLI does before any command imports DeepSpeed (quiet_libraries)
    code = "from earlyexit.util.quiet import quiet_deepspeed; quiet_deepspeed(); import deepspeed, deepspeed.ops"
    env = {**os.environ, "EARLYEXIT_DEBUG": "1" if debug else "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_deepspeed_import_prints_no_accelerator_warning():
    assert "[WARNING]" not in _deepspeed_output(debug=False)


def test_debug_shows_deepspeed_warnings():
    assert "Setting accelerator to CPU" in _deepspeed_output(debug=True)
