"""``nearest_class_mean``: predict the class whose mean (standardised) feature vector is closest."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

METRICS = ("euclidean", "cosine")


class NearestClassMean(ClassifierMixin, BaseEstimator):
    """Nearest class mean: a scikit-learn classifier (fit / predict / predict_proba / get_params / set_params).

    Parameters
    ----------
    metric : "cosine" or "euclidean"
        Distance between a sample and a class mean, after standardising each feature with the training set's
        mean and standard deviation: ``1 - cosine similarity``, or the root-mean-square difference per feature.
    temperature : float
        ``predict_proba`` is the softmax of ``-distance / temperature``: smaller is more confident.
    """

    def __init__(self, metric: str = "cosine", temperature: float = 0.05):
        self.metric = metric
        self.temperature = temperature

    def fit(self, X, y):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        X, y = validate_data(self, X, y, dtype=np.float64)  # also sets n_features_in_
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"need at least 2 classes to fit, got 1 class ({self.classes_[0]!r})")
        self.shift_ = X.mean(0)
        self.scale_ = X.std(0)
        self.scale_[self.scale_ == 0] = 1.0
        Z = self._standardise(X)
        self.means_ = np.stack([Z[codes == k].mean(0) for k in range(len(self.classes_))])
        return self

    def _standardise(self, X):
        Z = (X - self.shift_) / self.scale_
        if self.metric == "cosine":
            Z = Z / (np.linalg.norm(Z, axis=1, keepdims=True) + 1e-12)
        return Z

    def _distances(self, X):
        check_is_fitted(self, "means_")
        X = validate_data(self, X, reset=False, dtype=np.float64)  # refuses another number of features
        Z = self._standardise(X)
        means = self.means_
        if self.metric == "cosine":
            means = means / (np.linalg.norm(means, axis=1, keepdims=True) + 1e-12)
            return 1.0 - Z @ means.T
        d2 = (Z * Z).sum(1)[:, None] - 2 * Z @ means.T + (means * means).sum(1)[None, :]
        return np.sqrt(np.maximum(d2, 0.0) / self.n_features_in_)  # RMS distance: same scale for any dimension

    def predict_proba(self, X):
        logits = -self._distances(X) / self.temperature
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    def predict(self, X):
        nearest = np.argmin(self._distances(X), axis=1)  # checks fitted-ness before classes_ is touched
        return self.classes_[nearest]


def pca_logistic(**params):
    """Head ``pca_logistic``: a scikit-learn Pipeline (standardise, PCA, logistic regression).

    Its parameters are the pipeline's nested names, ``pca__n_components`` or ``logisticregression__C``, for
    ``tlfx fit --param`` and ``param_grid`` alike. scikit-learn is imported here, when the head is built, so
    ``tlfx heads`` stays fast.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # n_components=0.95: the components explaining 95% of the variance, so it fits any feature dimension
    pipe = make_pipeline(StandardScaler(), PCA(n_components=0.95, random_state=0), LogisticRegression(C=1.0, max_iter=1000))
    return pipe.set_params(**params)
