"""Writing outputs: readers see the old result or the complete new one, and nothing a user
already has is deleted or replaced without a word.

The rule for every path a command writes
----------------------------------------
1. Result files (`--json FILE`, `run`'s calibration.csv, `bench`'s tables and cells) are written
   beside the target and renamed into place (`atomic_write`). The target must be absent or a
   regular file: a symbolic link (`/dev/stdout` is one), a device (`/dev/null`), a FIFO or a
   socket is refused with one line before any work (`check_writable`: ConfigError, exit 2),
   because renaming onto it would replace the link or the special file instead of writing
   through it. The link is never replaced. `-` writes through to standard output
   (`--json -` prints the JSON there; the command's report then goes to standard error). A
   regular file at the exact path a command writes is that command's output and is replaced.
2. A folder a command writes whole (`train backbone --output K` writes K/model; an exit adapter,
   a learned gate, a training checkpoint, an embedded model's build) is written beside the target
   and swapped in (`atomic_folder`), with a marker file `.earlyexit` inside that lists the
   files earlyexit wrote there (paths relative to the folder). An existing folder is replaced
   only when earlyexit wrote it (its marker, or, for folders written before markers, one of
   earlyexit's own files: earlyexit_build.json, exit_config.json, gate_config.json,
   trainer_state.json), when it is empty, or with `--overwrite`; otherwise the command stops
   with one line, exit 2, before any work (`check_replaceable`). Folders inside earlyexit's
   cache (adapters, gates, built models) are earlyexit's by location; rule 3 holds there too.
3. Replacing a folder replaces only what earlyexit wrote: the files its marker lists (for an
   older folder without a list, the files the new folder writes at the same paths). Every other
   file, link or empty folder, at any depth (a user's notes, plots, sub-folders), is carried to
   the same place in the new folder byte for byte (hard-linked, else copied): it is never
   deleted, with `--overwrite` too. A user's file at a path earlyexit now writes is kept beside
   as PATH.kept, and a `note:` line says so. `--overwrite` means exactly: replace a folder
   earlyexit cannot tell it wrote, taking the files the command writes (same paths) as
   earlyexit's to replace; it deletes nothing else.
4. Output folders that are not replaced (`run --output`, `bench --output`, the folder `train
   backbone --output` names, the cache) only get the command's own files and folders added or
   replaced (rules 1 to 3); nothing else in them is touched.
5. What interrupted work leaves is earlyexit's: temporary files and folders beside a target
   (`.NAME-*`) are removed by the next write of that target (a folder a killed swap had moved
   aside is first put back), and the `.work` folder of an interrupted exit training is resumed
   when its checkpoint matches the run, else removed, with a `note:` line saying which
   (`earlyexit.pipeline.exits`). The training loop prunes its own older `checkpoint-N` folders.

`check_writable` (files and output folders) and `check_replaceable` (folders written whole) are
the up-front checks; `atomic_write` and `atomic_folder` are the writers, which hold to the rule
even where a caller did not check.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile

from earlyexit.errors import ConfigError, first_line

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

MARKER = ".earlyexit"
# files only earlyexit writes: a folder holding one was written by earlyexit before markers existed
LEGACY_MARKERS = ("earlyexit_build.json", "exit_config.json", "gate_config.json", "trainer_state.json")
STDOUT = "-"


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# -- who wrote a folder -------------------------------------------------------------------------
def project_entries(folder: str) -> tuple[str, set[str] | None]:
    """Who wrote `folder`: ("absent", None), ("empty", set()), ("ours", the entries its marker
    lists, or None for a folder from before markers) or ("theirs", None)."""
    if not os.path.lexists(folder):
        return "absent", None
    names = set(os.listdir(folder))
    if not names:
        return "empty", set()
    if MARKER in names:
        try:
            with open(os.path.join(folder, MARKER), encoding="utf-8") as handle:
                listed = json.load(handle).get("entries")
            if isinstance(listed, list) and all(isinstance(n, str) for n in listed):
                return "ours", set(listed)
        except (OSError, ValueError, AttributeError):
            pass
        return "ours", None  # a damaged marker: ours, without a list
    if names & set(LEGACY_MARKERS):
        return "ours", None
    return "theirs", None


def check_replaceable(path: str, overwrite: bool = False, option: str = "--output") -> None:
    """The rule (module docstring) applied before any work: a ConfigError (one line, exit 2)
    unless the folder at `path` may be replaced: absent, empty, written by earlyexit, or
    `overwrite` (the command's --overwrite)."""
    if os.path.islink(path):
        raise ConfigError(f"{option}: {path} is a symbolic link (to {os.readlink(path)}); earlyexit swaps a new "
                          "folder into place, which would replace the link: pass the link's target or another path")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option}: {path} is a file where earlyexit writes a folder; move it or pass another path")
    kind, _ = project_entries(path)
    if kind == "theirs" and not overwrite:
        raise ConfigError(f"{option}: {path} exists and was not written by earlyexit (it holds no {MARKER} marker); "
                          "pass --overwrite to replace what earlyexit writes there (every other file in it is kept), "
                          "or pass another path")


