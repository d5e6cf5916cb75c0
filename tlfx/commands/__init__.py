"""Core commands: every module here exposes ``COMMANDS``, a list of click commands, collected in name order."""

import importlib
import pkgutil

ALL = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        ALL += getattr(importlib.import_module(f"{__name__}.{_info.name}"), "COMMANDS", [])
