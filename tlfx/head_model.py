"""Model files of kind ``head``: a fitted head plus the backbone configuration and class names it was trained on.

The head is stored with ``skops.io`` inside the model zip (``head.skops``). Loading audits every type in it first
and refuses any type that is neither one of skops' default trusted types (numpy, scikit-learn) nor the class of
a registered head, so opening a model file never runs code from it. A pickle export (``.joblib``) exists for those
who want it and is opened only with ``trust=True`` (:func:`tlfx.api.load_model`).
"""

from __future__ import annotations

import os
import time
import zipfile

import numpy as np

from . import __version__
from .errors import TlfxError
from .models import Model, register_model_kind

HEAD_MEMBER = "head.skops"
# the part of a store's configuration that decides what features mean (what a model needs to run again)
MODEL_CONFIG_KEYS = ("backbone", "weights", "layers", "pooling", "image_size", "preprocess", "precision", "runtime")
# scikit-learn types the heads use that skops does not trust by default, but rebuilds from plain arrays only
EXTRA_TRUSTED = ("sklearn.tree._tree.Tree",)


class HeadModel(Model):
    """A head fitted on cached features. ``estimator`` is the scikit-learn head; ``meta`` its JSON record."""

    kind = "head"

    def __init__(self, meta: dict, estimator):
        super().__init__(meta)
        self.estimator = estimator
        self._computer = None

    @classmethod
    def from_estimator(cls, est, head: str, params: dict, config: dict, class_names, extra: dict | None = None,
                       store=None) -> HeadModel:
        """Wrap a fitted head with its record: head name, parameters, backbone config, class names (+ ``extra``)."""
        meta = {
            "kind": cls.kind,
            "name": head,
            "head": head,
            "params": {k: _plain(v) for k, v in (params or {}).items()},
            "all_params": {k: _plain(v) for k, v in est.get_params(deep=False).items()},
            "class_names": list(class_names),
            "config": {k: (config or {}).get(k) for k in MODEL_CONFIG_KEYS},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "tlfx_version": __version__,
        }
        if store is not None:
            a = store.attrs
            meta["train_store"] = {"path": os.path.abspath(store.path), "dataset": a.get("dataset"),
                                   "split": a.get("split"), "dataset_fingerprint": a.get("dataset_fingerprint"),
                                   "n": len(store)}
        meta.update(extra or {})
        return cls(meta, est)

    # ------------------------------------------------------------------------------------------ files
    def save_members(self, z: zipfile.ZipFile):
        import skops.io as sio

        z.writestr(HEAD_MEMBER, sio.dumps(self.estimator))

    @classmethod
    def load(cls, z: zipfile.ZipFile, meta: dict, trust: bool = False) -> HeadModel:
        import skops.io as sio

        where = getattr(z, "filename", None) or "model"
        data = cls.read_member(z, HEAD_MEMBER, "fit it again")
        try:
            untrusted = sio.get_untrusted_types(data=data)
        except Exception as exc:
            raise TlfxError(f"model {where!r}: {HEAD_MEMBER} is not a readable skops file ({type(exc).__name__})") from None
        allowed = set(trusted_head_types())
        refused = sorted(t for t in untrusted if t not in allowed)
        if refused and not trust:
            raise TlfxError(f"model {where!r} contains type {refused[0]!r}, which is not a registered head class or a "
                            f"scikit-learn/numpy type; refusing to load it (it could run code). Install the plugin "
                            f"that defines it, or pass --trust if you made the file yourself")
        est = sio.loads(data, trusted=sorted(untrusted) if trust else sorted(t for t in untrusted if t in allowed))
        return cls(meta, est)

    def export_joblib(self, path: str) -> str:
        """Write a pickle (joblib) copy: faster to load, but runs code when loaded; open it only with ``trust=True``."""
        import joblib

        tmp = f"{path}.tmp{os.getpid()}"
        joblib.dump({"tlfx_model": "head", "meta": {**self.meta, "kind": self.kind}, "estimator": self.estimator}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load_joblib(cls, path: str) -> HeadModel:
        import joblib

        obj = joblib.load(path)
        if not (isinstance(obj, dict) and obj.get("tlfx_model") == "head"):
            raise TlfxError(f"{path!r} is not a tlfx joblib export (made by tlfx fit --export-joblib)")
        return cls(obj["meta"], obj["estimator"])

    # ---------------------------------------------------------------------------------------- predict
    def predict_proba_features(self, X) -> np.ndarray:
        """Probabilities ``[n, len(class_names)]``; classes the head never saw in training get 0."""
        X = np.asarray(X)
        k = len(self.class_names)
        p = np.asarray(self.estimator.predict_proba(X), dtype=np.float64)
        classes = np.asarray(self.estimator.classes_).astype(np.int64)
        if k == 0 or (len(classes) == k and np.array_equal(classes, np.arange(k))):
            return p
        out = np.zeros((len(X), max(k, int(classes.max()) + 1)), dtype=np.float64)
        out[:, classes] = p
        return out

    def predict_proba_store(self, store):
        return self.predict_proba_features(store.features)

    def feature_computer(self, device=None):
        """The backbone that made the training features, rebuilt and verified (weights sha256) for new images."""
        if self._computer is None:
            self._computer = build_computer(self.config, device=device)
        return self._computer

    def predict_proba_images(self, paths: list[str]):
        from .extract import embed_images

        feats, ok, bad = embed_images(self.feature_computer(), list(paths))
        if not ok:
            return np.zeros((0, len(self.class_names))), ok, bad
        return self.predict_proba_features(feats), ok, bad


def build_computer(config: dict, device=None):
    """Rebuild a model's backbone from its recorded configuration; refuse weights that are not the recorded ones."""
    from .backbone import create_backbone
    from .extract import FeatureComputer

    name = config.get("backbone")
    if not name:
        raise TlfxError("the model records no backbone configuration, so it cannot run on images; use tlfx evaluate "
                        "on a feature store instead")
    w = config.get("weights") or {}
    if w.get("name") == "random-init":
        raise TlfxError(f"the model was trained on features of a randomly initialised {name!r}, which cannot be "
                        f"rebuilt; extract with pretrained or --weights file weights and fit again")
    want = w.get("sha256") or ""
    bb, first_error = None, None
    try:
        bb = create_backbone(name)
    except TlfxError as exc:
        first_error = exc
    if (bb is None or bb.weights.sha256 != want) and w.get("path") and os.path.isfile(w["path"]):
        bb = create_backbone(name, weights=w["path"])
    if bb is None:
        raise first_error
    if bb.weights.sha256 != want:
        raise TlfxError(f"backbone {name!r} weights here (sha256 {bb.weights.sha256[:16] or 'none'}) are not the ones "
                        f"the model was trained with ({w.get('name')}, sha256 {want[:16] or 'none'}, recorded path "
                        f"{w.get('path') or '-'}); place that weights file there and run again")
    precision = config.get("precision") or "auto"
    runtime = config.get("runtime") or "torch"  # the same runtime the features were made with (never mixed)
    if runtime == "openvino" and device in (None, "auto"):
        device = "cpu"
    try:
        return FeatureComputer(bb, config.get("layers") or "penultimate", config.get("pooling") or "avg",
                               config.get("image_size"), precision, device, runtime=runtime)
    except TlfxError:  # e.g. a bf16 model on a machine without bf16: same weights, fp32 is the safe choice
        if precision == "int8" or runtime != "torch":  # another precision would silently be another network
            raise
        return FeatureComputer(bb, config.get("layers") or "penultimate", config.get("pooling") or "avg",
                               config.get("image_size"), "fp32", device)


def trusted_head_types() -> list[str]:
    """Types a head model file may hold beyond skops' defaults: the registered heads' classes."""
    from .heads import head_types

    return sorted({*head_types(), *EXTRA_TRUSTED})


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    return v


register_model_kind("head", HeadModel)
