"""The allowed names of every option that takes one, in one place: the command line, the bench
spec, `run` and the engine all read them from here (no torch, so `--help` stays instant)."""

from __future__ import annotations

from earlyexit.errors import ConfigError

KV_POLICIES = ("catchup", "propagate", "skip")  # what deeper layers' caches get for a position that left early
DECODES = ("early-exit", "speculative")
GATES = ("learned", "cosine")  # `none` turns the gate off where a command offers it
GATE_MODES = ("replace", "filter")
RULES = ("best", "budget", "risk")  # how calibration picks the knob value
SPEED_TARGETS = ("wall", "layer")  # what the budget rule maximises


def draft_exit_index(draft_layer: int, exit_layers: list[int]) -> int:
    """The exit index that drafts, from `--draft-exit` (a layer), or a ConfigError that lists the
    exit layers to choose from."""
    if draft_layer not in exit_layers:
        raise ConfigError(f"--draft-exit {draft_layer} is not one of the exit layers {exit_layers}")
    return exit_layers.index(draft_layer)
