"""Heads and model files without a backbone: parameters, persistence safety, metrics, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.linear_model import LogisticRegression

import tlfx
from tlfx.config import FeatureConfig
from tlfx.errors import TlfxError
from tlfx.head_model import HeadModel
from tlfx.heads import create_head, first_party_heads, param_grid, parse_params, parse_value
from tlfx.metrics import classification_report_dict, format_report

CONFIG = {"backbone": "efficientnet_lite0", "weights": {"name": "w", "sha256": "ab" * 32, "path": ""},
          "layers": ["penultimate"], "pooling": "avg", "image_size": 64, "preprocess": {"resize": 73, "crop": 64},
          "precision": "fp32"}


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(300, centers=4, n_features=16, random_state=0, cluster_std=4.0)
    return X.astype(np.float32), y


def test_first_party_heads_registered_with_description_and_grid():
    assert sorted(first_party_heads()) == ["knn", "linear", "logistic", "random_forest", "sgd", "svm"]
    reg = tlfx.get_plugin_manager().registry("head")
    for name in first_party_heads():
        assert reg.get(name).description
        grid = param_grid(name)
        assert grid and all(k in create_head(name).get_params() for k in grid)


def test_plugin_discovery_imports_neither_sklearn_nor_torch():
    """Plugin discovery stays fast: every first-party plugin loads and registers (heads and pixels as
    "module:Class" strings) without scikit-learn (scipy) or torch, which load when a head or backbone is built."""
    code = ("import sys; import tlfx; pm = tlfx.get_plugin_manager(); "
            "[pm.registry(k) for k in ('backbone', 'head', 'dataset')]; from tlfx.heads import param_grid; param_grid('svm'); "
            "print([r.name for r in pm.records if r.error]); "
            "print(sorted(x for x in ('sklearn', 'scipy', 'torch') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


@pytest.mark.parametrize("text,value", [("10", 10), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("False", False),
                                        ("none", None), ("null", None), ("rbf", "rbf"), ("[1, 2]", [1, 2])])
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_parse_params_valid_and_invalid():
    assert parse_params("svm", ["C=10", "kernel=linear", "gamma=0.01"]) == {"C": 10, "kernel": "linear", "gamma": 0.01}
    assert parse_params("random_forest", ["max_depth=none", "max_features=0.1"]) == {"max_depth": None,
                                                                                     "max_features": 0.1}
    with pytest.raises(TlfxError, match=r"no parameter 'Cc'; valid parameters: C, degree"):
        parse_params("svm", ["Cc=1"])
    with pytest.raises(TlfxError, match=r"C='abc' is not valid for head 'svm': C must be float"):
        parse_params("svm", ["C=abc"])
    with pytest.raises(TlfxError, match=r"'C' is not KEY=VALUE"):
        parse_params("svm", ["C"])
    with pytest.raises(TlfxError, match=r"unknown head 'nope'; valid choices: knn, linear"):
        parse_params("nope", [])


def test_fit_rejects_bad_param_value_with_value_error(blobs):
    X, y = blobs
    with pytest.raises(ValueError, match="n_neighbors='x' must be int"):
        create_head("knn", n_neighbors="x").fit(X, y)


@pytest.mark.parametrize("name", ["logistic", "sgd", "svm", "random_forest", "knn", "linear"])
def test_heads_learn_and_roundtrip_through_a_safe_model_file(tmp_path, blobs, name):
    X, y = blobs
    params = {"n_estimators": 30} if name == "random_forest" else {}
    est = create_head(name, **params).fit(X[:200], y[:200])
    acc = float((est.predict(X[200:]) == y[200:]).mean())
    assert acc > 0.8, (name, acc)
    model = HeadModel.from_estimator(est, name, params, CONFIG, ["a", "b", "c", "d"], extra={"n_train": 200})
    path = str(tmp_path / f"{name}.tlfx")
    model.save(path)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["head.skops", "meta.json"]
        meta = json.loads(z.read("meta.json"))
    assert meta["kind"] == "head" and meta["head"] == name and meta["config"] == FeatureConfig.from_dict(CONFIG).to_dict()
    back = tlfx.load_model(path)
    assert isinstance(back, HeadModel) and back.class_names == ["a", "b", "c", "d"]
    np.testing.assert_allclose(back.predict_proba_features(X[200:]), est.predict_proba(X[200:]), rtol=1e-6)


def test_linear_head_is_deterministic_and_stores_plain_arrays(blobs):
    import skops.io as sio

    X, y = blobs
    a = create_head("linear", seed=3, epochs=30).fit(X, y)
    b = create_head("linear", seed=3, epochs=30).fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.intercept_, b.intercept_)
    assert isinstance(a.coef_, np.ndarray) and a.coef_.shape == (4, 16) and a.mean_.shape == (16,)
    # nothing torch in the saved head: only the head class itself is outside skops' default trusted types
    assert sio.get_untrusted_types(data=sio.dumps(a)) == ["tlfx_plugins.linear_estimator.LinearHead"]
    c = create_head("linear", seed=4, epochs=30).fit(X, y)
    assert not np.array_equal(a.coef_, c.coef_)


def test_linear_head_early_stopping_stops_before_epochs(blobs):
    X, y = blobs
    est = create_head("linear", epochs=500, patience=3, lr=0.05).fit(X, y)
    assert est.n_epochs_ < 500 and est.best_val_loss_ is not None


def test_svm_switches_to_nystroem_above_max_exact(blobs):
    X, y = blobs
    exact = create_head("svm").fit(X, y)
    approx = create_head("svm", max_exact=100, n_components=100).fit(X, y)
    assert not exact.approximate_ and approx.approximate_
    assert type(approx.model_[-1]).__name__ == "RidgeClassifier" and type(approx.model_[-2]).__name__ == "Nystroem"
    assert float((approx.predict(X) == y).mean()) > 0.85


def test_svm_projects_wide_features_and_keeps_the_full_kernel_gamma():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    tr, te = slice(0, 1200), slice(1200, None)
    full = create_head("svm", pca=None).fit(X[tr], y[tr])
    proj = create_head("svm", pca=40).fit(X[tr], y[tr])
    assert not full.projected_ and proj.projected_ and type(proj.model_[1]).__name__ == "PCA"
    svc = proj.model_[-1]
    Xs = (X[tr] - X[tr].mean(0)) / np.where(X[tr].std(0) > 0, X[tr].std(0), 1)
    assert svc.gamma == pytest.approx(1.0 / (X.shape[1] * Xs.var()), rel=1e-5)  # of the 64 columns, not the 40
    a_full, a_proj = full.score(X[te], y[te]), proj.score(X[te], y[te])
    assert a_proj > 0.9 and abs(a_full - a_proj) < 0.02
    assert not create_head("svm", pca=64).fit(X[tr], y[tr]).projected_  # not wider than pca: nothing to project


class EvilEstimator(LogisticRegression):
    """A type no registry knows: loading a file that holds it must be refused before anything is built."""

    def __setstate__(self, state):
        open(os.environ["TLFX_TEST_EVIL_MARK"], "w").close()
        super().__setstate__(state)


def test_model_with_unregistered_type_is_refused_without_running_it(tmp_path, blobs, monkeypatch):
    X, y = blobs
    mark = tmp_path / "ran"
    monkeypatch.setenv("TLFX_TEST_EVIL_MARK", str(mark))
    model = HeadModel.from_estimator(EvilEstimator().fit(X, y), "logistic", {}, CONFIG, list("abcd"))
    path = str(tmp_path / "evil.tlfx")
    model.save(path)
    with pytest.raises(TlfxError, match=r"test_heads\.EvilEstimator; refusing to load.*--trust-type test_heads\.EvilEstimator"):
        tlfx.load_model(path)
    assert not mark.exists()


def test_joblib_export_loads_only_with_trust_pickle(tmp_path, blobs):
    X, y = blobs
    model = HeadModel.from_estimator(create_head("knn").fit(X, y), "knn", {}, CONFIG, list("abcd"))
    path = model.export_joblib(str(tmp_path / "knn.joblib"))
    with pytest.raises(TlfxError, match="pickle .*pass --trust-pickle"):
        tlfx.load_model(path)
    back = tlfx.load_model(path, trust_pickle=True)
    np.testing.assert_allclose(back.predict_proba_features(X), model.predict_proba_features(X))


def test_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    rep = classification_report_dict(y, p, ["a", "b", "c", "d"])
    assert rep["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert rep["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    pr, rc, f1, sup = precision_recall_fscore_support(y, p)
    assert [r["precision"] for r in rep["per_class"]] == pytest.approx(pr)
    assert [r["recall"] for r in rep["per_class"]] == pytest.approx(rc)
    assert [r["support"] for r in rep["per_class"]] == list(sup)
    assert rep["confusion_matrix"] == confusion_matrix(y, p).tolist()
    text = format_report(rep)
    assert "macro-F1" in text and "confusion matrix" in text and text.count("\n") > 10


# ------------------------------------------------------------------------------------ plugin heads, model files
HEAD_PLUGIN = '''
import tlfx
from sklearn.linear_model import LogisticRegression


class Memo:
    """A helper object of the plugin's own: not a head class, so a model file holding it cannot be loaded."""

    def __init__(self, n):
        self.n = n