# -- folders --------------------------------------------------------------------------------------
def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        if not stat.S_ISREG(os.lstat(source).st_mode):
            raise ConfigError(f"{source} cannot be carried into the new folder (not a regular file, and it cannot be "
                              "hard-linked); move it out and run again") from None
        shutil.copy2(source, target)
    return target


def _carry(source: str, target: str) -> None:
    """The file or link `source` to `target`, byte for byte, leaving `source` in place."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
    else:
        _link_or_copy(source, target)


def _kept_name(path: str) -> str:
    candidate, n = f"{path}.kept", 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}.kept-{n}"
    return candidate


def _tree(folder: str) -> tuple[list[str], list[str]]:
    """(files and links, empty folders) under `folder`, as relative paths with `/`; links to
    folders count as links and are not followed."""
    files, empty = [], []
    for here, folders, names in os.walk(folder):
        relative = os.path.relpath(here, folder)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        links = [d for d in folders if os.path.islink(os.path.join(here, d))]
        folders[:] = sorted(d for d in folders if d not in links)
        files += [prefix + n for n in sorted(names + links)]
        if not folders and not names and not links and prefix:
            empty.append(prefix.rstrip("/"))
    return files, empty


def _carry_user_entries(old: str, new: str, written: set[str], overwrite: bool) -> None:
    """Every file, link and empty folder of `old` that earlyexit did not write, into the same
    place in `new` (rule 3): what the marker of `old` lists is earlyexit's; without a list (a
    folder from before markers, or `overwrite`), so is whatever `new` writes under the same path."""
    kind, listed = project_entries(old)
    same_paths_are_ours = overwrite or (kind == "ours" and listed is None)
    files, empty = _tree(old)
    for relative in files:
        if relative == MARKER or (listed is not None and relative in listed):
            continue  # earlyexit's: replaced by the new folder, or no longer written
        source, target = os.path.join(old, relative), os.path.join(new, relative)
        if relative in written or os.path.lexists(target):
            if same_paths_are_ours:
                continue
            kept = _kept_name(target)
            _carry(source, kept)
            _note(f"kept your {source} as {kept} beside earlyexit's new {os.path.basename(target)}")
            continue
        _carry(source, target)
    for relative in empty:
        os.makedirs(os.path.join(new, relative), exist_ok=True)


@contextlib.contextmanager
def _held(folder: str):
    """An exclusive lock on `folder` while a live writer uses it: the leftover cleaning of another
    process (another rank writing beside it) leaves it alone. The kernel drops the lock when its
    holder dies, so what a killed writer left is still cleaned."""
    if fcntl is None:  # no flock here (Windows): leftovers are cleaned as before
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _in_use(parent: str, name: str) -> bool:
    """Whether a live writer holds the folder `name` (`_held`)."""
    if fcntl is None:
        return False
    try:
        handle = os.open(os.path.join(parent, name), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(handle)


def _put_back(parent: str, base: str, final: str) -> None:
    """A swap killed between moving the previous folder aside and renaming the new one into
    place leaves no `final`: put the previous folder back before anything else."""
    if os.path.lexists(final):
        return
    for name in sorted(os.listdir(parent)):
        previous = os.path.join(parent, name, base)
        if name.startswith(f".{base}-replaced-") and os.path.isdir(previous) and not _in_use(parent, name):
            os.replace(previous, final)
            _note(f"put back {final}, which an interrupted save had moved aside")
            return


@contextlib.contextmanager
def atomic_folder(final: str, overwrite: bool = False):
    """Yields a temporary folder beside `final`; on success it takes `final`'s place (the
    previous folder is renamed aside, the new one into place, the old one removed; a kill between
    the two renames is repaired by the next write), on any error it is removed and `final` is left
    as it was.

    The new folder gets the `.earlyexit` marker listing the files it was given (paths relative to
    it); the files of the previous `final` that earlyexit did not write are carried into it (rule 3
    of the module docstring; `overwrite`: --overwrite, same paths of a folder without a list are
    replaced). Whether `final` may be replaced at all the command checks first (`check_replaceable`)."""
    final = os.path.abspath(final)
    parent, base = os.path.dirname(final), os.path.basename(final)
    if os.path.islink(final) or (os.path.lexists(final) and not os.path.isdir(final)):
        check_replaceable(final, overwrite, option="folder")  # raises its one line
    os.makedirs(parent, exist_ok=True)
    _put_back(parent, base, final)
    prefix = f".{base}-"
    for name in os.listdir(parent):  # what a killed earlier attempt left behind (not a live writer's)
        if name.startswith(prefix) and os.path.isdir(os.path.join(parent, name)) and not _in_use(parent, name):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    temporary = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with _held(temporary):
        yield from _fill_and_swap(temporary, final, overwrite)


def _fill_and_swap(temporary: str, final: str, overwrite: bool):
    """`atomic_folder`'s body: yield `temporary`, mark it, swap it into place (or remove it on error)."""
    parent, base = os.path.dirname(final), os.path.basename(final)
    try:
        yield temporary
        written = set(_tree(temporary)[0]) - {MARKER}
        with open(os.path.join(temporary, MARKER), "w", encoding="utf-8") as handle:
            json.dump({"written_by": "earlyexit", "entries": sorted(written),
                       "about": "earlyexit wrote the entries listed here and replaces them when it writes this folder "
                                "again; every other file in this folder is yours and is kept"}, handle, indent=2)
        if not os.path.isdir(final):
            os.replace(temporary, final)
            return
        _carry_user_entries(final, temporary, written, overwrite)
        aside = tempfile.mkdtemp(prefix=f".{base}-replaced-", dir=parent)
        with _held(aside):
            os.replace(final, os.path.join(aside, base))
            try:
                os.replace(temporary, final)
            except BaseException:
                os.replace(os.path.join(aside, base), final)
                raise
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


