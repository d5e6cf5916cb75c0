"""tlfx: transfer learning on images, honestly measured.

Run a frozen pretrained CNN once, cache its embeddings in HDF5, train pluggable heads on them in seconds, and
compare them with a full fine-tune in one report. Backbones, heads, datasets and commands are pluggy plugins.

Heavy modules (torch, timm) are imported on first use, so ``import tlfx`` and plugin discovery stay fast.
"""

import importlib

__version__ = "0.1.0"

from .errors import TlfxError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402

_LAZY = {
    "create_backbone": "backbone",
    "list_backbones": "backbone",
    "list_datasets": "datasets",
    "load_dataset": "datasets",
    "extract": "extraction",
    "FeatureStore": "store",
    "get_plugin_manager": "plugins",
    "load_model": "api",
    "fit": "api",
    "evaluate": "api",
    "predict": "api",
    "list_heads": "heads",
    "create_head": "heads",
    "Embedder": "embedder",
    "combine_stores": "combine",
}

__all__ = ["__version__", "hookimpl", "TlfxError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tlfx' has no attribute {name!r}")
