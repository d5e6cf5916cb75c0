"""Feature normalisation in front of a head: the standard tricks for off-the-shelf CNN features.

``none`` (the features as extracted), ``l2`` (each row scaled to unit L2 norm), ``power`` (signed square root,
``sign(x) * sqrt(|x|)``, then L2: "power normalisation") and ``pca-whiten`` (PCA whitening fitted on the training
rows, then L2; ``pca-whiten:128`` keeps the 128 strongest components). :class:`FeatureNormalizer` is an ordinary
scikit-learn transformer; :func:`with_normalizer` puts it in front of a head as a two-step
:class:`~sklearn.pipeline.Pipeline` (``normalize``, ``head``), so that it is fitted on the training split only
(within each CV fold under ``--search``), saved inside the model file and applied at evaluate/predict time.

>>> from tlfx.normalize import with_normalizer
>>> clf = with_normalizer(create_head("svm"), "power").fit(X_train, y_train)
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(est, X="no_validation", reset=True, **kw):
        return est._validate_data(X, reset=reset, **kw)

from .errors import TlfxError

METHODS = ("none", "l2", "power", "pca-whiten")
STEP = "normalize"  # the pipeline step names: ``normalize`` then ``head``
HEAD_STEP = "head"
# components whose variance is below this fraction of the largest carry no signal, only rounding noise that
# whitening would blow up to unit variance: they are dropped at fit
RANK_TOL = 1e-10
MAX_COMPONENTS = 1 << 20


def parse_spec(spec) -> tuple[str, int | None]:
    """``"pca-whiten:128"`` -> ``("pca-whiten", 128)``; ``"l2"`` -> ``("l2", None)``; None -> ``("none", None)``.

    Unknown methods and component counts are refused with one line naming the valid choices."""
    if spec is None:
        return "none", None
    if not isinstance(spec, str):
        raise TlfxError(f"--normalize {spec!r} is not a string; valid choices: {', '.join(METHODS)} "
                        f"(pca-whiten:N keeps N components)")
    method, _, n = spec.strip().lower().partition(":")
    if method not in METHODS:
        raise TlfxError(f"unknown --normalize {spec!r}; valid choices: {', '.join(METHODS)} "
                        f"(pca-whiten:N keeps N components)")
    if not n:
        return method, None
    if method != "pca-whiten":
        raise TlfxError(f"--normalize {spec!r}: only pca-whiten takes a number of components (pca-whiten:N)")
    try:
        k = int(n)
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_COMPONENTS:
        raise TlfxError(f"--normalize {spec!r}: the number of components must be a whole number from 1 to "
                        f"{MAX_COMPONENTS}, e.g. pca-whiten:128")
    return method, k


def spec_of(method: str, n_components: int | None = None) -> str:
    """The inverse of :func:`parse_spec`: ``("pca-whiten", 128)`` -> ``"pca-whiten:128"``."""
    return f"{method}:{n_components}" if method == "pca-whiten" and n_components else method


def parse_specs(value) -> list[str]:
    """One spec or several (a comma-separated string or a list), validated and normalised, duplicates removed:
    ``"none,power"`` -> ``["none", "power"]``. Several are a ``--search`` grid dimension."""
    if value is None:
        return ["none"]
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        spec = spec_of(*parse_spec(item))
        if spec not in out:
            out.append(spec)
    if not out:
        raise TlfxError(f"--normalize {value!r} names no method; valid choices: {', '.join(METHODS)}")
    return out


class FeatureNormalizer(TransformerMixin, BaseEstimator):
    """Row normalisation of features: ``method`` one of :data:`METHODS`.

    ``pca-whiten`` learns the training rows' mean and principal axes at ``fit`` (``n_components``: how many to
    keep, None for all with non-negligible variance; at most ``min(rows, features)``), projects, divides each
    component by its standard deviation, then L2-normalises. The other methods learn nothing. Rows of all zeros
    stay zeros. Float32 input gives float32 output.
    """

    def __init__(self, method="l2", n_components=None):
        self.method = method
        self.n_components = n_components

    def _check(self):
        if self.method not in METHODS:
            raise ValueError(f"FeatureNormalizer: method={self.method!r} must be one of {', '.join(METHODS)}")
        k = self.n_components
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"FeatureNormalizer: n_components={k!r} must be a positive whole number or None")

    def fit(self, X, y=None):
        """Learn what ``method`` needs from the training rows ``X`` (only ``pca-whiten`` learns anything)."""
        self._check()
        X = self._validate(X, reset=True)
        if self.method == "pca-whiten":
            self._fit_pca(X)
        return self

    def _fit_pca(self, X):
        n, d = X.shape
        if n < 2:
            raise ValueError(f"FeatureNormalizer: pca-whiten needs at least 2 training rows, got n_samples = {n}")
        X64 = X.astype(np.float64, copy=False)
        mean = X64.mean(axis=0)
        if n < d:  # fewer rows than features: the n x n Gram matrix of the centred rows is the smaller problem
            Xc = X64 - mean
            g, u = np.linalg.eigh(Xc @ Xc.T)
            g = np.clip(g, 0.0, None)
            var = g / (n - 1)
            vecs = (Xc.T @ u) / np.sqrt(np.where(g > 0, g, 1.0))  # unit principal axes (zero-variance ones dropped)
        else:  # eigen-decomposition of the d x d covariance: one pass over the rows, cheap for n >> d (60k x 1752)
            cov = np.zeros((d, d))
            for s in range(0, n, 8192):
                block = X64[s:s + 8192] - mean
                cov += block.T @ block
            cov /= n - 1
            var, vecs = np.linalg.eigh(cov)
        order = np.argsort(var)[::-1]
        var, vecs = var[order], vecs[:, order]
        keep = var > RANK_TOL * max(float(var[0]), 0.0) if var[0] > 0 else np.zeros(len(var), bool)
        k = int(keep.sum())
        if self.n_components is not None:
            k = min(k, int(self.n_components))
        if k < 1:
            raise ValueError("FeatureNormalizer: pca-whiten found no variance in the training rows (all equal)")
        vecs = vecs[:, :k]
        # a deterministic sign per axis: its largest-magnitude loading is positive
        flip = np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(k)])
        vecs = vecs * np.where(flip == 0, 1.0, flip)
        self.mean_ = mean
        self.components_ = vecs.T.copy()  # [k, d]
        self.explained_variance_ = var[:k].copy()
        self.n_components_ = k

    def _validate(self, X, reset):
        """scikit-learn's own input checks (2-D, finite, real, not sparse, not empty, same width as at fit)."""
        return _validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])

    def transform(self, X):
        """The normalised rows: same number of rows; ``pca-whiten`` gives ``n_components_`` columns."""
        check_is_fitted(self, "n_features_in_")
        X = self._validate(X, reset=False)
        dtype = X.dtype
        if self.method == "none":
            return X
        if self.method == "power":
            X = np.sign(X) * np.sqrt(np.abs(X))
        elif self.method == "pca-whiten":
            Z = np.empty((len(X), self.n_components_), dtype)
            scale = 1.0 / np.sqrt(self.explained_variance_)
            for s in range(0, len(X), 8192):
                Z[s:s + 8192] = ((X[s:s + 8192].astype(np.float64) - self.mean_) @ self.components_.T) * scale
            X = Z
        return l2_rows(X).astype(dtype, copy=False)

    @property
    def spec(self) -> str:
        """``"power"``, ``"pca-whiten:128"``: the value ``--normalize`` takes for this normaliser."""
        return spec_of(self.method, self.n_components)


