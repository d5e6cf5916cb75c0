"""The plugin manager: loads tlfx's own plugins (:data:`DEFAULT_PLUGINS`), the ``tlfx`` entry points and
plugins-dir files, all through the same hooks, and builds the registries.

A broken plugin never breaks tlfx: an import error, an unknown hook, an unknown ``register`` keyword or a
``register_*`` hook that raises is recorded on the plugin's :class:`PluginRecord` (``tlfx plugins`` shows it) and
the other plugins keep working. Two plugins registering one name make only that name unusable
(:class:`DuplicateNameError`, one line naming both and how to pick one with ``TLFX_LOAD_PLUGINS``).

Environment: ``TLFX_LOAD_PLUGINS=a,b`` loads only those external plugins (empty: none; tlfx's own always load),
``TLFX_TRACE_PLUGINS=1`` logs every plugin load, hook call and registration to stderr.
"""

from __future__ import annotations

import difflib
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
LOAD_PLUGINS_ENV = "TLFX_LOAD_PLUGINS"
TRACE_PLUGINS_ENV = "TLFX_TRACE_PLUGINS"
KINDS = ("backbone", "head", "dataset")
# tlfx's own plugins (the source folder plugins/, installed as the package tlfx_plugins): plugin name -> module.
# They load first, like any other plugin, and always (TLFX_LOAD_PLUGINS selects among the external ones).
DEFAULT_PLUGINS = {
    "torchvision": "tlfx_plugins.torchvision_backbones",
    "timm": "tlfx_plugins.timm_backbones",
    "efficientnet_lite": "tlfx_plugins.efficientnet_lite",
    "pixels": "tlfx_plugins.pixels",
    "datasets": "tlfx_plugins.datasets",
    "sklearn_heads": "tlfx_plugins.sklearn_heads",
    "linear_head": "tlfx_plugins.linear_head",
    "finetune": "tlfx_plugins.finetune",
}
# the keywords register() accepts per kind, besides name and factory (what tlfx reads from Entry.meta)
KEYWORDS = {
    "backbone": ("description", "weights_available", "takes_argument", "weights_status", "import_weights"),
    "head": ("description", "param_grid"),
    "dataset": ("description", "splits", "needs_argument", "argument"),
}
HOOK_NAMES = tuple(n for n in dir(hookspecs) if n.startswith("register_"))
# names are used in specs (NAME:ARG), comma-separated lists (--heads a,b) and file names: keep them plain
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # a factory given as "package.module:attribute"


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


_SOURCE_ROOT = Path(__file__).resolve().parents[1]


class _SourcePluginsFinder(importlib.abc.MetaPathFinder):
    """In a source checkout, ``tlfx_plugins`` is the ``plugins/`` folder beside this ``tlfx``, even when another
    checkout's editable install is on the path: ``PYTHONPATH=<checkout>`` then runs one tree's code throughout."""

    def find_spec(self, fullname, path=None, target=None):
        folder = _SOURCE_ROOT / "plugins"
        if fullname == "tlfx_plugins":
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
        if fullname.startswith("tlfx_plugins.") and fullname.count(".") == 1:
            return importlib.machinery.PathFinder.find_spec(fullname, [str(folder)])
        return None


def _is_source_checkout() -> bool:
    project = _SOURCE_ROOT / "pyproject.toml"
    try:
        return (_SOURCE_ROOT / "plugins" / "__init__.py").is_file() and 'name = "tlfx"' in project.read_text()
    except OSError:
        return False


