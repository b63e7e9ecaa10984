"""What a result was measured with: versions, git revision, date and threads."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch
import transformers

import earlyexit


def provenance() -> dict:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                  timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {"earlyexit": earlyexit.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_revision": revision,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads()}
