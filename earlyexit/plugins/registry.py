"""Plugin loading and the registry of backends and strategies.

Built-in modules and third-party entry points (group ``earlyexit``) register through the same
hooks (`earlyexit.hookspecs`). Everything here is built by factories, never kept in module
globals, so every test and every CLI call gets a fresh view. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import os
from typing import Any

import pluggy

from earlyexit.core.backend import Backend
from earlyexit.core.strategy import Strategy
from earlyexit.errors import PluginError
from earlyexit.plugins import hookspecs

BUILTIN_PLUGINS = (
    "earlyexit.backends.blip2_flant5",
    "earlyexit.backends.blip2_opt",
    "earlyexit.backends.instructblip_flant5",
    "earlyexit.backends.instructblip_vicuna",
    "earlyexit.backends.minigpt4_llama",
    "earlyexit.strategies.confidence",
    "earlyexit.strategies.deebert",
    "earlyexit.strategies.fixed",
    "earlyexit.strategies.free",
    "earlyexit.strategies.leebert",
    "earlyexit.strategies.mue",
    "earlyexit.strategies.pabee",
)
ENTRY_POINT_GROUP = "earlyexit"
DISABLE_AUTOLOAD_ENV = "EARLYEXIT_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_SOURCE = "earlyexit (built-in)"
"""What `earlyexit list` shows as the plugin of everything that ships with earlyexit."""


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used; the others keep working."""

    plugin: str  # the entry point's name (or the registered plugin name)
    distribution: str  # who to blame: the distribution that declared it
    error: str  # one line

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' from {self.distribution} failed to load: {self.error}"


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class EarlyExitPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers where each plugin came from and which failed."""

    def __init__(self) -> None:
        super().__init__("earlyexit")
        self.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.sources: dict[str, str] = {}  # registered plugin name -> shown as "plugin"

    def register_from(self, plugin: Any, name: str, source: str) -> None:
        self.register(plugin, name=name)
        self.sources[name] = source

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load and register every entry point of `group`, one at a time, so one broken plugin
        is recorded in `failures` instead of stopping the rest."""
        for entry_point in importlib.metadata.entry_points(group=group):
            distribution = entry_point.dist.name if entry_point.dist else "an unknown distribution"
            # Qualified by distribution so two packages may reuse an entry-point name.
            name = f"{distribution}:{entry_point.name}"
            if self.get_plugin(name) is not None or self.is_blocked(name):
                continue
            try:
                plugin = entry_point.load()
                if self.is_registered(plugin):  # two entry points to one module
                    continue
                self.register_from(plugin, name, distribution)
            except BaseException as error:  # noqa: BLE001 - sys.exit() on import too; only ^C stops us
                if isinstance(error, KeyboardInterrupt):
                    raise
                self.failures.append(PluginFailure(entry_point.name, distribution, one_line(error)))


def autoload_disabled() -> bool:
    value = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def make_plugin_manager(load_entrypoints: bool | None = None) -> EarlyExitPluginManager:
    """A fresh plugin manager with the built-ins and (unless disabled) third-party plugins.

    `load_entrypoints=None` follows the environment variable EARLYEXIT_DISABLE_PLUGIN_AUTOLOAD.
    A built-in that fails to import is a broken install, so that error propagates.
    """
    pm = EarlyExitPluginManager()
    for module_name in BUILTIN_PLUGINS:
        pm.register_from(importlib.import_module(module_name), module_name, BUILTIN_SOURCE)
    if load_entrypoints is None:
        load_entrypoints = not autoload_disabled()
    if load_entrypoints:
        pm.load_entry_points()
    return pm