class MemoHead(LogisticRegression):
    def fit(self, X, y):
        super().fit(X, y)
        self.memo_ = Memo(len(X))
        return self


def scaled_logistic(**params):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).set_params(**params)


@tlfx.hookimpl
def register_heads(register):
    register("memo_lr", MemoHead, description="keeps a helper object after fit")
    register("scaled_lr", scaled_logistic, description="a Pipeline head",
             param_grid={"logisticregression__C": [0.1, 1.0]})
'''


@pytest.fixture
def head_plugin_dir(tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "memo.py").write_text(HEAD_PLUGIN)
    return d


def test_fit_refuses_to_write_a_model_that_could_not_be_loaded_back(head_plugin_dir, digits_stores, tmp_path):
    from conftest import run_cli

    out = tmp_path / "memo.tlfx"
    res = run_cli("--plugins-dir", head_plugin_dir, "fit", "--features", digits_stores[0], "--head", "memo_lr",
                  "--out", out)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: head 'memo_lr' holds type 'tlfx_local_plugins.memo.Memo'")
    assert "nothing written" in lines[0] and not out.exists()


def test_check_loadable_accepts_first_party_heads_and_names_the_refused_type(blobs):
    from tlfx.head_model import trusted_head_types
    from tlfx.heads import check_loadable, head_types

    X, y = blobs
    assert {"tlfx_plugins.sklearn_estimators.SVMHead", "tlfx_plugins.linear_estimator.LinearHead"} <= set(head_types())
    assert "tlfx_plugins.sklearn_estimators.KNNHead" in trusted_head_types()
    assert check_loadable(create_head("knn").fit(X, y), "knn")
    lr = LogisticRegression().fit(X, y)
    lr.extra_ = os.stat  # a function skops does not trust
    with pytest.raises(TlfxError, match=r"head 'x' holds type '(posix|nt)\.stat'.*nothing written"):
        check_loadable(lr, "x")


def test_nested_pipeline_params_work_for_param_as_for_search(head_plugin_dir, digits_stores, tmp_path):
    from conftest import run_cli

    env = {"TLFX_PLUGINS_DIR": str(head_plugin_dir)}
    out = tmp_path / "p.tlfx"
    run_cli("fit", "--features", digits_stores[0], "--head", "scaled_lr", "--param", "logisticregression__C=0.25",
            "--out", out, env=env, check=True)
    model = tlfx.load_model(str(out))
    assert model.meta["params"] == {"logisticregression__C": 0.25}
    assert model.estimator.get_params()["logisticregression__C"] == 0.25
    bad = run_cli("fit", "--features", digits_stores[0], "--head", "scaled_lr", "--param", "logisticregresion__C=1",
                  "--out", tmp_path / "q.tlfx", env=env)
    assert bad.returncode == 2 and "has no parameter 'logisticregresion__C'" in bad.stderr
    assert "logisticregression__C" in bad.stderr and not (tmp_path / "q.tlfx").exists()


def test_calibrated_svm_model_file_loads_back(digits_stores, tmp_path):
    """probability=True used to keep scikit-learn's private calibrator classes, so the model file was written and
    then refused by every evaluate/predict; the head now keeps plain Platt coefficients."""
    out = tmp_path / "svm.tlfx"
    model = tlfx.fit(digits_stores[0], "svm", {"probability": True}, out=str(out))
    assert model.estimator.calibrated_ and model.estimator.platt_.shape == (10, 2)
    rep = tlfx.evaluate(str(out), digits_stores[1])
    assert rep["accuracy"] > 0.5
