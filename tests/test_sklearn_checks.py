"""Contract: every first-party head passes scikit-learn's estimator checks (fit/predict/predict_proba, get_params,
set_params, clone, pickling, input validation, ...).

Parameters are shrunk so the whole module stays fast (a handful of trees, few epochs for ``linear``); the SVM is
checked twice, exact and with its Nystroem path (``max_exact=10``), and once with calibrated probabilities.

``tlfx.testing.check_head`` runs the same scikit-learn checks for a plugin author; here they run one test per
check, and ``test_tlfx_head_checks`` adds tlfx's own (``sklearn_checks=False``).

Exclusions: none. Every check scikit-learn 1.9 runs on these heads passes; ``EXPECTED_FAILED`` is where an
exclusion would go, with the reason beside it.
"""

from __future__ import annotations

import warnings

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from tlfx.heads import create_head, first_party_heads
from tlfx.testing import check_head

CHECKED = {
    "logistic": [{}],
    "sgd": [{}],
    "svm": [{}, {"max_exact": 10, "n_components": 20}, {"pca": 2}, {"probability": True}],
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


@pytest.mark.parametrize(("name", "params"), [(n, p) for n, variants in CHECKED.items() for p in variants],
                         ids=[f"{n}{i}" for n, variants in CHECKED.items() for i in range(len(variants))])
def test_tlfx_head_checks(name, params):
    """tlfx's own checks beyond scikit-learn's (run above, one test per check): predict is exactly the argmax of
    predict_proba (tlfx ranks top-k by it), batch invariance, labels 1/4/7, and a model file that loads back."""
    check_head(name, sklearn_checks=False, **params)
