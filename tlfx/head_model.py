"""Model files of kind ``head``: a fitted head plus the backbone configuration and class names it was trained on.

The head is stored with ``skops.io`` inside the model zip (``head.skops``). Loading audits every type in it first
and refuses any type that is neither one of skops' default trusted types (numpy, scikit-learn) nor the class of
a registered head, so opening a model file never runs code from it; the refusal names every refused type and the
``--trust-type`` flags that would accept exactly those. A pickle export (``.joblib``) exists for those who want it
and is opened only with ``trust_pickle=True`` / ``--trust-pickle`` (:func:`tlfx.api.load_model`).
"""

from __future__ import annotations

import io
import os
import time
import zipfile

import numpy as np

from . import __version__
from . import models as _models
from .config import FeatureConfig
from .errors import TlfxError
from .models import Model, Trust, register_model_kind, write_atomically

HEAD_MEMBER = "head.skops"
# scikit-learn types the heads use that skops does not trust by default, but rebuilds from plain arrays only
# and tlfx's own feature normaliser (numpy arrays and plain values only), which may sit in front of any head
EXTRA_TRUSTED = ("sklearn.tree._tree.Tree", "tlfx.normalize.FeatureNormalizer")
# modules of tlfx's own heads before they moved to tlfx_plugins (their classes were closures, not importable now)
OLD_FIRST_PARTY_MODULES = (["plugins", "sklearn_heads"], ["plugins", "linear_head"], ["plugins", "head_base"])
# the skops member is itself a zip (schema.json + one .npy per array): bound what it may unpack to
MAX_SKOPS_MEMBERS = 100_000
MAX_SKOPS_BYTES = _models.MAX_MEMBER_BYTES


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
        """Wrap a fitted head with its record: head name, parameters, backbone config, class names (+ ``extra``).

        A head behind a feature normalisation (a :func:`tlfx.normalize.with_normalizer` Pipeline) records the
        head's own parameters and ``normalize`` (``"power"``, ``"pca-whiten:128"``; ``"none"`` otherwise)."""
        from .normalize import split

        head_est, normalize = split(est)
        meta = {
            "kind": cls.kind,
            "name": head,
            "head": head,
            "params": {k: _plain(v) for k, v in (params or {}).items()},
            "all_params": {k: _plain(v) for k, v in head_est.get_params(deep=False).items()},
            "normalize": normalize,
            "class_names": list(class_names),
            "config": FeatureConfig.from_dict(config).to_dict(),
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
    def load(cls, z: zipfile.ZipFile, meta: dict, trust: Trust = Trust()) -> HeadModel:
        import skops.io as sio

        where = getattr(z, "filename", None) or "model"
        data = cls.read_member(z, HEAD_MEMBER, "fit it again")
        _check_skops_container(data, where)
        try:
            untrusted = sio.get_untrusted_types(data=data)
        except Exception as exc:  # RecursionError included: a schema nested too deeply
            raise TlfxError(f"model {where!r}: {HEAD_MEMBER} is not a readable skops file ({type(exc).__name__})") from None
        allowed = {*trusted_head_types(), *trust.types}
        refused = sorted(t for t in untrusted if t not in allowed)
        renamed = sorted(t for t in refused if t.split(".")[:2] in OLD_FIRST_PARTY_MODULES)
        if renamed:
            raise TlfxError(f"model {where!r} was written by an older tlfx whose own heads lived in the 'plugins' "
                            f"package ({', '.join(renamed)}; now tlfx_plugins, other classes): it cannot be loaded "
                            f"by this version; fit it again from its store with tlfx fit")
        if refused:
            flags = " ".join(f"--trust-type {t}" for t in refused)
            raise TlfxError(f"model {where!r} contains {len(refused)} type(s) that are not a registered head class or a "
                            f"scikit-learn/numpy type: {', '.join(refused)}; refusing to load it (loading them could run "
                            f"code). Install the plugin that defines them, or, only if you made the file yourself, "
                            f"pass {flags}")
        try:
            est = sio.loads(data, trusted=sorted(untrusted))
        except TlfxError:
            raise
        except Exception as exc:
            raise TlfxError(f"model {where!r}: {HEAD_MEMBER} cannot be rebuilt ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); it is damaged, fit it again") from None
        return cls(meta, est)

    def export_joblib(self, path: str) -> str:
        """Write a pickle (joblib) copy: faster to load, but runs code when loaded; open it only with
        ``trust_pickle=True`` (``--trust-pickle``)."""
        import joblib

        obj = {"tlfx_model": "head", "meta": {**self.meta, "kind": self.kind}, "estimator": self.estimator}
        return write_atomically(path, lambda f: joblib.dump(obj, f), "pickle export")

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
        d = self.meta.get("n_features")
        if X.ndim != 2 or (isinstance(d, int) and X.shape[1] != d):
            want = f"[n, {d}]" if isinstance(d, int) else "[n, d]"
            raise TlfxError(f"features of shape {X.shape} given, but the head was trained on {want} features of "
                            f"{self.config.get('backbone') or 'its backbone'}; pass features made with the model's "
                            f"configuration (e.g. tlfx.Embedder) or a feature store")
        k = len(self.class_names)
        p = np.asarray(self.estimator.predict_proba(X), dtype=np.float64)
        classes = np.asarray(self.estimator.classes_).astype(np.int64)
        if k == 0 or (len(classes) == k and np.array_equal(classes, np.arange(k))):
            return p
        out = np.zeros((len(X), max(k, int(classes.max()) + 1)), dtype=np.float64)
        out[:, classes] = p
        return out

    @property
    def classes_(self):
        """Labels in the order of ``predict_proba``'s columns: ``0 .. len(class_names)-1`` (the head's own
        ``classes_`` for a model that records no class names)."""
        if self.class_names:
            return np.arange(len(self.class_names))
        return np.asarray(self.estimator.classes_)

    def predict_proba_store(self, store):
        """Probabilities for every row of ``store``; a complete store is read in chunks of ~64 MiB, so evaluating
        on a store larger than memory needs memory for the probabilities only."""
        if not store.complete:
            return self.predict_proba_features(store.features)
        from .streaming import default_chunk_rows

        rows = default_chunk_rows(int(store.attrs.get("dim") or 1))
        parts = [self.predict_proba_features(X) for _, X, _ in store.iter_chunks(rows)]
        if not parts:
            return self.predict_proba_features(store.features)
        return np.concatenate(parts)

    def feature_computer(self, device=None):
        """The backbone that made the training features, rebuilt and verified (weights sha256) for new images;
        for a head fitted on a combined store (``tlfx combine``), the list of its components' backbones."""
        if self._computer is None:
            from .combine import computer_for

            self._computer = computer_for(self.config, device=device)
        return self._computer

    def predict_proba_images(self, paths: list[str]):
        from .combine import embed

        feats, ok, bad = embed(self.config, list(paths), self.feature_computer())
        if not ok:
            return np.zeros((0, len(self.class_names))), ok, bad
        return self.predict_proba_features(feats), ok, bad


def _check_skops_container(data: bytes, where: str):
    """Refuse a skops member that would unpack to more than :data:`MAX_SKOPS_BYTES` (zipfile never reads past a
    member's declared size, so the declared sizes bound the memory skops can use) or hold too many entries."""
    try:
        _models.check_zip_directory(io.BytesIO(data), f"model {where!r}: {HEAD_MEMBER}", MAX_SKOPS_MEMBERS)
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            infos = inner.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError):
        raise TlfxError(f"model {where!r}: {HEAD_MEMBER} is not a readable skops file; it is damaged, fit it again") from None
    total = sum(i.file_size for i in infos)
    if len(infos) > MAX_SKOPS_MEMBERS or total > MAX_SKOPS_BYTES:
        raise TlfxError(f"model {where!r}: {HEAD_MEMBER} would unpack to {total} bytes in {len(infos)} entries "
                        f"(limit {MAX_SKOPS_BYTES} bytes, {MAX_SKOPS_MEMBERS} entries); refusing it (a damaged or "
                        f"hostile file)")


def trusted_head_types() -> list[str]:
    """Types a head model file may hold beyond skops' defaults: the registered heads' classes."""
    from .heads import head_types

    return sorted({*head_types(), *EXTRA_TRUSTED})


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    return v


register_model_kind("head", HeadModel)