def l2_rows(X) -> np.ndarray:
    """Each row divided by its L2 norm (rows of all zeros stay zeros)."""
    X = np.asarray(X)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    norms[norms == 0] = 1.0
    return X / norms[:, None].astype(X.dtype)


def normalizer(spec) -> FeatureNormalizer:
    """A fresh :class:`FeatureNormalizer` for ``spec`` (``"power"``, ``"pca-whiten:128"``)."""
    method, k = parse_spec(spec)
    return FeatureNormalizer(method, k)


def with_normalizer(head, spec):
    """``head`` itself for ``none``; else the Pipeline ``[("normalize", FeatureNormalizer), ("head", head)]``."""
    method, k = parse_spec(spec)
    if method == "none":
        return head
    from sklearn.pipeline import Pipeline

    return Pipeline([(STEP, FeatureNormalizer(method, k)), (HEAD_STEP, head)])


def searchable(head, specs: list[str]):
    """The estimator a ``--search`` fits and the grid entries for the normalisations ``specs``:
    ``(estimator, prefix for the head's parameters, {"normalize": [...]} or {})``. One spec is fixed in the
    estimator; several become a grid dimension (each a fitted-per-fold normaliser, never fitted on held-out rows)."""
    from sklearn.pipeline import Pipeline

    if specs == ["none"]:
        return head, "", {}
    est = Pipeline([(STEP, normalizer(specs[0])), (HEAD_STEP, head)])
    grid = {STEP: [normalizer(s) for s in specs]} if len(specs) > 1 else {}
    return est, f"{HEAD_STEP}__", grid


def split(est) -> tuple[object, str]:
    """``(head, spec)`` of a fitted estimator: the head step and its normalisation, or ``(est, "none")``."""
    from sklearn.pipeline import Pipeline

    if isinstance(est, Pipeline) and [n for n, _ in est.steps] == [STEP, HEAD_STEP]:
        norm = est.named_steps[STEP]
        return est.named_steps[HEAD_STEP], (norm.spec if isinstance(norm, FeatureNormalizer) else "none")
    return est, "none"


def spec_value(v) -> str:
    """A grid value (a FeatureNormalizer or ``"passthrough"``) as its spec string, for search records."""
    return v.spec if isinstance(v, FeatureNormalizer) else "none"
