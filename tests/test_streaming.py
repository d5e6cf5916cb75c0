"""Heads on stores larger than memory: the chunk reader, the streaming pieces, and the ``linear`` and ``sgd`` heads
trained from a real HDF5 store chunk by chunk (scikit-learn digits pixels written with tlfx's own store writer,
rows sorted by class like an image-folder extraction)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from conftest import run_cli
from sklearn.datasets import load_digits

import tlfx
from tlfx import training
from tlfx.store import FeatureStore, StoreWriter, store_attrs_base
from tlfx.streaming import ArrayRows, StoreRows, holdout, scan, shuffled_chunks

FAST_LINEAR = {"epochs": 15, "lr": 0.01, "batch_size": 64, "min_steps": 0, "device": "cpu"}  # seconds, not minutes


def write_store(path, X, y, part=400):
    """A complete store of ``X, y`` written part by part by tlfx's StoreWriter, then joined."""
    n = len(X)
    attrs = {**store_attrs_base(), "backbone": "imported:digits", "dtype": "float32", "dataset": "imported:digits",
             "split": "all", "data_root": "", "limit": 0, "dataset_fingerprint": "digits", "n_items": n,
             "part_size": part, "class_names": [str(i) for i in range(10)]}
    with StoreWriter(str(path), attrs, overwrite=True) as w:
        for a in range(0, n, part):
            b = min(a + part, n)
            w.write_part(a, b, np.asarray(X[a:b], np.float32), y[a:b], [str(i) for i in range(a, b)], [])
        w.finalize()
    return str(path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Train/test stores of digits pixels (64 features), train sorted by class; the arrays too."""
    d = load_digits()
    rng = np.random.default_rng(0)
    test = rng.random(len(d.target)) < 0.3
    Xtr, ytr = d.data[~test], d.target[~test]
    order = np.argsort(ytr, kind="stable")
    Xtr, ytr = Xtr[order], ytr[order]
    root = tmp_path_factory.mktemp("streaming")
    return {"train": write_store(root / "train.h5", Xtr, ytr), "test": write_store(root / "test.h5", d.data[test],
                                                                                  d.target[test]),
            "Xtr": Xtr.astype(np.float32), "ytr": ytr, "Xte": d.data[test].astype(np.float32), "yte": d.target[test],
            "root": root}


def test_iter_chunks_returns_exactly_the_rows(digits):
    st = FeatureStore(digits["train"])
    for rows in (7, 400, 5000):
        chunks = list(st.iter_chunks(rows))
        assert [c[0] for c in chunks] == list(range(0, len(st), rows))
        assert max(len(c[1]) for c in chunks) <= rows
        np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), digits["Xtr"])
        np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), digits["ytr"])
    with pytest.raises(tlfx.TlfxError, match="at least 1"):
        next(st.iter_chunks(0))


def test_unlabelled_rows_are_skipped(digits, tmp_path):
    y = digits["ytr"].copy()
    y[::5] = -1
    path = write_store(tmp_path / "partly.h5", digits["Xtr"], y)
    st = FeatureStore(path)
    got = list(st.iter_chunks(100, labeled_only=True))
    np.testing.assert_array_equal(np.concatenate([c[1] for c in got]), digits["Xtr"][y >= 0])
    np.testing.assert_array_equal(np.concatenate([c[2] for c in got]), y[y >= 0])
    for head in ("sgd", "linear"):
        params = {"epochs": 5} if head == "sgd" else FAST_LINEAR
        m = tlfx.fit(path, head, params=params, stream=True, chunk_rows=150)
        assert m.meta["n_train"] == int((y >= 0).sum()) and m.meta["streamed"] == {"chunk_rows": 150}
        assert list(m.estimator.classes_) == list(range(10))
        assert tlfx.evaluate(m, digits["test"])["accuracy"] > 0.85
        # evaluate reads the store in chunks: the same probabilities as the whole array at once
        np.testing.assert_array_equal(m.predict_proba_store(st), m.predict_proba_features(st.features))


def test_epoch_visits_every_training_row_once_in_mixed_chunks(digits):
    st = FeatureStore(digits["train"])
    n = len(st)
    targets = st.labels.copy()
    train = np.ones(n, bool)
    train[::3] = False
    with StoreRows(st, chunk_rows=120) as rows:
        chunks = list(shuffled_chunks(rows, targets, train, np.random.default_rng(1)))
        assert all(len(y) <= 120 for _, y in chunks)
        X = np.concatenate([c[0] for c in chunks])
        y = np.concatenate([c[1] for c in chunks])
    # every training row exactly once: compare rows as sorted byte strings
    key = lambda A: sorted(map(bytes, np.ascontiguousarray(A)))  # noqa: E731
    assert key(X) == key(digits["Xtr"][train])
    np.testing.assert_array_equal(np.sort(y), np.sort(digits["ytr"][train]))
    # the store is sorted by class, yet a chunk mixes classes (blocks from random places, rows shuffled)
    assert np.mean([len(np.unique(c[1])) for c in chunks]) >= 4
    # the order depends on the seed only
    with StoreRows(st, chunk_rows=120) as rows:
        again = np.concatenate([c[1] for c in shuffled_chunks(rows, targets, train, np.random.default_rng(1))])
    np.testing.assert_array_equal(again, y)


def test_scan_statistics_and_held_out_rows(digits):
    X, y = digits["Xtr"], digits["ytr"]
    va = holdout(y, 0.2, seed=3, dim=X.shape[1])
    assert 0.18 * len(y) < len(va) < 0.22 * len(y)
    assert set(np.unique(y[va])) == set(range(10))  # stratified
    use = np.ones(len(y), bool)
    use[::4] = False
    with StoreRows(FeatureStore(digits["train"]), chunk_rows=97) as rows:
        mean, var, picked = scan(rows, use, va)
    np.testing.assert_allclose(mean, X[use].astype(np.float64).mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(var, X[use].astype(np.float64).var(axis=0), atol=1e-8)
    np.testing.assert_array_equal(picked, X[va])
    capped = holdout(y, 0.5, seed=3, dim=X.shape[1], max_bytes=100 * 4 * X.shape[1])
    assert 80 <= len(capped) <= 110


@pytest.mark.parametrize(("head", "params"), [("sgd", {}), ("linear", FAST_LINEAR)])
def test_streaming_fit_matches_in_memory_accuracy(digits, head, params):
    mem = tlfx.fit(digits["train"], head, params=params, stream=False)
    streamed = tlfx.fit(digits["train"], head, params=params, stream=True, chunk_rows=200)
    assert "streamed" not in mem.meta and streamed.meta["streamed"]["chunk_rows"] == 200
    acc_mem = tlfx.evaluate(mem, digits["test"])["accuracy"]
    acc_stream = tlfx.evaluate(streamed, digits["test"])["accuracy"]
    assert acc_mem > 0.9 and acc_stream > 0.9
    assert abs(acc_stream - acc_mem) < 0.03, (acc_stream, acc_mem)
    # standardisation statistics from the streaming pass are those of the whole training set
    np.testing.assert_allclose(streamed.estimator.mean_, digits["Xtr"].mean(axis=0), rtol=1e-5, atol=1e-5)
    # the same seed gives the same streamed model
    again = tlfx.fit(digits["train"], head, params=params, stream=True, chunk_rows=200)
    np.testing.assert_array_equal(again.estimator.predict_proba(digits["Xte"]),
                                  streamed.estimator.predict_proba(digits["Xte"]))


def test_linear_full_batch_streams_by_accumulating_gradients(digits):
    """batch_size=0 over chunks is one exact full-batch step per pass: it matches the in-memory full-batch fit."""
    p = {"batch_size": 0, "epochs": 20, "lr": 0.05, "val_fraction": 0.0, "min_steps": 0, "device": "cpu"}
    mem = tlfx.create_head("linear", **p).fit(digits["Xtr"], digits["ytr"])
    st = tlfx.create_head("linear", **p).fit_store(FeatureStore(digits["train"]), chunk_rows=100)
    np.testing.assert_allclose(st.coef_, mem.coef_, atol=2e-4)


def test_sgd_fit_on_arrays_is_the_chunked_algorithm(digits):
    """SGDHead.fit(X, y) runs the same chunked code as fit_store: same seed, same rows -> same model."""
    a = tlfx.create_head("sgd").fit(digits["Xtr"], digits["ytr"])
    b = tlfx.create_head("sgd")
    b._check_params()
    b._fit_source(ArrayRows(digits["Xtr"], digits["ytr"]))
    np.testing.assert_array_equal(a.model_.coef_, b.model_.coef_)


def test_auto_streams_only_large_stores_without_search(digits, monkeypatch):
    st = FeatureStore(digits["train"])
    assert not training.use_streaming("sgd", tlfx.create_head("sgd"), st, None, False)
    monkeypatch.setattr(training, "STREAM_ABOVE_BYTES", 1000)
    assert training.use_streaming("sgd", tlfx.create_head("sgd"), st, None, False)
    assert not training.use_streaming("sgd", tlfx.create_head("sgd"), st, None, True)  # --search: in memory
    assert not training.use_streaming("logistic", tlfx.create_head("logistic"), st, None, False)
    assert "streamed" in tlfx.fit(st, "sgd").meta


@pytest.mark.slow  # four CLI processes: ~20-60 s on a busy 2-core machine
def test_cli_stream_fit_then_evaluate(digits):
    root = digits["root"]
    model = root / "sgd.tlfx"
    r = run_cli("fit", "--features", digits["train"], "--head", "sgd", "--stream", "--chunk-rows", "300",
                "--out", model, check=True)
    assert "streamed, 300 rows a chunk" in r.stdout
    with zipfile.ZipFile(model) as z:
        meta = json.loads(z.read("meta.json")) if "meta.json" in z.namelist() else None
    assert meta is None or meta.get("streamed") == {"chunk_rows": 300}
    ev = run_cli("evaluate", "--model", model, "--features", digits["test"], "--json", check=True)
    assert json.loads(ev.stdout)["accuracy"] > 0.9
    for args, needle in [(["--head", "sgd", "--stream", "--search"], "--stream cannot be combined with --search"),
                         (["--head", "knn", "--stream"], "heads that can: linear, sgd")]:
        bad = run_cli("fit", "--features", digits["train"], *args, "--out", root / "x.tlfx")
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
