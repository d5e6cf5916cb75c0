"""The plugin manager: loads the ``tlfx`` entry points (first-party plugins included) and builds registries."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from . import hookspecs
from .errors import TlfxError, unknown_choice

ENTRY_POINT_GROUP = "tlfx"
PLUGINS_DIR_ENV = "TLFX_PLUGINS_DIR"


@dataclass
class PluginRecord:
    name: str
    source: str  # "entry point <dist> <version>", or a file path
    module: str
    error: str | None = None
    kinds: list[str] = field(default_factory=list)


@dataclass
class Entry:
    """One registered backbone, head or dataset."""

    name: str
    factory: object
    plugin: str
    description: str = ""
    meta: dict = field(default_factory=dict)


class Registry:
    """Names to factories for one kind of plugin (timm's ``list_models``/``create_model`` shape)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register_for(self, plugin: str):
        def register(name, factory, *, description="", **meta):
            if name in self._entries:
                other = self._entries[name].plugin
                raise TlfxError(
                    f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}; "
                    f"uninstall or rename one of them"
                )
            self._entries[name] = Entry(name, factory, plugin, description, meta)

        return register

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_choice(self.kind, name, self._entries) from None

    def __contains__(self, name):
        return name in self._entries


class PluginManager:
    """Loads plugins once per process and keeps their registries."""

    def __init__(self, plugins_dirs: list[str] | None = None):
        self.pm = pluggy.PluginManager("tlfx")
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self._registries: dict[str, Registry] = {}
        self._load_entry_points()
        dirs = list(plugins_dirs or [])
        env = os.environ.get(PLUGINS_DIR_ENV)
        if env:
            dirs += [d for d in env.split(os.pathsep) if d]
        for d in dirs:
            self.load_directory(d)

    def _load_entry_points(self):
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        seen = set()
        for ep in sorted(eps, key=lambda e: e.name):
            if (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            dist = getattr(ep, "dist", None)
            source = f"entry point ({dist.name} {dist.version})" if dist else "entry point"
            rec = PluginRecord(ep.name, source, ep.value)
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
            except Exception as exc:  # a broken plugin must not break the CLI
                rec.error = _one_line(exc)
            self.records.append(rec)

    def load_directory(self, directory: str):
        """Load every ``*.py`` file in ``directory`` as a plugin (for development, without packaging)."""
        path = Path(directory)
        if not path.is_dir():
            raise TlfxError(f"plugins directory {directory!r} does not exist; pass an existing directory")
        for file in sorted(path.glob("*.py")):
            name = file.stem
            rec = PluginRecord(name, str(file), f"tlfx_local_plugins.{name}")
            try:
                spec = importlib.util.spec_from_file_location(rec.module, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[rec.module] = module
                spec.loader.exec_module(module)
                self.pm.register(module, name=name)
            except Exception as exc:
                rec.error = _one_line(exc)
            self.records.append(rec)
        self._registries.clear()

    def registry(self, kind: str) -> Registry:
        """The registry of ``kind`` ('backbone', 'head', 'dataset'), built on first use."""
        if kind not in self._registries:
            reg = Registry(kind)
            hook = getattr(self.pm.hook, f"register_{kind}s")
            for impl in reversed(hook.get_hookimpls()):  # registration order: load order
                plugin_name = self.pm.get_name(impl.plugin)
                impl.function(register=reg.register_for(plugin_name))
                rec = self._record(plugin_name)
                if rec and kind not in rec.kinds and any(e.plugin == plugin_name for e in reg.entries()):
                    rec.kinds.append(kind)
            self._registries[kind] = reg
        return self._registries[kind]

    def _record(self, name):
        return next((r for r in self.records if r.name == name), None)

    def add_commands(self, cli):
        for impl in reversed(self.pm.hook.register_commands.get_hookimpls()):
            try:
                impl.function(cli=cli)
            except Exception as exc:
                rec = self._record(self.pm.get_name(impl.plugin))
                if rec:
                    rec.error = f"register_commands failed: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}".replace("\n", " ")


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_plugin_manager(plugins_dirs: list[str] | None = None) -> PluginManager:
    """Forget loaded plugins and load them again (tests, ``--plugins-dir``)."""
    global _manager
    _manager = PluginManager(plugins_dirs)
    return _manager


def registry(kind: str) -> Registry:
    return get_plugin_manager().registry(kind)
