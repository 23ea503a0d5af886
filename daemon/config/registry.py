"""Finding plugin classes by their config `type` through the entry-point group `vigild.plugins`.

Built-in plugins are registered in the same group by vigild's own pyproject, so a third-party plugin is found
exactly like a built-in one. Only the plugins a config names are imported, and one that fails to import stops
the daemon with the reason (unlike Frigate, which starts without it). The config resolves each `type:` here
(vigild.config.resolve), so this lives in the config, below the pipeline that runs the plugins.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from vigild.plugin import Plugin

GROUP = "vigild.plugins"


class PluginLookupError(Exception):
    pass


def available() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_plugin_class(type_name: str) -> type[Plugin]:
    found = available()
    entry = found.get(type_name)
    if entry is None:
        known = ", ".join(sorted(found)) or "none installed"
        raise PluginLookupError(f"unknown plugin type '{type_name}' (known: {known})")
    try:
        cls = entry.load()
    except Exception as exc:  # any import-time failure is the plugin's, and is reported as such
        raise PluginLookupError(
            f"plugin '{type_name}' ({entry.value}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginLookupError(f"plugin '{type_name}' ({entry.value}) is not a vigild.plugin.Plugin subclass")
    return cls
