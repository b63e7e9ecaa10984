"""Plugins: hook specifications, the plugin manager and the registry of backends and strategies."""

from earlyexit.plugins.registry import (BUILTIN_PLUGINS, ENTRY_POINT_GROUP, EarlyExitPluginManager, PluginFailure,
                                        Registry, get_registry, make_plugin_manager, notify)

__all__ = ["BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "EarlyExitPluginManager", "PluginFailure", "Registry",
           "get_registry", "make_plugin_manager", "notify"]