if _is_source_checkout() and not any(isinstance(f, _SourcePluginsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourcePluginsFinder())


def trace(message: str):
    """Log ``message`` to stderr when ``TLFX_TRACE_PLUGINS`` is set (datasette's DATASETTE_TRACE_PLUGINS)."""
    if os.environ.get(TRACE_PLUGINS_ENV, "") not in ("", "0"):
        print(f"tlfx plugins: {message}", file=sys.stderr, flush=True)


def load_allow_list() -> set[str] | None:
    """The external plugins ``TLFX_LOAD_PLUGINS`` allows (None: unset, every plugin loads)."""
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


class DuplicateNameError(TlfxError):
    """Two plugins registered the same name for one kind (``plugins``: their names)."""

    plugins: tuple[str, ...] = ()


@dataclass
class PluginRecord:
    """One loaded, failed or skipped plugin as ``tlfx plugins`` lists it. ``kinds``: what it provides."""

    name: str
    source: str  # "tlfx <version>", "entry point (<dist> <version>)", or a file path
    module: str
    error: str | None = None
    kinds: list[str] = field(default_factory=list)
    skipped: str | None = None  # why it was not loaded (TLFX_LOAD_PLUGINS)
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    failed_import: bool = False

    @property
    def first_party(self) -> bool:
        return self.name in DEFAULT_PLUGINS and self.module == DEFAULT_PLUGINS[self.name]


@dataclass
class Entry:
    """One registered backbone, head or dataset.

    ``target`` is what the plugin registered: a callable, or a ``"module:attribute"`` string imported on first use
    of :attr:`factory` (so that listing heads does not import scikit-learn).
    """

    name: str
    target: object
    plugin: str
    description: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def factory(self):
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            try:
                obj = importlib.import_module(module)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except Exception as exc:
                raise TlfxError(f"{self.name!r} of plugin {self.plugin!r}: cannot import {self.target!r} "
                                f"({_one_line(exc)}); reinstall the plugin or report it to its authors") from None
            if not callable(obj):
                raise TlfxError(f"{self.name!r} of plugin {self.plugin!r}: {self.target!r} is not callable")
            self.target = obj
        return self.target

    @property
    def type_name(self) -> str | None:
        """``module.QualName`` of a registered class (without importing a ``"module:Class"`` string), else None."""
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            return f"{module}.{attr}"
        if isinstance(self.target, type):
            return f"{self.target.__module__}.{self.target.__qualname__}"
        return None


class Registry:
    """Names to factories for one kind of plugin (timm's ``list_models``/``create_model`` shape).

    A name two plugins registered stays listed (:meth:`clash`) but :meth:`get` refuses it with
    :class:`DuplicateNameError`; an unknown name's error mentions plugins that failed and may have provided it.
    """

    def __init__(self, kind: str, failed: dict[str, str] | None = None, externals: list[str] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._clashes: dict[str, list[str]] = {}
        self._failed = dict(failed or {})  # plugin -> error, for unknown-name messages
        self._externals = list(externals or [])  # loaded external plugins, for the TLFX_LOAD_PLUGINS hint

    def register_for(self, plugin: str):
        kind, allowed = self.kind, KEYWORDS.get(self.kind, ("description",))

        def register(name, factory, **keywords):
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise ValueError(f"{kind} name {name!r} is invalid: use letters, digits, '_', '-', '.' "
                                 f"(no ':' or ',' or spaces)")
            for key in keywords:
                if key not in allowed:
                    close = difflib.get_close_matches(key, allowed, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise TypeError(f"{kind} {name!r}: unknown keyword {key!r}; {hint}valid: {', '.join(allowed)}")
            if not (callable(factory) or isinstance(factory, str) and _IMPORT_PATH.match(factory)):
                raise TypeError(f"{kind} {name!r}: factory {factory!r} is not callable (nor a 'module:attribute' "
                                f"string naming a callable)")
            description = keywords.pop("description", "")
            if not isinstance(description, str):
                raise TypeError(f"{kind} {name!r}: description must be a str, got {type(description).__name__}")
            if name in self._entries:
                owners = self._clashes.setdefault(name, [self._entries[name].plugin])
                owners.append(plugin)
                trace(f"{plugin} registered {kind} {name!r}, already registered by {owners[0]!r}: a clash")
                return
            self._entries[name] = Entry(name, factory, plugin, description, keywords)
            trace(f"{plugin} registered {kind} {name!r}")

        return register

    def _discard(self, plugin: str, keep: set):
        """Drop what ``plugin`` registered, except the names in ``keep`` (rollback of a failed hook)."""
        for name in [n for n, e in self._entries.items() if e.plugin == plugin and n not in keep]:
            del self._entries[name]
        for name, owners in list(self._clashes.items()):
            if plugin in owners and name not in keep:
                owners.remove(plugin)
            if len(owners) < 2:
                del self._clashes[name]

    def names(self) -> list[str]:
        """Every registered name, clashing ones included."""
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Every registered entry (for a clashing name: the first plugin's; see :meth:`clash`)."""
        return [self._entries[n] for n in self.names()]

    def clash(self, name: str) -> list[str]:
        """The plugins that registered ``name`` when more than one did, else ``[]``."""
        return list(self._clashes.get(name, []))

    def clashes(self) -> dict[str, list[str]]:
        return {n: list(p) for n, p in sorted(self._clashes.items())}

    def clash_error(self, name: str) -> DuplicateNameError:
        """The one-line error for a name several plugins registered: both plugins and how to pick one."""
        owners = self._clashes[name]
        ours = [o for o in owners if o in DEFAULT_PLUGINS]

        def allow(keep):  # the loaded external plugins, less the clashing ones other than ``keep``
            return ",".join(p for p in self._externals if p == keep or p not in owners) or "''"

        if ours:  # tlfx's own plugins always load: the external one must go or rename its entry
            how = (f"tlfx's own plugin {ours[0]!r} always loads: leave the other out with "
                   f"TLFX_LOAD_PLUGINS={allow(None)}")
        else:
            how = "pick one with " + " or ".join(f"TLFX_LOAD_PLUGINS={allow(k)} (keeps {k!r})" for k in owners)
        exc = DuplicateNameError(
            f"{self.kind} {name!r} is registered twice: by plugin {owners[0]!r} and by plugin {owners[1]!r}; "
            f"{how}, or uninstall or rename one of them")
        exc.plugins = tuple(owners)
        return exc

    def get(self, name: str) -> Entry:
        if name in self._clashes:
            raise self.clash_error(name)
        try:
            return self._entries[name]
        except KeyError:
            exc = unknown_choice(self.kind, name, self._entries)
            if self._failed:
                notes = "; ".join(f"plugin {p!r} failed to load: {e}; it may have provided it"
                                  for p, e in sorted(self._failed.items()))
                exc = TlfxError(f"{exc.message}; {notes}")
            raise exc from None

    def __contains__(self, name):
        return name in self._entries


class PluginManager:
    """Loads plugins once per process and keeps their registries.

    Order: :data:`DEFAULT_PLUGINS`, then ``tlfx`` entry points (sorted by name), then plugins-dir files.
    ``TLFX_LOAD_PLUGINS`` (comma-separated names) limits the external ones; tlfx's own always load.
    """

    def __init__(self, plugins_dirs: list[str] | None = None):
        self.pm = pluggy.PluginManager("tlfx")
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self._registries: dict[str, Registry] = {}
        self.allow = load_allow_list()
        self._load_defaults()
        self._load_entry_points()
        dirs = list(plugins_dirs or [])
        env = os.environ.get(PLUGINS_DIR_ENV)
        if env:
            dirs += [d for d in env.split(os.pathsep) if d]
        for d in dirs:
            self.load_directory(d)

    def _allowed(self, rec: PluginRecord) -> bool:
        if self.allow is None or rec.name in self.allow:
            return True
        rec.skipped = f"not in {LOAD_PLUGINS_ENV}"
        self.records.append(rec)
        trace(f"skip plugin {rec.name!r} ({rec.module}): not in {LOAD_PLUGINS_ENV}={os.environ[LOAD_PLUGINS_ENV]!r}")
        return False

    def _add(self, rec: PluginRecord, load):
        """Import a plugin with ``load()`` and register it; any failure goes on ``rec``, never up."""
        trace(f"load plugin {rec.name!r} from {rec.module} [{rec.source}]")
        try:
            module = load()
            self.pm.register(module, name=rec.name)
            rec.error = _check_hooks(module)
            rec.hooks = sorted(h.name for h in (self.pm.get_hookcallers(module) or []))
            rec.version = rec.version or getattr(module, "__version__", None)
        except Exception as exc:  # a broken plugin must not break the CLI
            rec.error = _one_line(exc)
            rec.failed_import = True
            trace(f"plugin {rec.name!r} failed to load: {rec.error}")
        self.records.append(rec)

    def _load_defaults(self):
        from . import __version__

        for name, module in DEFAULT_PLUGINS.items():
            rec = PluginRecord(name, f"tlfx {__version__}", module, version=__version__)
            self._add(rec, lambda m=module: importlib.import_module(m))

    def _load_entry_points(self):
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        seen = set()
        for ep in sorted(eps, key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            if (ep.name, ep.value) in seen or (dist is not None and dist.name == "tlfx"):
                continue  # tlfx's own plugins load from DEFAULT_PLUGINS (old installs declared them as entry points)
            seen.add((ep.name, ep.value))
            source = f"entry point ({dist.name} {dist.version})" if dist else "entry point"
            rec = PluginRecord(ep.name, source, ep.value, version=dist.version if dist else None)
            if self._allowed(rec):
                self._add(rec, ep.load)

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
            rec = PluginRecord(file.stem, str(file), f"{LOCAL_PACKAGE}.{file.stem}")
            if self._allowed(rec):
                self._add(rec, lambda f=file, r=rec: _exec_local(f, r.name, r.module))
        self._registries.clear()

    def externals(self) -> list[str]:
        """Names of the loaded plugins that are not tlfx's own."""
        return [r.name for r in self.records if not r.first_party and not r.skipped]

    def registry(self, kind: str) -> Registry:
        """The registry of ``kind`` ('backbone', 'head', 'dataset'), built on first use.

        A plugin whose ``register_<kind>s`` hook raises keeps nothing of that kind: its error goes on its record
        and the other plugins' entries stay usable. A name registered twice is marked as a clash.
        """
        if kind not in KINDS:
            raise unknown_choice("plugin kind", kind, KINDS)
        if kind not in self._registries:
            failed = {r.name: r.error for r in self.records if r.failed_import}
            reg = Registry(kind, failed, self.externals())
            hook_name = f"register_{kind}s"
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():  # load order (pluggy calls LIFO)
                plugin_name = self.pm.get_name(impl.plugin)
                rec = self._record(plugin_name)
                before = set(reg.names())
                trace(f"call {hook_name} of plugin {plugin_name!r}")
                try:
                    impl.function(register=reg.register_for(plugin_name))
                except Exception as exc:  # one broken plugin must not take the others down
                    reg._discard(plugin_name, keep=before)
                    error = f"{hook_name} failed: {_one_line(exc)}"
                    reg._failed[plugin_name] = error
                    if rec:
                        rec.error = _join(rec.error, error)
                    trace(f"plugin {plugin_name!r}: {error}")
                    continue
                if rec and any(e.plugin == plugin_name for e in reg.entries()):
                    _add_kind(rec, kind)
            for name, owners in reg.clashes().items():
                for owner in owners:
                    rec = self._record(owner)
                    if rec:
                        _add_kind(rec, kind)
                        rec.error = _join(rec.error, reg.clash_error(name).message)
            self._registries[kind] = reg
        return self._registries[kind]

    def _record(self, name):
        return next((r for r in self.records if r.name == name and not r.skipped), None)

    def add_commands(self, cli):
        """Let plugins add click commands. A plugin may not replace a command that exists (core or earlier plugin)."""
        for impl in self.pm.hook.register_commands.get_hookimpls():  # load order: first-party first
            plugin_name = self.pm.get_name(impl.plugin)
            rec = self._record(plugin_name)
            before = dict(cli.commands)
            trace(f"call register_commands of plugin {plugin_name!r}")
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
            added = [n for n in cli.commands if n not in before]
            for n in added:
                trace(f"{plugin_name} registered command {n!r}")
            if rec and added:
                _add_kind(rec, "command")


def _exec_local(file: Path, name: str, module_name: str):
    """Import a plugins-dir file as ``tlfx_local_plugins.<stem>`` (so classes defined there pickle)."""
    package = importlib.import_module(LOCAL_PACKAGE)
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    setattr(package, name, module)
    spec.loader.exec_module(module)
    return module


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
