"""The plugin manager: loads the ``tlfx`` entry points (first-party plugins included) and builds registries.

A broken plugin never breaks tlfx: an import error, an unknown hook or a ``register_*`` hook that raises is
recorded on the plugin's :class:`PluginRecord` (``tlfx plugins`` shows it) and the other plugins keep working.
Two plugins registering the same name are the one hard failure: :class:`DuplicateNameError`, one line naming both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from . import hookspecs
from .errors import TlfxError, unknown_choice

ENTRY_POINT_GROUP = "tlfx"
PLUGINS_DIR_ENV = "TLFX_PLUGINS_DIR"
KINDS = ("backbone", "head", "dataset")
HOOK_NAMES = tuple(n for n in dir(hookspecs) if n.startswith("register_"))
# names are used in specs (NAME:ARG), comma-separated lists (--heads a,b) and file names: keep them plain
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


LOCAL_PACKAGE = "tlfx_local_plugins"  # plugins-dir files load as tlfx_local_plugins.<file stem>
_LOCAL_FILES_ENV = "_TLFX_LOCAL_PLUGIN_FILES"  # stem=path pairs, inherited by worker processes


class _LocalPluginFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``tlfx_local_plugins.<stem>`` importable, so pickle can refer to classes defined in a plugins-dir file.

    DataLoader workers started with spawn or forkserver (macOS, Windows, Python >= 3.14 everywhere) unpickle the
    dataset by importing its class's module; they find the file through the environment they inherit.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname == LOCAL_PACKAGE:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if fullname.startswith(LOCAL_PACKAGE + ".") and fullname.count(".") == 1:
            file = _local_plugin_file(fullname.split(".", 1)[1])
            if file:
                return importlib.util.spec_from_file_location(fullname, file)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []


def _local_plugin_file(stem: str) -> str | None:
    pairs = dict(p.split("=", 1) for p in os.environ.get(_LOCAL_FILES_ENV, "").split(os.pathsep) if "=" in p)
    if stem in pairs and os.path.isfile(pairs[stem]):
        return pairs[stem]
    for d in os.environ.get(PLUGINS_DIR_ENV, "").split(os.pathsep):
        if d and os.path.isfile(os.path.join(d, f"{stem}.py")):
            return os.path.join(d, f"{stem}.py")
    return None


if not any(isinstance(f, _LocalPluginFinder) for f in sys.meta_path):
    sys.meta_path.append(_LocalPluginFinder())


class DuplicateNameError(TlfxError):
    """Two plugins registered the same name for one kind (``plugins``: their names)."""

    plugins: tuple[str, ...] = ()


@dataclass
class PluginRecord:
    """One loaded (or failed) plugin as ``tlfx plugins`` lists it. ``kinds``: what it provides."""

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
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise ValueError(f"{self.kind} name {name!r} is invalid: use letters, digits, '_', '-', '.' "
                                 f"(no ':' or ',' or spaces)")
            if not callable(factory):
                raise TypeError(f"{self.kind} {name!r}: factory {factory!r} is not callable")
            if not isinstance(description, str):
                raise TypeError(f"{self.kind} {name!r}: description must be a str, got {type(description).__name__}")
            if name in self._entries:
                other = self._entries[name].plugin
                exc = DuplicateNameError(
                    f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}; "
                    f"uninstall or rename one of them"
                )
                exc.plugins = (other, plugin)
                raise exc
            self._entries[name] = Entry(name, factory, plugin, description, meta)

        return register

    def _discard(self, plugin: str, keep: set):
        """Drop what ``plugin`` registered, except the names in ``keep`` (rollback of a failed hook)."""
        for name in [n for n, e in self._entries.items() if e.plugin == plugin and n not in keep]:
            del self._entries[name]

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
                rec.error = _check_hooks(module)
            except Exception as exc:  # a broken plugin must not break the CLI
                rec.error = _one_line(exc)
            self.records.append(rec)

    def load_directory(self, directory: str):
        """Load every ``*.py`` file in ``directory`` as a plugin (for development, without packaging).

        Files whose name starts with ``_`` are not plugins but helpers a plugin imports: ``from . import _helper``.
        """
        path = Path(directory)
        if not path.is_dir():
            raise TlfxError(f"plugins directory {directory!r} does not exist; pass an existing directory")
        files = sorted(path.glob("*.py"))
        for file in files:  # helpers too, so that plugins can `from . import _helper`
            _remember_local_file(file.stem, file)
            sys.modules.pop(f"{LOCAL_PACKAGE}.{file.stem}", None)  # this directory's version, not a stale one
        for file in files:
            if file.name.startswith("_"):
                continue
            name = file.stem
            rec = PluginRecord(name, str(file), f"{LOCAL_PACKAGE}.{name}")
            try:
                package = importlib.import_module(LOCAL_PACKAGE)
                spec = importlib.util.spec_from_file_location(rec.module, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[rec.module] = module
                setattr(package, name, module)
                spec.loader.exec_module(module)
                self.pm.register(module, name=name)
                rec.error = _check_hooks(module)
            except Exception as exc:
                rec.error = _one_line(exc)
            self.records.append(rec)
        self._registries.clear()

    def registry(self, kind: str) -> Registry:
        """The registry of ``kind`` ('backbone', 'head', 'dataset'), built on first use.

        A plugin whose ``register_<kind>s`` hook raises keeps nothing of that kind: its error goes on its record
        and the other plugins' entries stay usable. A name registered twice raises :class:`DuplicateNameError`.
        """
        if kind not in KINDS:
            raise unknown_choice("plugin kind", kind, KINDS)
        if kind not in self._registries:
            reg = Registry(kind)
            hook = getattr(self.pm.hook, f"register_{kind}s")
            for impl in hook.get_hookimpls():  # load order (pluggy lists impls as registered, calls them LIFO)
                plugin_name = self.pm.get_name(impl.plugin)
                rec = self._record(plugin_name)
                before = set(reg.names())
                try:
                    impl.function(register=reg.register_for(plugin_name))
                except DuplicateNameError:
                    raise
                except Exception as exc:  # one broken plugin must not take the others down
                    reg._discard(plugin_name, keep=before)
                    if rec:
                        rec.error = _join(rec.error, f"register_{kind}s failed: {_one_line(exc)}")
                    continue
                if rec and any(e.plugin == plugin_name for e in reg.entries()):
                    _add_kind(rec, kind)
            self._registries[kind] = reg
        return self._registries[kind]

    def _record(self, name):
        return next((r for r in self.records if r.name == name), None)

    def add_commands(self, cli):
        """Let plugins add click commands. A plugin may not replace a command that exists (core or earlier plugin)."""
        for impl in self.pm.hook.register_commands.get_hookimpls():  # load order: entry points first
            plugin_name = self.pm.get_name(impl.plugin)
            rec = self._record(plugin_name)
            before = dict(cli.commands)
            try:
                impl.function(cli=cli)
            except Exception as exc:
                cli.commands.clear()
                cli.commands.update(before)
                if rec:
                    rec.error = _join(rec.error, f"register_commands failed: {_one_line(exc)}")
                continue
            clashes = sorted(n for n, c in before.items() if cli.commands.get(n) is not c)
            for n in clashes:
                cli.commands[n] = before[n]
            if rec and clashes:
                owners = ", ".join(f"{n!r} (from {_command_owner(before[n])})" for n in clashes)
                rec.error = _join(rec.error, f"register_commands: command {owners} already exists; "
                                             f"plugin {plugin_name!r} must use another name")
            if rec and any(n not in before for n in cli.commands):
                _add_kind(rec, "command")


def _command_owner(cmd) -> str:
    module = getattr(getattr(cmd, "callback", None), "__module__", "") or ""
    return "tlfx" if module.startswith("tlfx.") else module or "?"


def _remember_local_file(stem: str, file: Path):
    pairs = [p for p in os.environ.get(_LOCAL_FILES_ENV, "").split(os.pathsep) if p and not p.startswith(f"{stem}=")]
    os.environ[_LOCAL_FILES_ENV] = os.pathsep.join([*pairs, f"{stem}={file.resolve()}"])


def _add_kind(rec: PluginRecord, kind: str):
    order = (*KINDS, "command")
    rec.kinds = sorted({*rec.kinds, kind}, key=lambda k: order.index(k) if k in order else len(order))


def _join(old: str | None, new: str) -> str:
    return f"{old}; {new}" if old else new


def _check_hooks(module) -> str | None:
    """Problems a plugin author would otherwise never see: undecorated or misspelled hooks, or no hooks at all."""
    marker = f"{hookspecs.hookimpl.project_name}_impl"
    problems, found = [], 0
    for attr in dir(module):
        obj = getattr(module, attr, None)
        if not callable(obj):
            continue
        opts = getattr(obj, marker, None)
        if isinstance(opts, dict):
            name = opts.get("specname") or attr
            if name in HOOK_NAMES:
                found += 1
            else:
                problems.append(f"unknown hook {name!r} (valid hooks: {', '.join(HOOK_NAMES)})")
        elif attr in HOOK_NAMES and getattr(obj, "__module__", None) == module.__name__:
            problems.append(f"{attr} is not decorated with @tlfx.hookimpl, so tlfx never calls it")
    if not found and not problems:
        problems.append("defines no tlfx hooks; decorate register_* functions with @tlfx.hookimpl")
    return "; ".join(problems) or None


def _one_line(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}".replace("\n", " ")


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (entry points plus ``TLFX_PLUGINS_DIR``), loaded on first use."""
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
    """The registry of one kind ('backbone', 'head', 'dataset') of the process-wide plugin manager."""
    return get_plugin_manager().registry(kind)
