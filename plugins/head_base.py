"""The base class of tlfx's own heads: an ordinary scikit-learn classifier that validates its input.

Imported when a head is first built (it imports scikit-learn), never on plugin discovery: the head plugins register
their classes as ``"tlfx_plugins.<module>:<Class>"`` strings.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from tlfx.heads import _bounds_error, _describe_spec, _type_ok

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(est, X="no_validation", y="no_validation", reset=True, **kw):
        return est._validate_data(X, y, reset=reset, **kw)


class ClassifierHead(ClassifierMixin, BaseEstimator):
    """Base of tlfx's heads: validates inputs, maps labels to ``classes_`` and predicts by argmax of probabilities.

    Subclasses implement ``_fit(X, y_idx, n_classes)`` (``y_idx`` are indices into ``classes_``) and
    ``_proba(X) -> [n, n_classes]``. ``predict`` is the argmax of ``predict_proba``, so the two always agree.
    ``param_types`` maps each parameter to its allowed types and literal values, ``param_bounds`` numeric ones to
    their :class:`tlfx.heads.Bounds`; both are checked by ``tlfx fit --param`` and at ``fit``.
    """

    param_types: dict = {}
    param_bounds: dict = {}
    streaming = False  # True: the head implements ``_fit_rows`` and trains on a store chunk by chunk (fit_store)

    def _check_params(self):
        for key, value in self.get_params(deep=False).items():
            spec = self.param_types.get(key)
            if spec and not _type_ok(value, spec):
                raise ValueError(f"{type(self).__name__}: parameter {key}={value!r} must be {_describe_spec(spec)}")
            why = _bounds_error(value, self.param_bounds.get(key))
            if why:
                raise ValueError(f"{type(self).__name__}: parameter {key}={value!r} must be {why}")

    def fit(self, X, y):
        """Train on features ``X [n, d]`` and labels ``y [n]`` (any hashable labels). Returns ``self``."""
        self._check_params()
        X, y = _validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes to train, got 1 class "
                             f"({self.classes_[0]!r})")
        self._fit(X, np.asarray(y_idx, dtype=np.int64).ravel(), len(self.classes_))
        return self

    def fit_store(self, store, chunk_rows: int | None = None):
        """Train on the labelled rows of a :class:`tlfx.FeatureStore`, reading ``chunk_rows`` rows at a time
        (default: about 64 MiB of features), so the store may be larger than memory. Rows labelled -1 are skipped.
        Only for heads with ``streaming = True``; returns ``self``, fitted like ``fit`` would be."""
        from tlfx.streaming import StoreRows

        if not self.streaming:
            raise TypeError(f"{type(self).__name__} cannot train chunk by chunk; call fit(X, y)")
        self._check_params()
        with StoreRows(store, chunk_rows) as rows:
            return self._fit_source(rows)

    def _fit_source(self, rows):
        """Fit from a :mod:`tlfx.streaming` row source whose ``labels`` may hold -1 (unlabelled, skipped)."""
        labels = rows.labels
        keep = labels >= 0
        self.classes_, inv = np.unique(labels[keep], return_inverse=True)
        if len(self.classes_) < 2:
            got = f"1 class ({self.classes_[0]!r})" if len(self.classes_) else "no labelled rows"
            raise ValueError(f"{type(self).__name__} needs at least 2 classes to train, got {got}")
        targets = np.full(len(labels), -1, dtype=np.int64)
        targets[keep] = np.asarray(inv, dtype=np.int64).ravel()
        self.n_features_in_ = int(rows.dim)
        self._fit_rows(rows, targets, len(self.classes_))
        return self

    def _fit_rows(self, rows, targets, n_classes):  # pragma: no cover - streaming heads only
        """Train from ``rows`` (:class:`tlfx.streaming.StoreRows` or ``ArrayRows``); ``targets``: indices into
        ``classes_``, -1 for rows to skip."""
        raise NotImplementedError

    def predict_proba(self, X):
        """Class probabilities ``[n, len(classes_)]``, columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = _validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return np.asarray(self._proba(X), dtype=np.float64)

    def predict(self, X):
        """The most probable class of each row."""
        proba = self.predict_proba(X)  # raises NotFittedError before classes_ is looked up
        return self.classes_[np.argmax(proba, axis=1)]

    def _fit(self, X, y_idx, n_classes):  # pragma: no cover - abstract
        raise NotImplementedError

    def _proba(self, X):  # pragma: no cover - abstract
        raise NotImplementedError


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large values."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
