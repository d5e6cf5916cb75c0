"""tlfx: transfer learning on images, honestly measured.

Run a frozen pretrained CNN once, cache its embeddings in HDF5, train pluggable heads on them in seconds, and
compare them with a full fine-tune in one report. Backbones, heads, datasets and commands are pluggy plugins.
"""

__version__ = "0.1.0"

from .backbone import create_backbone, list_backbones  # noqa: E402
from .datasets import list_datasets, load_dataset  # noqa: E402
from .errors import TlfxError  # noqa: E402
from .extract import extract  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .plugins import get_plugin_manager  # noqa: E402
from .store import FeatureStore  # noqa: E402

__all__ = [
    "__version__",
    "hookimpl",
    "create_backbone",
    "list_backbones",
    "list_datasets",
    "load_dataset",
    "TlfxError",
    "extract",
    "get_plugin_manager",
    "FeatureStore",
]
