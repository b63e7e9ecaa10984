"""One error hierarchy. The CLI prints `str(error)` as a single line and exits with `exit_code`."""


class EarlyExitError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class ConfigError(EarlyExitError):
    """A bad option, value or combination of options: the user can fix it by changing the call."""

    exit_code = 2


class PluginError(EarlyExitError):
    """A plugin could not be loaded, registers a clashing name, or a name is unknown."""

    exit_code = 2


class DataError(EarlyExitError):
    """An input file or data set is missing or malformed."""

    exit_code = 2


class ModelNotAvailableError(EarlyExitError):
    """Weights could not be found locally and the hub cannot be reached."""

    exit_code = 2


class CheckpointError(EarlyExitError):
    """A checkpoint or adapter does not match what it is loaded onto, or is corrupt."""

    exit_code = 2


class CorruptAdapterError(CheckpointError):
    """An adapter folder whose files are damaged: a missing, unreadable or malformed config, or
    truncated weights. A cache entry in this state is rebuilt; a folder the user named is reported."""


def first_line(error: BaseException, with_type: bool = False) -> str:
    """An exception's message as one short line, for one-line errors (its type's name when it
    has no message; `with_type` puts the type's name first, for errors that are not ours)."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if with_type else lines[0][:200]