# -- files ----------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return kind
    return "special file"


def check_regular_target(path: str, option: str = "--json") -> None:
    """A ConfigError (one line) unless `path` is absent or a regular file: renaming a new file
    onto a symbolic link, a device, a FIFO or a socket would replace it instead of writing
    through it (rule 1)."""
    stdout = f", or {option} - for standard output" if option.startswith("--") else ""
    if os.path.islink(path):
        raise ConfigError(f"{option} {path} is a symbolic link (to {os.readlink(path)}); earlyexit writes a new file "
                          f"and renames it into place, which would replace the link: pass the file it points to or "
                          f"another file{stdout}")
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # absent (a file on its way is check_writable's to name)
        return
    except OSError as error:
        raise ConfigError(f"{option} {path} cannot be checked ({error.strerror}); pass another file") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{option} {path} is a folder; pass a file path such as {os.path.join(path, 'result.json')}")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{option} {path} is a {_file_kind(mode)}, not a regular file; pass a file path{stdout}")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs):
    """Yields a file opened (`mode`: "w" or "wb") on a temporary file beside `path`; on success it
    replaces `path` in one rename, on any error it is removed and `path` is left as it was. The
    file gets the permissions an ordinary `open` would give it (0644 under the usual umask), not
    the private 0600 of a temporary file: results are for sharing. `path` must be absent or a
    regular file (a link, device or FIFO is a ConfigError); `-` writes to standard output."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    if path == STDOUT:
        stream = sys.stdout.buffer if mode == "wb" else sys.stdout
        yield stream  # not closed: it is the process's standard output
        stream.flush()
        return
    check_regular_target(path, option="output file")
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
    """`payload` as indented JSON at `path` (atomically), or on standard output for `-`."""
    with atomic_write(path) as out:
        json.dump(payload, out, indent=2)
        if path == STDOUT:
            out.write("\n")


def check_writable(path: str, folder: bool = False, option: str = "--output") -> None:
    """Fail before any work when `path` cannot be written (a read-only place, a file where a
    folder must go or the other way round, a link or special file where a file goes), with a
    one-line fix. A file option's `-` (standard output) is always writable."""
    if not folder and path == STDOUT:
        return
    check_legal_name(path, option)
    target = os.path.abspath(path)
    if folder and os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(f"{option} {path} is a file, not a folder; pass a folder path")
    if not folder:
        check_regular_target(path, option)
    # the nearest existing ancestor must let us create the rest
    probe = _nearest_existing(target if folder and os.path.isdir(target) else os.path.dirname(target))
    if not os.path.isdir(probe):
        raise ConfigError(f"{option} {path} lies under {probe}, which is a file; pass another path")
    try:  # really try (permission bits say little for root, or on read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".earlyexit-write-check-", dir=probe))
    except OSError as error:
        raise ConfigError(f"{option} {path} is not writable ({probe}: {error.strerror}); pass a writable path")


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _limit(folder: str, name: str, fallback: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):  # no such limit here (or the folder is not readable)
        return fallback


