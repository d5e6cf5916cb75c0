"""Contract: every first-party head passes scikit-learn's estimator checks (fit/predict/predict_proba, get_params,
set_params, clone, pickling, input validation, ...).

Parameters are shrunk so the whole module stays fast (a handful of trees, few epochs for ``linear``); the SVM is
checked twice, exact and with its Nystroem path (``max_exact=10``), and once with calibrated probabilities.

Exclusions: none. Every check scikit-learn 1.9 runs on these heads passes; ``EXPECTED_FAILED`` is where an
exclusion would go, with the reason beside it.
"""

from __future__ import annotations

import warnings

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from tlfx.heads import create_head, first_party_heads

CHECKED = {
    "logistic": [{}],
    "svm": [{}, {"max_exact": 10, "n_components": 20}, {"probability": True}],
    "random_forest": [{"n_estimators": 10, "n_jobs": 1}],
    "knn": [{}],
    "linear": [{"epochs": 40, "lr": 0.05, "batch_size": 0, "device": "cpu"}],
}
ESTIMATORS = [create_head(name, **params) for name, variants in CHECKED.items() for params in variants]
EXPECTED_FAILED: dict[str, dict[str, str]] = {}  # head class name -> {check name: reason}


def _expected_failed(est):
    return EXPECTED_FAILED.get(type(est).__name__, {})


def test_every_first_party_head_is_checked():
    assert sorted(CHECKED) == sorted(first_party_heads())


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failed)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        check(estimator)


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_predict_is_argmax_of_predict_proba(name):
    """tlfx ranks top-k classes by predict_proba, so it must agree with predict (SVM included)."""
    import numpy as np
    from sklearn.datasets import make_blobs

    X, y = make_blobs(120, centers=4, n_features=6, random_state=1, cluster_std=3.0)
    est = create_head(name, **CHECKED[name][0]).fit(X, y)
    p = est.predict_proba(X)
    assert p.shape == (120, 4)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(est.classes_[p.argmax(1)], est.predict(X))
