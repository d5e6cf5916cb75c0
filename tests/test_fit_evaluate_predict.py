"""fit / evaluate / predict end to end: real features from efficientnet_lite0, real PNG/JPEG files, the real CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import cli_here

import tlfx
from tlfx.errors import TlfxError
from tlfx.store import FeatureStore


@pytest.fixture(scope="module")
def svm_model(digits_stores, tmp_path_factory):
    """`tlfx fit --head svm --export-joblib` through the CLI, on the digits train store."""
    train, _ = digits_stores
    out = tmp_path_factory.mktemp("svm") / "svm.tlfx"
    proc = cli_here("fit", "--features", train, "--head", "svm", "--param", "C=10", "--out", out, "--export-joblib",
                   check=True)
    assert f"-> {out}" in proc.stdout and "fit svm (C=10)" in proc.stdout
    assert "pickle export" in proc.stdout
    return str(out)


@pytest.fixture(scope="module")
def fashion_store(fashion_png_dir, tmp_path_factory):
    """A real store of the PNG/JPEG folder (60 Fashion-MNIST images in 10 class folders) at 64 px."""
    out = tmp_path_factory.mktemp("fashion_store") / "f.h5"
    return tlfx.extract("efficientnet_lite0", f"imagefolder:{fashion_png_dir}", str(out), image_size=64).path


def test_cli_evaluate_table_json_and_joblib_trust_pickle(svm_model, digits_stores):
    _, test = digits_stores
    proc = cli_here("evaluate", "--model", svm_model, "--features", test, "--json", check=True)
    rep = json.loads(proc.stdout)
    assert rep["n"] == len(FeatureStore(test)) and rep["kind"] == "head" and rep["head"] == "svm"
    assert rep["accuracy"] > 0.7, rep["accuracy"]
    assert len(rep["per_class"]) == 10 and np.asarray(rep["confusion_matrix"]).sum() == rep["n"]
    assert sum(r["support"] for r in rep["per_class"]) == rep["n"]
    api = tlfx.evaluate(svm_model, test)
    assert api["accuracy"] == pytest.approx(rep["accuracy"]) and api["macro_f1"] == pytest.approx(rep["macro_f1"])

    joblib_path = os.path.splitext(svm_model)[0] + ".joblib"
    refused = cli_here("evaluate", "--model", joblib_path, "--features", test)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "pickle" in refused.stderr and "--trust-pickle" in refused.stderr
    table = cli_here("evaluate", "--model", joblib_path, "--features", test, "--trust-pickle", check=True).stdout
    assert f"accuracy {rep['accuracy']:.4f}" in table and "confusion matrix" in table and "precision" in table


def test_model_file_records_its_provenance(svm_model, digits_stores):
    train, _ = digits_stores
    m = tlfx.load_model(svm_model)
    store = FeatureStore(train)
    meta = m.meta
    assert meta["head"] == "svm" and meta["params"] == {"C": 10} and meta["kind"] == "head"
    assert m.class_names == store.class_names
    for key in ("backbone", "weights", "layers", "pooling", "image_size", "preprocess", "precision"):
        assert m.config[key] == store.config[key], key
    assert m.config["weights"]["sha256"] and m.config["image_size"] == 64
    assert meta["train_store"]["dataset_fingerprint"] == store.attrs["dataset_fingerprint"]
    assert meta["n_train"] == len(store) and meta["fit_seconds"] > 0 and meta["tlfx_version"] == tlfx.__version__


def test_cli_predict_png_and_jpeg_matches_store_features(fashion_store, fashion_png_dir, tmp_path):
    model = tlfx.fit(fashion_store, "svm", out=str(tmp_path / "f.tlfx"))
    store = FeatureStore(fashion_store)
    expected = model.predict_proba_store(store).argmax(1)
    by_id = dict(zip(store.ids, expected))
    files = sorted(str(p) for p in fashion_png_dir.rglob("*") if p.suffix in (".png", ".jpg"))
    picked = [next(f for f in files if f.endswith(".jpg")), *[f for f in files if f.endswith(".png")][:3]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    proc = cli_here("predict", "--model", tmp_path / "f.tlfx", *picked, broken, "--top-k", "3", "--format", "json",
                   check=True)
    rows = json.loads(proc.stdout)
    assert [r["path"] for r in rows] == [*picked, str(broken)]
    assert "error" in rows[-1] and "1 of 5 files could not be read" in proc.stderr
    for r in rows[:-1]:
        probs = [t["probability"] for t in r["top"]]
        assert len(r["top"]) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
        rel = os.path.relpath(r["path"], fashion_png_dir)
        # the rebuilt backbone + head give the same top class as the head on the extracted features
        assert r["top"][0]["class"] == store.class_names[by_id[rel]], rel
    csv_out = cli_here("predict", "--model", tmp_path / "f.tlfx", picked[0], "--top-k", "2", "--format", "csv",
                      check=True).stdout
    table = list(csv.DictReader(io.StringIO(csv_out)))
    assert [t["rank"] for t in table] == ["1", "2"] and table[0]["class"] == rows[0]["top"][0]["class"]
    api = tlfx.predict(model, picked[:1], top_k=1)
    assert api[0]["top"][0]["class"] == rows[0]["top"][0]["class"]


def test_cli_search_prints_choice_and_cv_score(digits_stores, tmp_path):
    train, _ = digits_stores
    proc = cli_here("fit", "--features", train, "--head", "knn", "--search", "--cv", "3", "--out", tmp_path / "k.tlfx",
                   check=True)
    assert "chosen n_neighbors=" in proc.stdout and "CV accuracy 0." in proc.stdout
    s = tlfx.load_model(str(tmp_path / "k.tlfx")).meta["search"]
    assert s["cv_folds"] == 3 and len(s["results"]) == 6 and 0.5 < s["cv_score"] <= 1
    assert s["best_params"]["n_neighbors"] in (5, 10, 20)


def test_cli_bad_head_and_params_are_one_line(digits_stores, tmp_path):
    train, _ = digits_stores
    out = tmp_path / "m.tlfx"
    for args, needle in [(["--head", "svmm"], "unknown head 'svmm'; valid choices: knn, linear, logistic"),
                         (["--head", "svm", "--param", "Cx=1"], "no parameter 'Cx'; valid parameters: C, degree"),
                         (["--head", "svm", "--param", "C=abc"], "C must be float; valid parameters: C, degree")]:
        proc = cli_here("fit", "--features", train, *args, "--out", out)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and needle in proc.stderr
    assert not out.exists()


def test_store_from_another_configuration_is_refused(svm_model, tmp_path):
    other = tlfx.extract("efficientnet_lite0", "digits", str(tmp_path / "t32.h5"), split="test", image_size=32,
                         limit=40).path
    with pytest.raises(TlfxError, match=r"another backbone configuration than the model \(image_size: model 64 vs 32"):
        tlfx.evaluate(svm_model, other)
    proc = cli_here("evaluate", "--model", svm_model, "--features", other)
    assert proc.returncode == 2 and "another backbone configuration" in proc.stderr


def test_one_class_and_incomplete_stores_are_refused(digits_stores, fashion_png_dir, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(next(p for p in fashion_png_dir.iterdir() if p.is_dir()), one / "only")
    store = tlfx.extract("efficientnet_lite0", f"imagefolder:{one}", str(tmp_path / "one.h5"), image_size=32).path
    with pytest.raises(TlfxError, match=r"only one class \('only'\).*at least 2 classes"):
        tlfx.fit(store, "logistic")
    part = str(tmp_path / "partial.h5")
    shutil.copy(digits_stores[0], part)
    with h5py.File(part, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(TlfxError, match="is incomplete.*--allow-incomplete"):
        tlfx.fit(part, "knn")


def test_api_fit_search_and_model_objects(digits_stores, tmp_path):
    train, test = digits_stores
    # a fixed parameter leaves the grid: only n_neighbors is searched
    model = tlfx.fit(train, "knn", params={"weights": "distance"}, search=True, cv=3, out=str(tmp_path / "k.tlfx"))
    s = model.meta["search"]
    assert list(s["grid"]) == ["n_neighbors"] and len(s["results"]) == 3
    assert model.meta["params"] == {"weights": "distance", "n_neighbors": s["best_params"]["n_neighbors"]}
    rep = tlfx.evaluate(model, test)
    from_file = tlfx.evaluate(str(tmp_path / "k.tlfx"), test)
    assert rep["accuracy"] > 0.6 and rep["accuracy"] == from_file["accuracy"]
    assert rep["confusion_matrix"] == from_file["confusion_matrix"]


@pytest.mark.slow  # a full CLI run (extraction + fit)
def test_cli_demo_without_fashion_mnist_falls_back_to_digits(tmp_path):
    """A machine without the Debian package (nothing in the Fashion-MNIST search path): a note, then digits."""
    empty = tmp_path / "no-idx-here"
    empty.mkdir()
    proc = cli_here("demo", "--train-limit", "60", "--test-limit", "30", "--image-size", "32", "--heads", "knn",
                   "--out", tmp_path / "demo", "--quiet", env={"TLFX_FASHION_MNIST_DIRS": str(empty)}, check=True)
    assert "Fashion-MNIST is not installed here" in proc.stderr and "using scikit-learn's digits" in proc.stderr
    assert proc.stdout.splitlines()[1].startswith("digits: 60 train / 30 test images")
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["data"] == "digits" and [r["head"] for r in results["heads"]] == ["knn"]
    assert 0.2 < results["heads"][0]["accuracy"] <= 1


@pytest.mark.slow  # two full CLI runs (extraction + fits): ~15 s of CPU
def test_cli_demo_small_then_rerun_reuses_stores(tmp_path):
    args = ["demo", "--data", "digits", "--train-limit", "120", "--test-limit", "60", "--image-size", "32",
            "--heads", "knn,logistic", "--out", tmp_path / "demo", "--quiet"]
    first = cli_here(*args, check=True)
    lines = first.stdout.splitlines()
    assert any(line.startswith("head") and "accuracy" in line and "fit s" in line for line in lines)
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in ("knn", "logistic")}
    assert set(rows) == {"knn", "logistic"} and all(0.2 < float(r[1]) <= 1 for r in rows.values())
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["head"] for r in results["heads"]] == ["knn", "logistic"]
    assert (tmp_path / "demo" / "models" / "logistic.tlfx").is_file()
    again = cli_here(*args, check=True)
    assert again.stderr.count("already complete") == 2
    assert {line.split()[0]: line.split()[1] for line in again.stdout.splitlines() if line.split()
            and line.split()[0] in rows} == {k: v[1] for k, v in rows.items()}
