"""tlfx's scikit-learn heads as ordinary estimator classes: LogisticHead, SGDHead, SVMHead, RandomForestHead,
KNNHead.

Each is a scikit-learn classifier with flat parameters (``tlfx fit --head svm --param C=10``) and defaults chosen
for CNN embeddings: standardised features for the linear and kernel models, cosine distance for kNN, and an RBF
SVM that projects wide features onto 256 principal components (kernel evaluations ~7x cheaper) and switches to
a Nystroem approximation above ``max_exact`` training rows so it stays usable at 60k samples and beyond
(measurements in docs/heads.md). The ``sklearn_heads`` plugin registers them; saved models name these
classes (``tlfx_plugins.sklearn_estimators.SVMHead``), so they stay here.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from tlfx.heads import SEED_BOUNDS, Bounds
from tlfx_plugins.head_base import ClassifierHead, softmax


def _min_count(y_idx):
    return int(np.bincount(y_idx).min())

def _scaled(standardize: bool, *steps):
    return make_pipeline(StandardScaler(), *steps) if standardize else make_pipeline(*steps)

class LogisticHead(ClassifierHead):
    """Multinomial logistic regression (lbfgs) on standardised features.

    ``C``: inverse L2 strength; ``max_iter``: lbfgs iterations; ``standardize``: scale features to unit variance first.
    """

    param_types = {"C": (float,), "max_iter": (int,), "tol": (float,), "standardize": (bool,)}
    param_bounds = {"C": Bounds(0, low_open=True), "max_iter": Bounds(1), "tol": Bounds(0)}

    def __init__(self, C=0.1, max_iter=1000, tol=1e-4, standardize=True):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize

    def _fit(self, X, y_idx, n_classes):
        self.model_ = _scaled(self.standardize, LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol))
        self.model_.fit(X, y_idx)
        self.n_iter_ = self.model_[-1].n_iter_

    def _proba(self, X):
        return self.model_.predict_proba(X)

class SGDHead(ClassifierHead):
    """Logistic regression trained by stochastic gradient descent (``SGDClassifier(loss="log_loss")``, one-vs-rest),
    chunk by chunk with ``partial_fit``: it trains on a feature store larger than memory (``streaming = True``).

    ``fit(X, y)`` runs the same chunked algorithm over the arrays. ``alpha``: L2 strength; ``epochs``: passes over
    the training rows; ``val_fraction``: held out (stratified, at most 64 MiB of features) for early stopping,
    keeping the epoch with the lowest validation log-loss (0 = none, train all ``epochs``); ``patience``: epochs
    without improvement before stopping; ``standardize``: scale to unit variance (statistics from one streaming
    pass); ``random_state``: the held-out rows, chunk order and SGD's own shuffling.
    """

    param_types = {"alpha": (float,), "epochs": (int,), "val_fraction": (float,), "patience": (int,),
                   "standardize": (bool,), "random_state": (int,)}
    param_bounds = {"alpha": Bounds(0, low_open=True), "epochs": Bounds(1), "val_fraction": Bounds(0, 1, high_open=True),
                    "patience": Bounds(1), "random_state": SEED_BOUNDS}
    streaming = True

    def __init__(self, alpha=1e-4, epochs=20, val_fraction=0.1, patience=3, standardize=True, random_state=0):
        self.alpha = alpha
        self.epochs = epochs
        self.val_fraction = val_fraction
        self.patience = patience
        self.standardize = standardize
        self.random_state = random_state

    def _fit(self, X, y_idx, n_classes):
        from tlfx.streaming import ArrayRows

        self._fit_rows(ArrayRows(X, y_idx), y_idx, n_classes)

    def _fit_rows(self, rows, targets, n_classes):
        from tlfx.streaming import holdout, scan, shuffled_chunks

        va = holdout(targets, self.val_fraction, self.random_state, rows.dim)
        mean, var, Xv = scan(rows, targets >= 0, va, self.standardize)
        scale = np.sqrt(var)
        self.mean_ = mean
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        Xv, yv = (Xv - self.mean_) / self.scale_, targets[va]
        train = targets >= 0
        train[va] = False
        rng = np.random.default_rng(self.random_state)
        self.model_ = SGDClassifier(loss="log_loss", alpha=self.alpha, random_state=self.random_state)
        classes = np.arange(n_classes)
        best, best_state, bad = np.inf, None, 0
        self.n_epochs_ = 0
        for _ in range(self.epochs):
            for X, y in shuffled_chunks(rows, targets, train, rng):
                Xs = np.subtract(X, self.mean_)
                Xs /= self.scale_  # in place: one chunk-sized temporary
                self.model_.partial_fit(Xs, y, classes=classes)
            self.n_epochs_ += 1
            if not len(yv):
                continue
            p = self.model_.predict_proba(Xv)
            loss = float(-np.mean(np.log(np.clip(p[np.arange(len(yv)), yv], 1e-15, None))))
            if loss < best - 1e-6:
                best, bad = loss, 0
                best_state = (self.model_.coef_.copy(), self.model_.intercept_.copy())
            else:
                bad += 1
                if bad >= self.patience:
                    break
        if best_state is not None:
            self.model_.coef_, self.model_.intercept_ = best_state
        self.best_val_loss_ = float(best) if np.isfinite(best) else None

    def _proba(self, X):
        return self.model_.predict_proba((X - self.mean_) / self.scale_)

class SVMHead(ClassifierHead):
    """Support vector machine on standardised features.

    With more than ``pca`` feature columns (default 256) the standardised features are first projected onto their
    ``pca`` leading principal components (fitted on the training rows); ``gamma="scale"`` keeps the value of the
    full standardised features, so the kernel stays (nearly) the same one while every kernel evaluation costs
    ``pca / n_features`` as much: at 60k x 1752 the exact SVM fits in ~1.5 minutes instead of ~16, 0.14 points
    from the unprojected one (docs/heads.md). ``pca=None`` never projects.

    Up to ``max_exact`` training rows: an exact kernel SVC (libsvm, one-vs-one). Above that, for the RBF kernel, a
    Nystroem feature map with ``n_components`` landmarks followed by a ridge classifier (``alpha = 10 / C``);
    its cost grows linearly in rows, not quadratically. ``predict_proba``: a softmax over the one-vs-rest
    decision values (ranks classes exactly like the SVM's own decision, but is not calibrated);
    ``probability=True`` calibrates with Platt scaling on 3-fold cross-validated decisions instead (about 3x
    slower to fit, exact SVC only).
    """

    param_types = {"C": (float,), "kernel": ("rbf", "linear", "poly", "sigmoid"), "gamma": (float, "scale", "auto"),
                   "degree": (int,), "standardize": (bool,), "pca": (int, None), "max_exact": (int,),
                   "n_components": (int,), "probability": (bool,), "random_state": (int, None)}
    param_bounds = {"C": Bounds(0, low_open=True), "gamma": Bounds(0, low_open=True), "degree": Bounds(0),
                    "pca": Bounds(1), "max_exact": Bounds(0), "n_components": Bounds(1),
                    "random_state": SEED_BOUNDS}
    pca = None  # model files written before the parameter existed never projected

    def __init__(self, C=10.0, kernel="rbf", gamma="scale", degree=3, standardize=True, pca=256,
                 max_exact=100000, n_components=2000, probability=False, random_state=0):
        self.C = C
        self.kernel = kernel
        self.gamma = gamma
        self.degree = degree
        self.standardize = standardize
        self.pca = pca
        self.max_exact = max_exact
        self.n_components = n_components
        self.probability = probability
        self.random_state = random_state

    def _gamma(self, Xs):
        """The numeric gamma of the (standardised, unprojected) features: scikit-learn's ``scale``/``auto``."""
        if self.gamma == "scale":
            var = float(np.var(Xs))
            return 1.0 / (Xs.shape[1] * var) if var > 0 else 1.0
        if self.gamma == "auto":
            return 1.0 / Xs.shape[1]
        return self.gamma

    def _fit(self, X, y_idx, n_classes):
        self.approximate_ = bool(self.kernel == "rbf" and len(X) > self.max_exact)
        self.calibrated_ = bool(self.probability and not self.approximate_ and _min_count(y_idx) >= 2)
        scaler = StandardScaler() if self.standardize else None
        Xs = scaler.fit_transform(X) if scaler is not None else X
        gamma = self._gamma(Xs)
        self.projected_ = bool(self.pca is not None and X.shape[1] > self.pca and len(X) > self.pca)
        steps = [PCA(n_components=self.pca, random_state=self.random_state)] if self.projected_ else []
        if self.approximate_:
            steps += [Nystroem(kernel="rbf", gamma=gamma, n_components=min(self.n_components, len(X)),
                               random_state=self.random_state),
                      # ridge on the mapped features: ~20x faster than LinearSVC here at the same accuracy
                      # (docs/heads.md); alpha = 10 / C keeps C's meaning (larger C, weaker penalty)
                      RidgeClassifier(alpha=10.0 / self.C)]
        else:
            svc = SVC(C=self.C, kernel=self.kernel, gamma=gamma, degree=self.degree,
                      decision_function_shape="ovr", random_state=self.random_state)
            if self.calibrated_:  # Platt scaling on cross-validated decisions, then one SVC on all rows
                from sklearn.calibration import CalibratedClassifierCV

                svc = CalibratedClassifierCV(svc, method="sigmoid", ensemble=False, cv=min(3, _min_count(y_idx)))
            steps.append(svc)
        # the scaler is fitted once (gamma needs its output); the rest is fitted on that output
        self.model_ = make_pipeline(*steps).fit(Xs, y_idx)
        if scaler is not None:
            self.model_ = Pipeline([("standardscaler", scaler), *self.model_.steps])
        if self.projected_:
            # PCA keeps a strided view of its SVD; a loaded model file holds a contiguous copy, and BLAS rounds the
            # two differently: make them the same array layout so a saved model predicts bit for bit as fitted
            pca = self.model_[-3 if self.approximate_ else -2]
            pca.components_ = np.ascontiguousarray(pca.components_)
        if self.calibrated_:
            self._keep_platt_coefficients()

    def _keep_platt_coefficients(self):
        """Keep the fitted SVC and its per-class sigmoid ``(a, b)`` as ``platt_``, not the calibrator objects:
        those are private scikit-learn classes (``_CalibratedClassifier``, ``_SigmoidCalibration``) that model
        files refuse to load. :meth:`_proba` recomputes exactly what ``CalibratedClassifierCV`` would."""
        calibrated = self.model_.steps[-1][1].calibrated_classifiers_[0]  # ensemble=False: one
        self.platt_ = np.array([[c.a_, c.b_] for c in calibrated.calibrators], dtype=np.float64)
        self.model_.steps[-1] = (self.model_.steps[-1][0], calibrated.estimator)

    def _proba(self, X):
        d = self.model_.decision_function(X)
        if self.calibrated_:
            return _platt_proba(d, self.platt_, len(self.classes_))
        if d.ndim == 1:  # two classes: one signed margin
            d = np.stack([-d, d], axis=1)
        return softmax(d)


def _platt_proba(d, platt, n_classes):
    """CalibratedClassifierCV(method="sigmoid")'s probabilities from decision values ``d`` and per-class ``(a, b)``:
    one-vs-rest sigmoids normalised to sum to one (binary: the positive class's sigmoid and its complement)."""
    d = d.reshape(-1, 1) if d.ndim == 1 else d
    p = 1.0 / (1.0 + np.exp(platt[:, 0] * d + platt[:, 1]))  # expit(-(a * d + b))
    if n_classes == 2:
        proba = np.concatenate([1.0 - p[:, :1], p[:, :1]], axis=1)
    else:
        total = p.sum(axis=1, keepdims=True)
        proba = np.divide(p, total, out=np.full_like(p, 1.0 / n_classes), where=total != 0)
    proba[(proba > 1.0) & (proba <= 1.0 + 1e-5)] = 1.0
    return proba

class RandomForestHead(ClassifierHead):
    """A random forest; needs no feature scaling. ``n_jobs=-1`` uses every core."""

    param_types = {"n_estimators": (int,), "max_depth": (int, None), "max_features": (float, "sqrt", "log2", None),
                   "min_samples_leaf": (int, float), "class_weight": ("balanced", "balanced_subsample", dict, None),
                   "n_jobs": (int, None), "random_state": (int, None)}
    param_bounds = {"n_estimators": Bounds(1), "max_depth": Bounds(1), "max_features": Bounds(0, 1, low_open=True),
                    "min_samples_leaf": {int: Bounds(1), float: Bounds(0, 1, True, True)},
                    "random_state": SEED_BOUNDS}

    def __init__(self, n_estimators=200, max_depth=None, max_features="sqrt", min_samples_leaf=1, class_weight=None,
                 n_jobs=-1, random_state=0):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.max_features = max_features
        self.min_samples_leaf = min_samples_leaf
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _fit(self, X, y_idx, n_classes):
        self.model_ = RandomForestClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth, max_features=self.max_features,
            min_samples_leaf=self.min_samples_leaf, class_weight=self.class_weight, n_jobs=self.n_jobs,
            random_state=self.random_state)
        self.model_.fit(X, y_idx)

    def _proba(self, X):
        return self.model_.predict_proba(X)

class KNNHead(ClassifierHead):
    """k nearest neighbours, cosine distance by default (embeddings compare by direction), distance-weighted votes."""

    param_types = {"n_neighbors": (int,), "metric": ("cosine", "euclidean", "manhattan", "minkowski"),
                   "weights": ("uniform", "distance"), "standardize": (bool,)}
    param_bounds = {"n_neighbors": Bounds(1)}

    def __init__(self, n_neighbors=10, metric="cosine", weights="distance", standardize=False):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.standardize = standardize

    def _fit(self, X, y_idx, n_classes):
        k = min(self.n_neighbors, len(X))
        algorithm = "brute" if self.metric == "cosine" else "auto"
        self.model_ = _scaled(self.standardize, KNeighborsClassifier(n_neighbors=k, metric=self.metric,
                                                                     weights=self.weights, algorithm=algorithm))
        self.model_.fit(X, y_idx)

    def _proba(self, X):
        return self.model_.predict_proba(X)
