"""Atomic writes: readers see the old result or the complete new one, never a partial one.

`atomic_write` for files, `atomic_folder` for folders (models, adapters, checkpoints); both
write beside the target and rename into place. `check_writable` probes an output location
before any work starts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from earlyexit.errors import ConfigError


@contextlib.contextmanager
def atomic_folder(final: str):
    """Yields a temporary folder beside `final`; on success it replaces `final` in one rename,
    on any error it is removed and `final` is left as it was."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(os.path.abspath(final))}-"
    for name in os.listdir(parent):  # what a killed earlier attempt left behind
        if name.startswith(prefix) and os.path.isdir(os.path.join(parent, name)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    temporary = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield temporary
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs):
    """Yields a file opened (`mode`: "w" or "wb") on a temporary file beside `path`; on success it
    replaces `path` in one rename, on any error it is removed and `path` is left as it was. The
    file gets the permissions an ordinary `open` would give it (0644 under the usual umask), not
    the private 0600 of a temporary file: results are for sharing."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, mode, **open_kwargs) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())  # the rename must not land before the data
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_json_atomically(path: str, payload) -> None:
    with atomic_write(path) as out:
        json.dump(payload, out, indent=2)


def check_writable(path: str, folder: bool = False, option: str = "--output") -> None:
    """Fail before any work when `path` cannot be written (a read-only place, a file where a
    folder must go or the other way round), with a one-line fix."""
    target = os.path.abspath(path)
    if folder and os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(f"{option} {path} is a file, not a folder; pass a folder path")
    if not folder and os.path.isdir(target):
        raise ConfigError(f"{option} {path} is a folder; pass a file path such as {os.path.join(path, 'result.json')}")
    probe = target if folder and os.path.isdir(target) else os.path.dirname(target)
    while not os.path.exists(probe):  # the nearest existing ancestor must let us create the rest
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{option} {path} lies under {probe}, which is a file; pass another path")
    try:  # really try (permission bits say little for root, or on read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".earlyexit-write-check-", dir=probe))
    except OSError as error:
        raise ConfigError(f"{option} {path} is not writable ({probe}: {error.strerror}); pass a writable path")


def save_figure(figure, path: str, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG at `path`, written atomically."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
