"""The prepared GPU check runs its Python parts on the CPU too, and refuses cleanly without a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


def test_agreement_counts_identical_tokens_of_engine_and_generate():
    rows = gpu_check.agreement("cpu", batch=2, new_tokens=4, shape=dict(num_layers=2, hidden_size=64, num_heads=4))
    float32 = next(r for r in rows if r["dtype"] == "float32")
    assert float32 == {"dtype": "float32", "device": "cpu", "batch": 2, "new_tokens": 4, "positions_identical": 1.0,
                       "rows_identical": 2, "mean_agreed_prefix": 4.0}


def test_collect_gathers_each_steps_status_result_and_time(tmp_path):
    (tmp_path / "speed.rc").write_text("0\n")
    (tmp_path / "speed.json").write_text(json.dumps({"rows": [1]}))
    (tmp_path / "speed.seconds").write_text("12.5\n")
    (tmp_path / "zero.rc").write_text("124\n")
    (tmp_path / "zero.log").write_text("x" * 5000)
    steps = gpu_check.collect(str(tmp_path))
    assert steps["speed"] == {"exit_status": 0, "passed": True, "result": {"rows": [1]}, "seconds": 12.5}
    assert steps["zero"]["passed"] is False and len(steps["zero"]["log_tail"]) == 4000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_script_refuses_in_one_line_without_a_gpu_or_without_torch(tmp_path):
    script = [os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(tmp_path / "out.json")]
    venv = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(["bash", *script], cwd=ROOT, capture_output=True, text=True, env=venv)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["gpu_check: no CUDA GPU is visible here; run it on a GPU machine"]
    (tmp_path / "bin").mkdir()  # a `python` that cannot import torch, first on the PATH
    (tmp_path / "bin" / "python").write_text("#!/bin/sh\necho \"No module named 'torch'\" >&2\nexit 1\n")
    (tmp_path / "bin" / "python").chmod(0o755)
    bare = {**os.environ, "PATH": str(tmp_path / "bin") + os.pathsep + "/usr/bin:/bin"}
    result = subprocess.run(["bash", *script], cwd=ROOT, capture_output=True, text=True, env=bare)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot import torch; activate the project's environment" in result.stderr
    assert not (tmp_path / "out.json").exists()
