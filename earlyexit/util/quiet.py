"""A quiet terminal: third-party chatter is silenced unless the user asks for it with --debug.

The user sees progress bars, results and one-line errors. Two libraries talk on their own:
pycocoevalcap's Java PTB tokenizer (`PTBTokenizer tokenized N tokens at ...` on stderr at every
scoring) and DeepSpeed (`[WARNING] ... Setting accelerator to CPU`, INFO lines, through its
"DeepSpeed" logger). Both are dropped by default; `--debug` (or EARLYEXIT_DEBUG=1 for library
use) lets them through. A failure still reaches the user: the tokenizer's callers check its
output, and DeepSpeed's ERROR records pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess

DEEPSPEED_LOGGER = "DeepSpeed"
_state = {"debug": os.environ.get("EARLYEXIT_DEBUG") == "1"}


def debugging() -> bool:
    return _state["debug"]


class _BelowErrorDropped(logging.Filter):
    """Drops a logger's INFO and WARNING records while not debugging (DeepSpeed sets its own
    logger's level at import, so a filter, which it leaves alone, is what holds)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return debugging() or record.levelno >= logging.ERROR


_FILTER = _BelowErrorDropped()


def quiet_deepspeed() -> None:
    """Installs the filter on DeepSpeed's logger (before or after DeepSpeed is imported; idempotent)."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def child_stderr():
    """Where a chatty child process's stderr goes: inherited while debugging, else nowhere."""
    return None if debugging() else subprocess.DEVNULL


class QuietSubprocess:
    """The `subprocess` module for a third-party module that starts a chatty child without
    saying where its stderr goes: `Popen` gets `child_stderr()` unless the caller chose."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 - subprocess's name
        kwargs.setdefault("stderr", child_stderr())
        return subprocess.Popen(*args, **kwargs)


@contextlib.contextmanager
def quiet_libraries(debug: bool = False):
    """For one command: third-party chatter silenced, or shown with `debug` (the CLI's --debug)."""
    previous = _state["debug"]
    _state["debug"] = debug or previous
    quiet_deepspeed()
    try:
        yield
    finally:
        _state["debug"] = previous
