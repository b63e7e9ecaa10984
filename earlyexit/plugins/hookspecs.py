"""Hook specifications: the contract between earlyexit and its plugins.

Built-in backends and strategies implement the same hooks as third-party plugins. Plugins
implement them with ``@earlyexit.hookimpl``. Nothing here runs inside the per-layer hot path:
the engine calls strategy objects directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from earlyexit.core.backend import Backend
    from earlyexit.core.drafter import Drafter
    from earlyexit.core.strategy import Strategy

hookspec = pluggy.HookspecMarker("earlyexit")


# -- registration -----------------------------------------------------------------------------
@hookspec
def earlyexit_register_backends() -> list[type[Backend]]:
    """Called once when a registry is built (every CLI command, `earlyexit.plugins.get_registry`).

    Return a list of `Backend` subclasses (classes, not instances), each with a unique `name`.
    The module must stay cheap to import: import torch/transformers inside methods only.
    """


@hookspec
def earlyexit_register_strategies() -> list[type[Strategy]]:
    """Called once when a registry is built, like `earlyexit_register_backends`.

    Return a list of `Strategy` subclasses (classes, not instances), each with a unique `name`.
    Each is written for a plugin contract version (`Strategy.contract_version`, read from
    `should_exit`'s parameters unless declared): the current one (`earlyexit.CONTRACT_VERSION`)
    is called as it is; version 1 (`should_exit(exit_index, logits, hidden, context)`) is adapted
    with a DeprecationWarning; a newer one fails this plugin in one line (docs/contract-versions.md).
    """


@hookspec
def earlyexit_register_drafters() -> list[type[Drafter]]:
    """Called once when a registry is built, like `earlyexit_register_backends`.

    Return a list of `Drafter` subclasses (classes, not instances), each with a unique `name`: what
    `--drafter NAME` selects for speculative decoding (docs/plugins.md).
    """


# -- lifecycle (loggers, trackers) ------------------------------------------------------------
@hookspec
def earlyexit_run_start(config: dict[str, Any]) -> None:
    """Called once before a run (training, calibration, evaluation) starts.

    `config` is the run's resolved configuration as plain JSON-able values. Return value ignored.
    """


@hookspec
def earlyexit_run_end(config: dict[str, Any], results: dict[str, Any]) -> None:
    """Called once after a run finished successfully, with the same `config` as
    `earlyexit_run_start` and the run's final metrics in `results`. Return value ignored.
    """


@hookspec
def earlyexit_batch_stats(stats: dict[str, Any]) -> None:
    """Called after every batch with per-batch numbers (e.g. loss, step, exit-layer histogram,
    tokens per second). Called once per batch, never per layer or token. Return value ignored.
    """
