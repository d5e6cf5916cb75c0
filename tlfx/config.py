"""The feature configuration: what a store's features mean, and what a model needs its inputs made with.

One typed record, written into every store's attributes and every model file's ``config``, and one
:meth:`FeatureConfig.diff` used wherever two of them must agree (resuming a store, evaluate, predict, compare).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

# what must agree between a model and its inputs. ``precision`` is recorded but only compared exactly when resuming
# a store (bf16 and fp32 features of one network agree to 0.01 accuracy points, docs/performance.md); INT8 is
# another network (quantized weights and activations) and always counts, as does OpenVINO vs torch. ``tta`` (test-time
# augmentation: ``flip`` averages the features of each image and its mirror) makes other features, so it counts too.
# ``components``: the sources of a combined store (``tlfx combine``), each compared on its own configuration and columns.
COMPARED = ("backbone", "weights", "layers", "pooling", "image_size", "preprocess", "runtime", "tta", "components")
RESUME = (*COMPARED, "precision")


@dataclass(frozen=True)
class FeatureConfig:
    """The backbone configuration behind a set of features."""

    backbone: str | None = None
    weights: dict | None = None  # {"name", "sha256", "path"}
    layers: tuple = ()
    pooling: str | None = None
    image_size: int | None = None
    preprocess: dict | None = None
    precision: str | None = None
    runtime: str | None = None  # torch or openvino; None (records older than the OpenVINO runtime) means torch
    tta: str | None = None  # test-time augmentation: none or flip; None (records older than TTA) means none
    # a combined store's sources (tlfx combine), in column order: ({"config": FeatureConfig dict, "columns": [a, b],
    # "source": {"name", "sha256"}}, ...); () for the features of one backbone (and records older than combining)
    components: tuple = ()

    @classmethod
    def from_dict(cls, d: dict | None) -> FeatureConfig:
        """From a store's attributes or a model's ``config`` (extra keys are ignored, missing ones are None)."""
        d = d if isinstance(d, dict) else {}
        layers, comps = d.get("layers"), d.get("components")
        return cls(
            backbone=d.get("backbone"),
            weights=dict(d["weights"]) if isinstance(d.get("weights"), dict) else None,
            layers=tuple(layers) if isinstance(layers, (list, tuple)) else (() if layers is None else (layers,)),
            pooling=d.get("pooling"),
            image_size=d.get("image_size"),
            preprocess=dict(d["preprocess"]) if isinstance(d.get("preprocess"), dict) else None,
            precision=d.get("precision"),
            runtime=d.get("runtime"),
            tta=d.get("tta"),
            components=tuple(dict(c) for c in comps if isinstance(c, dict)) if isinstance(comps, (list, tuple)) else (),
        )

    def to_dict(self) -> dict:
        """JSON-ready, with ``layers`` as a list (the form stores and model files hold); ``components`` only when
        there are some, so the record of one backbone's features is what it was before combining existed."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        if self.components:
            d["components"] = [dict(c) for c in self.components]
        else:
            del d["components"]
        return d

    def _value(self, key: str):
        if key in DEFAULTS:
            return getattr(self, key) or DEFAULTS[key]
        return getattr(self, key)

    @staticmethod
    def _same(key: str, a, b) -> bool:
        if key == "weights":  # the file's name and content decide; where it lies does not
            a, b = a or {}, b or {}
            return (a.get("name"), a.get("sha256") or "") == (b.get("name"), b.get("sha256") or "")
        if key in DEFAULTS:
            return (a or DEFAULTS[key]) == (b or DEFAULTS[key])
        if key == "int8":
            return (a == "int8") == (b == "int8")
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    def diff(self, other: FeatureConfig, names=("model", "store"), keys=COMPARED) -> list[str]:
        """Readable differences from ``other`` on ``keys`` (empty when they agree), INT8 vs float always:
        ``["image_size: model 64 vs store 96"]``."""
        left, right = (f"{n} " if n else "" for n in names)
        out = [f"{k}: {left}{_show(self._value(k))} vs {right}{_show(other._value(k))}"
               for k in keys if k not in ("precision", "components") and not self._same(k, getattr(self, k), getattr(other, k))]
        if "components" in keys:
            out += _components_diff(self.components, other.components, names, keys)
        if not self._same("precision" if "precision" in keys else "int8", self.precision, other.precision):
            out.append(f"precision: {left}{_show(self.precision)} vs {right}{_show(other.precision)}")
        return out


# what a record without the field means (it was written before the field existed)
DEFAULTS = {"runtime": "torch", "tta": "none"}


def _columns(c: dict):
    cols = c.get("columns")
    return list(cols) if isinstance(cols, (list, tuple)) else None


def components_summary(components) -> str:
    """``efficientnet_lite0[0:1280] + pixels_grey[1280:2304]`` (``none`` for the features of one backbone)."""
    parts = []
    for c in components:
        cols = _columns(c) or ["?", "?"]
        name = (c.get("config") or {}).get("backbone") if isinstance(c.get("config"), dict) else None
        parts.append(f"{name}[{cols[0]}:{cols[-1]}]")
    return " + ".join(parts) or "none"