def check_legal_name(path: str, option: str = "--output") -> None:
    """A ConfigError (one line) for a path no file system here can hold: empty, holding a NUL
    byte, a component longer than its folder's file system allows (PC_NAME_MAX) or a whole path
    longer than PC_PATH_MAX; checked up front, so a long run does not fail at its last write."""
    if not path:
        fix = "a file path, or - for standard output" if option == "--json" else "a path"
        raise ConfigError(f"{option} is empty; pass {fix}")
    if "\0" in path:
        raise ConfigError(f"{option} {path!r} holds a NUL byte; pass a path without one")
    target = os.path.abspath(path)
    existing = _nearest_existing(target)
    probe = existing if os.path.isdir(existing) else os.path.dirname(existing)
    name_max, path_max = _limit(probe, "PC_NAME_MAX", 255), _limit(probe, "PC_PATH_MAX", 4096)
    for part in target.split(os.sep):
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"{option}: the name {part[:20]}... is {len(os.fsencode(part))} bytes, longer than the "
                              f"{name_max} the file system allows; pass a shorter name")
    if len(os.fsencode(target)) >= path_max:
        raise ConfigError(f"{option}: the path is {len(os.fsencode(target))} bytes, longer than the {path_max - 1} "
                          "the file system allows; pass a shorter path")


def check_cache_location(variable: str = "EARLYEXIT_CACHE") -> None:
    """The cache folder a user set in `variable`, refused before any work (a tiny build, a
    training) when it is empty of meaning, a file, under a file or not writable: one line that
    says to point the variable at a writable folder. Unset, the default cache is not checked
    here (commands that never touch it must not fail over it)."""
    path = os.environ.get(variable)
    if path is None:
        return
    fix = f"set {variable} to a writable folder, or unset it for the default cache"
    if not path.strip():
        raise ConfigError(f"{variable} is set but empty; {fix}")
    try:
        check_writable(path, folder=True, option=variable)
    except ConfigError as error:
        raise ConfigError(f"{first_line(error).split('; pass')[0]}; {fix}") from None


def save_figure(figure, path: str, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG at `path`, written atomically."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
