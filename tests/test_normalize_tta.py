"""Feature normalisation in front of heads (tlfx.normalize) and test-time augmentation at extraction (--tta flip).

Real stores (scikit-learn digits through efficientnet_lite0), real image files on disk, real model files.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
from conftest import run_cli
from PIL import Image, ImageOps
from sklearn.utils.estimator_checks import parametrize_with_checks

import tlfx
from tlfx.errors import TlfxError
from tlfx.normalize import METHODS, FeatureNormalizer, parse_specs


# --------------------------------------------------------------------------------------- hand computations
def test_l2_and_power_match_hand_computation():
    X = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    assert np.allclose(FeatureNormalizer("l2").fit(X).transform(X), [[0.6, 0.8], [0, 0], [-1, 0]])
    Y = np.array([[4.0, -9.0], [1.0, 0.0]])  # signed square root: [2, -3], [1, 0]; then unit length
    r13 = math.sqrt(13)
    assert np.allclose(FeatureNormalizer("power").fit(Y).transform(Y), [[2 / r13, -3 / r13], [1, 0]])
    assert np.array_equal(FeatureNormalizer("none").fit(Y).transform(Y), Y)
    f32 = FeatureNormalizer("power").fit(Y.astype(np.float32)).transform(Y.astype(np.float32))
    assert f32.dtype == np.float32


def test_pca_whiten_matches_hand_computation():
    # mean 0, covariance diag(2/3, 8/3) (n - 1 = 3): the first axis is y (variance 8/3), the second x (2/3)
    train = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    n = FeatureNormalizer("pca-whiten").fit(train)
    assert n.n_components_ == 2
    assert np.allclose(n.explained_variance_, [8 / 3, 2 / 3])
    assert np.allclose(np.abs(n.components_), [[0, 1], [1, 0]])
    # [1, 1] -> [1 / sqrt(8/3), 1 / sqrt(2/3)] = proportional to [1, 2] -> L2: [1, 2] / sqrt(5)
    assert np.allclose(n.transform([[1.0, 1.0]]), [[1 / math.sqrt(5), 2 / math.sqrt(5)]])
    one = FeatureNormalizer("pca-whiten", n_components=1).fit(train)
    assert np.allclose(one.transform([[1.0, 1.0], [0.0, -1.0]]), [[1.0], [-1.0]])


def test_pca_whiten_is_fit_on_the_training_rows_only(digits_stores):
    tr, te = (tlfx.FeatureStore(p) for p in digits_stores)
    model = tlfx.fit(tr.path, "logistic", normalize="pca-whiten:32")
    norm = model.estimator.named_steps["normalize"]
    assert model.meta["normalize"] == "pca-whiten:32" and norm.n_components_ == 32
    assert np.allclose(norm.mean_, tr.features.astype(np.float64).mean(axis=0))
    both = np.vstack([tr.features, te.features]).astype(np.float64)
    assert not np.allclose(norm.mean_, both.mean(axis=0), atol=1e-4)
    # on the training rows, the whitened (pre-L2) coordinates have unit covariance
    Z = (tr.features.astype(np.float64) - norm.mean_) @ norm.components_.T / np.sqrt(norm.explained_variance_)
    assert np.allclose(np.cov(Z.T), np.eye(32), atol=1e-6)
    assert np.allclose(np.linalg.norm(norm.transform(te.features), axis=1), 1.0, atol=1e-5)


@parametrize_with_checks([FeatureNormalizer(m) for m in METHODS])
def test_feature_normalizer_passes_sklearn_checks(estimator, check):
    check(estimator)


def test_specs_are_validated():
    assert parse_specs("none,L2, power,pca-whiten:64,power") == ["none", "l2", "power", "pca-whiten:64"]
    for bad in ("l3", "power:3", "pca-whiten:0", "pca-whiten:x", ""):
        with pytest.raises(TlfxError):
            parse_specs(bad)


# ------------------------------------------------------------------------------------- model files
@pytest.mark.parametrize("spec", ["none", "l2", "power", "pca-whiten"])
def test_model_file_round_trip(digits_stores, tmp_path, spec):
    tr, te = digits_stores
    path = str(tmp_path / f"svm-{spec}.tlfx")
    model = tlfx.fit(tr, "svm", normalize=spec, out=path)
    loaded = tlfx.load_model(path)  # the loader's type audit accepts the normaliser
    assert loaded.meta["normalize"] == spec
    assert loaded.meta["all_params"]["C"] == 10.0  # the head's own parameters, not the pipeline's
    assert np.array_equal(loaded.predict_proba(te), model.predict_proba(te))
    assert tlfx.evaluate(loaded, te)["normalize"] == spec


@pytest.mark.parametrize("head", ["svm", "logistic"])
def test_cli_fit_power_then_evaluate(digits_stores, tmp_path, head):
    tr, te = digits_stores
    out = tmp_path / f"{head}.tlfx"
    r = run_cli("fit", "--features", tr, "--head", head, "--normalize", "power", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "after power normalisation" in r.stdout
    r = run_cli("evaluate", "--model", out, "--features", te, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["normalize"] == "power" and rep["accuracy"] > 0.6
    assert isinstance(tlfx.load_model(str(out)).estimator.named_steps["normalize"], FeatureNormalizer)


def test_cli_search_over_normalisations(digits_stores, tmp_path):
    tr, _te = digits_stores
    out = tmp_path / "knn.tlfx"
    r = run_cli("fit", "--features", tr, "--head", "knn", "--search", "--cv", "3", "--param", "weights=distance",
                "--normalize", "none,power", "--out", out)
    assert r.returncode == 0, r.stderr
    meta = tlfx.load_model(str(out)).meta
    s = meta["search"]
    assert s["grid"]["normalize"] == ["none", "power"] and len(s["results"]) == 3 * 2
    best = max(s["results"], key=lambda x: x["mean"])
    assert meta["normalize"] == s["normalize"] == best["params"]["normalize"]
    assert f"normalize={meta['normalize']!r}" in r.stdout


def test_cli_refuses_bad_normalize(digits_stores, tmp_path):
    tr, _te = digits_stores
    r = run_cli("fit", "--features", tr, "--head", "knn", "--normalize", "sqrt", "--out", tmp_path / "m.tlfx")
    assert r.returncode == 2 and "valid choices: none, l2, power, pca-whiten" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("fit", "--features", tr, "--head", "knn", "--normalize", "none,l2", "--out", tmp_path / "m.tlfx")
    assert r.returncode == 2 and "add --search" in r.stderr
    assert not (tmp_path / "m.tlfx").exists()


# --------------------------------------------------------------------------------------------- TTA
@pytest.fixture(scope="module")
def mirrored_folders(tmp_path_factory):
    """Real digit images at 64 x 64 px (at image_size 56 lite0 resizes to 64, so preprocessing is only the centred
    56 px crop, which mirroring commutes with), and the same images mirrored, in the same class folders."""
    ds = tlfx.load_dataset("digits", split="test")
    root = tmp_path_factory.mktemp("tta")
    plain, mirror = root / "plain", root / "mirror"
    for i in range(24):
        img = Image.fromarray(ds.images[i], "L").convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
        for base, im in ((plain, img), (mirror, ImageOps.mirror(img))):
            d = base / f"digit-{int(ds.labels[i])}"
            d.mkdir(parents=True, exist_ok=True)
            im.save(d / f"{i:03d}.png")
    return plain, mirror


@pytest.fixture(scope="module")
def tta_stores(mirrored_folders, tmp_path_factory):
    plain, mirror = mirrored_folders
    d = tmp_path_factory.mktemp("tta_stores")
    common = ["--image-size", "56", "--precision", "fp32", "--runtime", "torch", "--workers", "0", "--quiet"]
    r = run_cli("extract", "--data", f"imagefolder:{plain}", "--tta", "flip", "--out", d / "flip.h5", *common)
    assert r.returncode == 0, r.stderr
    kw = {"image_size": 56, "precision": "fp32", "workers": 0}
    a = tlfx.extract("efficientnet_lite0", f"imagefolder:{plain}", str(d / "plain.h5"), **kw)
    b = tlfx.extract("efficientnet_lite0", f"imagefolder:{mirror}", str(d / "mirror.h5"), **kw)
    return str(d / "flip.h5"), a.path, b.path


def test_tta_flip_is_the_mean_of_image_and_mirror(tta_stores):
    flip, plain, mirror = (tlfx.FeatureStore(p) for p in tta_stores)
    assert flip.config["tta"] == "flip" and plain.config["tta"] == "none"
    assert flip.ids == plain.ids == mirror.ids
    expected = (plain.features + mirror.features) / np.float32(2)
    assert np.allclose(flip.features, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(flip.features, plain.features, rtol=1e-3, atol=1e-3)
    r = run_cli("info", flip.path)
    assert "tta flip" in r.stdout


def test_tta_is_part_of_the_compared_configuration(tta_stores, mirrored_folders, tmp_path):
    flip, plain, _mirror = tta_stores
    model_path = tmp_path / "plain.tlfx"
    run_cli("fit", "--features", plain, "--head", "logistic", "--out", model_path, check=True)
    r = run_cli("evaluate", "--model", model_path, "--features", flip)
    assert r.returncode == 2 and "tta: model none vs flip" in r.stderr and "Traceback" not in r.stderr
    # a model trained on TTA features: evaluate accepts the TTA store; predict rebuilds the TTA from the record
    tta_model = tlfx.fit(flip, "logistic", out=str(tmp_path / "flip.tlfx"))
    assert tta_model.meta["config"]["tta"] == "flip"
    with pytest.raises(TlfxError, match="tta: model flip vs none"):
        tlfx.evaluate(tta_model, plain)
    st = tlfx.FeatureStore(flip)
    root = mirrored_folders[0]
    paths = [str(root / i) for i in st.ids[:6]]
    got = tlfx.load_model(str(tmp_path / "flip.tlfx")).predict_proba_images(paths)[0]
    assert np.allclose(got, tta_model.predict_proba_features(st.features[:6]), atol=1e-4)
    emb = tlfx.Embedder(image_size=56, precision="fp32", tta="flip").transform(paths)
    assert np.allclose(emb, st.features[:6], rtol=1e-5, atol=1e-5)


def test_store_without_tta_reads_as_none(digits_stores, tmp_path):
    import shutil

    tr, _te = digits_stores
    old = str(tmp_path / "old.h5")
    shutil.copy(tr, old)
    with h5py.File(old, "a") as f:
        assert f.attrs["tta"] == "none"
        del f.attrs["tta"]  # a store written before the field existed
    st = tlfx.FeatureStore(old)
    assert st.config["tta"] == "none"
    model = tlfx.fit(old, "knn")
    assert model.meta["config"]["tta"] == "none"
    assert tlfx.evaluate(model, tr)["accuracy"] > 0.5  # old and new "none" stores agree


def test_compare_searches_the_normalisation_on_the_training_store(digits_stores, tmp_path):
    from tlfx.compare import compare

    tr, te = digits_stores
    rep = compare(tr, te, "knn", str(tmp_path / "r"), search=True, folds=3, normalize="none,power",
                  learning_curve="5,all", n_boot=0, gallery=0)
    row = rep["rows"][0]
    assert rep["config"]["normalize"] == ["none", "power"] and row["normalize"] in ("none", "power")
    assert row["label"] == ("knn" if row["normalize"] == "none" else "knn [power]")
    model = tlfx.load_model(str(tmp_path / "r" / row["model_file"]))
    assert model.meta["normalize"] == row["normalize"]
    assert np.array_equal(model.predict(te), row["predictions"])
    with pytest.raises(TlfxError, match="add --search"):
        compare(tr, te, "knn", str(tmp_path / "r2"), normalize="none,power", learning_curve="none")
