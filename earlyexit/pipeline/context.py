"""What the steps of a run share: its settings, the registry, the loaded models, the splits,
one voice for logging (rank 0 speaks) and the time each step took."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

from earlyexit.data.tasks import task_of
from earlyexit.evaluation.common import EvalSettings
from earlyexit.pipeline.settings import RunSettings
from earlyexit.plugins.registry import notify


def silent(*args, **kwargs) -> None:
    """The log of ranks other than 0: one voice for the whole run."""


@dataclasses.dataclass
class RunContext:
    settings: RunSettings
    registry: Any
    log: Callable
    main: bool  # rank 0 (or the only process): it logs, writes files and reports
    timings: dict = dataclasses.field(default_factory=dict)
    backend: Any = None
    strategy: Any = None
    train_split: str = ""
    dev: Any = None
    test: Any = None
    evaluation: EvalSettings | None = None

    @property
    def output(self) -> str:
        return os.path.join(self.settings.output, f"{self.settings.backend}-{self.settings.strategy}")

    @property
    def ranking(self) -> bool:
        """VisDial is scored by ranking answer options: nothing is decoded."""
        return task_of(self.dev).ranks or task_of(self.test).ranks

    def on_batch(self, stats: dict) -> None:
        if self.main:
            notify(self.registry, "batch_stats", stats=stats)

    @contextlib.contextmanager
    def timed(self, key: str):
        began = time.perf_counter()
        yield
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - began  # a step may come back