def _components_diff(a, b, names, keys) -> list[str]:
    """How two combinations differ: their sources (backbone and columns, in order), else the first configuration
    keys that differ within a source. The source files themselves (name, sha256) are provenance, never compared."""
    if not a and not b:
        return []
    left, right = (f"{n} " if n else "" for n in names)
    if len(a) != len(b) or any(_columns(x) != _columns(y) for x, y in zip(a, b)):
        return [f"components: {left}{components_summary(a)} vs {right}{components_summary(b)}"]
    sub = tuple(k for k in keys if k != "components")
    out = []
    for i, (x, y) in enumerate(zip(a, b), 1):
        cx, cy = FeatureConfig.from_dict(x.get("config")), FeatureConfig.from_dict(y.get("config"))
        out += [f"component {i} {d}" for d in cx.diff(cy, names=names, keys=sub)]
    return out


MAX_COMPONENTS = 64


def components_problem(value) -> str | None:
    """What is wrong with a recorded ``components`` value (None when it is well-formed): a list of at most
    :data:`MAX_COMPONENTS` objects, each with a ``config`` object (no nested components) and ``columns`` ``[a, b]``,
    integers with ``0 <= a < b``, following each other from 0."""
    if not isinstance(value, list):
        return f"components should be a JSON list, found {type(value).__name__}"
    if len(value) > MAX_COMPONENTS:
        return f"components lists {len(value)} sources (at most {MAX_COMPONENTS})"
    end = 0
    for i, c in enumerate(value):
        if not isinstance(c, dict) or not isinstance(c.get("config"), dict):
            return f"component {i + 1} is not an object with a 'config' object"
        if c["config"].get("components"):
            return f"component {i + 1} is itself combined (components are recorded flat)"
        cols = c.get("columns")
        if not (isinstance(cols, list) and len(cols) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in cols) and cols[0] == end < cols[1]):
            return f"component {i + 1} has columns {str(cols)[:40]}, expected [{end}, b] with b > {end}"
        end = cols[1]
        if not isinstance(c.get("source", {}), dict):
            return f"component {i + 1} has a 'source' that is not an object"
    return None


def _show(v) -> str:
    if isinstance(v, dict) and "sha256" in v:
        sha = str(v.get("sha256") or "")[:12]
        return f"{v.get('name')} (sha256 {sha})" if sha else str(v.get("name"))
    if isinstance(v, tuple):
        v = list(v)
    return v if isinstance(v, str) else json.dumps(v, default=str)


FIELDS = tuple(f.name for f in fields(FeatureConfig))


DTYPES = ("float32", "float16")
POOLINGS = ("avg", "max")
RUNTIMES = ("auto", "torch", "openvino")
TTAS = ("none", "flip")  # test-time augmentation at extraction: flip averages an image's and its mirror's features
IMAGE_SIZES = (16, 2048)  # --image-size: smaller leaves no feature map; larger needs tens of GB per batch


@dataclass
class ExtractOptions:
    """Every choice of one extraction run, validated once by :meth:`validate`.

    ``tlfx extract`` builds it from its options, :func:`tlfx.extract` from its keywords, and the Ray engine sends
    it to its workers as is. ``backbone`` and ``data`` may be objects (a Backbone, an ImageDataset) in the Python
    API; ``layers`` a string (``penultimate``, ``multi``, ``a,b``) or a list of module names.
    """

    backbone: object = "efficientnet_lite0"
    data: object = "digits"
    out: str = "features.h5"
    split: str | None = None
    root: str | None = None
    limit: int | None = None
    layers: object = "penultimate"
    pooling: str = "avg"
    image_size: int | None = None
    weights: str | None = None
    batch_size: int = 64
    workers: int | None = None
    precision: str = "auto"
    runtime: str = "torch"  # the Python API's default; the command line's is auto (OpenVINO on a CPU when installed)
    device: str | None = None
    dtype: str = "float32"
    tta: str = "none"
    part_size: int | None = None
    overwrite: bool = False
    update: bool = False  # bring a complete store up to date with a changed image folder (tlfx.update)
    strict: bool = False
    compile: bool = False
    progress: bool = False

    def validate(self) -> ExtractOptions:
        """One line naming the bad value and the valid range (exit 2 on the command line); returns self."""
        from .errors import TlfxError

        if self.dtype not in DTYPES:
            raise TlfxError(f"unknown dtype {self.dtype!r}; valid choices: {', '.join(DTYPES)}")
        if self.runtime not in RUNTIMES:
            raise TlfxError(f"unknown runtime {self.runtime!r}; valid choices: {', '.join(RUNTIMES)}")
        if self.tta not in TTAS:
            raise TlfxError(f"unknown tta {self.tta!r}; valid choices: {', '.join(TTAS)}")
        if self.pooling not in POOLINGS:
            raise TlfxError(f"unknown pooling {self.pooling!r}; valid choices: {', '.join(POOLINGS)}")
        if self.batch_size < 1:
            raise TlfxError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.image_size is not None and not IMAGE_SIZES[0] <= self.image_size <= IMAGE_SIZES[1]:
            raise TlfxError(f"--image-size must be {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} pixels, got {self.image_size}")
        if self.part_size is not None and self.part_size < 1:
            raise TlfxError(f"--part-size must be at least 1, got {self.part_size}")
        if self.update and self.overwrite:
            raise TlfxError("--update keeps the store's rows and --overwrite replaces them; pass one of the two")
        if self.workers is not None and self.workers < 0:
            raise TlfxError(f"--workers must be 0 or more, got {self.workers}")
        return self

    def options(self) -> dict:
        """The fields as keywords (for :func:`tlfx.extract` and the engines)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
