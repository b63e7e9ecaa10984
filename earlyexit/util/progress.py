"""Progress bars that give way to errors: a failure clears the bar's line, so the one-line error
is all a user sees on stderr instead of a half-drawn bar glued to it."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bar(**tqdm_arguments):
    from tqdm.auto import tqdm

    bar = tqdm(**tqdm_arguments)
    try:
        yield bar
    except BaseException:
        bar.leave = False  # close() then erases the line instead of ending it with a newline
        raise
    finally:
        bar.close()
