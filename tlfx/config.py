"""The feature configuration: what a store's features mean, and what a model needs its inputs made with.

One typed record, written into every store's attributes and every model file's ``config``, and one
:meth:`FeatureConfig.diff` used wherever two of them must agree (resuming a store, evaluate, predict, compare).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

# compared everywhere; ``precision`` is recorded but only compared exactly when resuming a store (bf16 and fp32
# features of one network agree to 0.01 accuracy points, docs/performance.md). INT8 is another network (quantized
# weights and activations), and OpenVINO computes differently from torch: both always count as differences.
COMPARED = ("backbone", "weights", "layers", "pooling", "image_size", "preprocess", "runtime")


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

    @classmethod
    def from_dict(cls, d: dict | None) -> FeatureConfig:
        """From a store's attributes or a model's ``config`` (extra keys are ignored, missing ones are None)."""
        d = d if isinstance(d, dict) else {}
        layers = d.get("layers")
        return cls(
            backbone=d.get("backbone"),
            weights=dict(d["weights"]) if isinstance(d.get("weights"), dict) else None,
            layers=tuple(layers) if isinstance(layers, (list, tuple)) else (() if layers is None else (layers,)),
            pooling=d.get("pooling"),
            image_size=d.get("image_size"),
            preprocess=dict(d["preprocess"]) if isinstance(d.get("preprocess"), dict) else None,
            precision=d.get("precision"),
            runtime=d.get("runtime"),
        )

    def to_dict(self) -> dict:
        """JSON-ready, with ``layers`` as a list (the form stores and model files hold)."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    def _value(self, key: str):
        return (self.runtime or "torch") if key == "runtime" else getattr(self, key)

    @staticmethod
    def _same(key: str, a, b) -> bool:
        if key == "weights":  # the file's content decides; where it lies does not
            a, b = a or {}, b or {}
            if a.get("sha256") or b.get("sha256"):
                return a.get("sha256") == b.get("sha256")
            return a.get("name") == b.get("name")
        if key == "runtime":
            return (a or "torch") == (b or "torch")
        if key == "int8":
            return (a == "int8") == (b == "int8")
        return a == b

    def diff(self, other: FeatureConfig, names=("model", "store"), precision: bool = False) -> list[str]:
        """Readable differences from ``other`` (empty when they agree): ``["image_size: model 64 vs store 96"]``."""
        left, right = (f"{n} " if n else "" for n in names)
        out = [f"{k}: {left}{_show(self._value(k))} vs {right}{_show(other._value(k))}"
               for k in COMPARED if not self._same(k, getattr(self, k), getattr(other, k))]
        if not self._same("precision" if precision else "int8", self.precision, other.precision):
            out.append(f"precision: {left}{_show(self.precision)} vs {right}{_show(other.precision)}")
        return out


def runtime_differences(a: dict | None, b: dict | None, names=("model", "store")) -> list[str]:
    """Only the runtime and INT8-vs-float differences of two configuration dicts (for key-by-key checkers)."""
    diffs = FeatureConfig.from_dict(a).diff(FeatureConfig.from_dict(b), names)
    return [d for d in diffs if d.startswith(("runtime:", "precision:"))]


def _show(v) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"{v.get('name')} (sha256 {str(v.get('sha256') or '')[:12] or 'none'})"
    if isinstance(v, tuple):
        v = list(v)
    return v if isinstance(v, str) else json.dumps(v, default=str)


FIELDS = tuple(f.name for f in fields(FeatureConfig))
