"""Plugin loading and the registry of backends, strategies and drafters.

Built-in modules and third-party entry points (group ``earlyexit``) register through the same
hooks (`earlyexit.plugins.hookspecs`). Everything here is built by factories, never kept in module
globals, so every test and every CLI call gets a fresh view. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import os
import warnings
from typing import Any

import pluggy

from earlyexit.core.backend import Backend
from earlyexit.core.drafter import Drafter
from earlyexit.core.strategy import CONTRACT_SIGNATURES, CONTRACT_VERSION, Strategy, should_exit_signature
from earlyexit.errors import PluginError, first_line
from earlyexit.plugins import hookspecs

BUILTIN_PLUGINS = (
    "earlyexit.backends.blip2_flant5",
    "earlyexit.backends.blip2_opt",
    "earlyexit.backends.instructblip_flant5",
    "earlyexit.backends.instructblip_vicuna",
    "earlyexit.backends.minigpt4_llama",
    "earlyexit.drafters.corpus",
    "earlyexit.drafters.exits",
    "earlyexit.drafters.feature",
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
                self.failures.append(PluginFailure(entry_point.name, distribution, first_line(error, with_type=True)))


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
    """Every backend, strategy and drafter the plugins offer, by name, and which plugin offered it."""

    KINDS = ("backend", "strategy", "drafter")

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.failures: list[PluginFailure] = list(getattr(pm, "failures", []))
        self._sources: dict[str, str] = getattr(pm, "sources", {})
        self._classes: dict[str, dict[str, type]] = {kind: {} for kind in self.KINDS}
        self._providers: dict[str, dict[str, str]] = {kind: {} for kind in self.KINDS}
        self._adapted: dict[type, type] = {}  # an older contract's strategy class -> its adapter
        self.hook = pm.hook
        self._collect(pm.hook.earlyexit_register_backends, "backend", Backend)
        self._collect(pm.hook.earlyexit_register_strategies, "strategy", Strategy)
        self._collect(pm.hook.earlyexit_register_drafters, "drafter", Drafter)

    def _collect(self, hook: Any, kind: str, base: type) -> None:
        # Call each implementation on its own (not `hook()`) to know which plugin returned what.
        for impl in hook.get_hookimpls():
            if impl.hookwrapper or impl.wrapper:
                continue
            source = self._sources.get(impl.plugin_name, impl.plugin_name)
            try:
                classes = self._validated(impl.function(), kind, base)
                if kind == "strategy":
                    classes = self._on_current_contract(classes, impl.plugin_name, source)
            except BaseException as error:  # noqa: BLE001 - a broken third-party hook must not stop the rest
                if source == BUILTIN_SOURCE or isinstance(error, KeyboardInterrupt):
                    raise
                entry_point = impl.plugin_name.rpartition(":")[2]  # registered as "distribution:entry point"
                self.failures.append(PluginFailure(entry_point, source, first_line(error, with_type=True)))
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

    def _on_current_contract(self, classes: list[type], plugin: str, source: str) -> list[type]:
        """The strategy classes as the engine calls them: a class written for contract version 1
        is replaced by its adapter (one DeprecationWarning each); one the engine cannot call
        fails the plugin in one line. Current-contract classes stay as they are: no wrapper."""
        versions = [contract_checked(cls) for cls in classes]  # refuse before warning about any
        current = []
        for cls, version in zip(classes, versions):
            if version < CONTRACT_VERSION:
                if cls not in self._adapted:
                    self._adapted[cls] = adapted_from_contract_1(cls)
                warnings.warn(f"{plugin_label(plugin, source)}: strategy '{cls.name}' is written for contract "
                              f"version {version}; this earlyexit (contract version {CONTRACT_VERSION}) adapts it, "
                              "computing every exit's logits before it decides; port it to "
                              f"should_exit({', '.join(CONTRACT_SIGNATURES[CONTRACT_VERSION])}) "
                              "(docs/contract-versions.md)", DeprecationWarning, stacklevel=2)
                cls = self._adapted[cls]
            current.append(cls)
        return current

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

    def drafter(self, name: str) -> type[Drafter]:
        return self._lookup("drafter", name)

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
        """One dict per backend, strategy and drafter: name, kind, plugin, description (backends first)."""
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


def plugin_label(plugin: str, source: str) -> str:
    """How a registered plugin is named to the user: its entry point and distribution."""
    entry_point = plugin.rpartition(":")[2]  # entry points register as "distribution:entry point"
    return f"plugin '{entry_point}' from {source}" if source != plugin else f"plugin '{plugin}'"


def contract_checked(cls: type[Strategy]) -> int:
    """The contract version `cls` is written for, when this earlyexit can call it (the current
    one, or 1 through an adapter); else a one-line PluginError naming the version it needs."""
    version = cls.contract_version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PluginError(f"strategy '{cls.name}' declares contract_version {version!r}; contract versions are "
                          f"whole numbers, and this earlyexit supports 1-{CONTRACT_VERSION}")
    if version > CONTRACT_VERSION:
        raise PluginError(f"strategy '{cls.name}' is written for contract version {version}; this earlyexit "
                          f"supports 1-{CONTRACT_VERSION}: upgrade earlyexit")
    expected = CONTRACT_SIGNATURES[version]
    signature = should_exit_signature(cls)
    try:
        if signature is None:
            raise TypeError
        signature.bind(*expected)
    except TypeError:
        shown = f"should_exit{signature}" if signature is not None else "a should_exit"
        known = ", ".join(f"{v} ({', '.join(names)})" for v, names in sorted(CONTRACT_SIGNATURES.items()))
        raise PluginError(f"strategy '{cls.name}' has {shown}, which contract version {version} cannot call (it "
                          f"passes {', '.join(expected)}); the versions this earlyexit supports: {known}; the "
                          "plugin needs fixing (docs/contract-versions.md)") from None
    return version


def adapted_from_contract_1(cls: type[Strategy]) -> type[Strategy]:
    """A subclass of `cls` (written for contract version 1) that the engine calls as the current
    contract: it computes the exit's logits (charged, as `view.logits()` always is) and hands
    them and the state they were read from to the old `should_exit`. Same name, module and
    everything else; only contract-1 classes pay for this indirection."""

    def should_exit(self, exit_index, view, context):
        return super(adapted, self).should_exit(exit_index, view.logits(), view.state(), context)

    adapted = type(cls.__name__, (cls,), {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "should_exit": should_exit,
        "contract_version": CONTRACT_VERSION,
        "adapted_from": cls,
    })
    return adapted


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
                print(f"warning: plugin {impl.plugin_name} failed in earlyexit_{event}: {first_line(error, with_type=True)}",
                      file=sys.stderr)


_REPORTED: set = set()