class Registry:
    """Every backend and strategy the plugins offer, by name, and which plugin offered it."""

    KINDS = ("backend", "strategy")

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.failures: list[PluginFailure] = list(getattr(pm, "failures", []))
        self._sources: dict[str, str] = getattr(pm, "sources", {})
        self._classes: dict[str, dict[str, type]] = {kind: {} for kind in self.KINDS}
        self._providers: dict[str, dict[str, str]] = {kind: {} for kind in self.KINDS}
        self.hook = pm.hook
        self._collect(pm.hook.earlyexit_register_backends, "backend", Backend)
        self._collect(pm.hook.earlyexit_register_strategies, "strategy", Strategy)

    def _collect(self, hook: Any, kind: str, base: type) -> None:
        # Call each implementation on its own (not `hook()`) to know which plugin returned what.
        for impl in hook.get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                continue
            source = self._sources.get(impl.plugin_name, impl.plugin_name)
            try:
                classes = self._validated(impl.function(), kind, base)
            except BaseException as error:  # noqa: BLE001 - a broken third-party hook must not stop the rest
                if source == BUILTIN_SOURCE or isinstance(error, KeyboardInterrupt):
                    raise
                entry_point = impl.plugin_name.rpartition(":")[2]  # registered as "distribution:entry point"
                self.failures.append(PluginFailure(entry_point, source, one_line(error)))
                continue
            for cls in classes:
                self._add(kind, cls, source)

    @staticmethod
    def _validated(returned: Any, kind: str, base: type) -> list[type]:
        if isinstance(returned, type):
            raise PluginError(f"register hook must return a list of classes, got the class {returned.__qualname__}")
        classes = list(returned or [])
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(f"register hook returned {cls!r}, not a {base.__name__} subclass")
            if not cls.name:
                raise PluginError(f"{kind} class {cls.__qualname__} has an empty `name`")
        return classes

    def _add(self, kind: str, cls: type, source: str) -> None:
        existing = self._classes[kind].get(cls.name)
        if existing is cls:
            return
        if existing is not None:
            raise PluginError(
                f"{kind} '{cls.name}' is registered twice: by {self._providers[kind][cls.name]} "
                f"and by {source}; uninstall one of them"
            )
        self._classes[kind][cls.name] = cls
        self._providers[kind][cls.name] = source

    # -- lookup ------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._classes[kind])

    def backend(self, name: str) -> type[Backend]:
        return self._lookup("backend", name)

    def strategy(self, name: str) -> type[Strategy]:
        return self._lookup("strategy", name)

    def plugin_of(self, kind: str, name: str) -> str:
        self._lookup(kind, name)
        return self._providers[kind][name]

    def _lookup(self, kind: str, name: str) -> type:
        if name in self._classes[kind]:
            return self._classes[kind][name]
        available = self.names(kind)
        message = f"unknown {kind} '{name}'."
        close = difflib.get_close_matches(name, available, n=1)
        if close:
            message += f" Did you mean '{close[0]}'?"
        message += f" Available: {', '.join(available) or 'none'}"
        raise PluginError(message)

    def entries(self) -> list[dict[str, str]]:
        """One dict per backend/strategy: name, kind, plugin, description (backends first)."""
        return [
            {
                "name": name,
                "kind": kind,
                "plugin": self._providers[kind][name],
                "description": self._classes[kind][name].description,
            }
            for kind in self.KINDS
            for name in self.names(kind)
        ]


def get_registry(load_entrypoints: bool | None = None) -> Registry:
    """A fresh registry from a fresh plugin manager."""
    return Registry(make_plugin_manager(load_entrypoints))


def notify(registry, event: str, **kwargs) -> None:
    """Call a lifecycle hook (`run_start`, `run_end`, `batch_stats`) on every plugin that
    implements it. A logger that fails is reported once on stderr and never stops the work."""
    import sys

    hook = getattr(getattr(registry, "hook", None), f"earlyexit_{event}", None)
    if hook is None:
        return
    for impl in hook.get_hookimpls():
        try:
            impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        except Exception as error:  # noqa: BLE001 - a broken logger must not stop a run
            key = (impl.plugin_name, event)
            if key not in _REPORTED:
                _REPORTED.add(key)
                print(f"warning: plugin {impl.plugin_name} failed in earlyexit_{event}: {one_line(error)}",
                      file=sys.stderr)


_REPORTED: set = set()
