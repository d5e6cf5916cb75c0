"""tlfx.Embedder (a scikit-learn transformer over images) and fitted models used like estimators.

Real PNG/JPEG files (scikit-learn digits 0 and 1, upscaled, in mixed modes and sizes) on disk, the real
efficientnet_lite0 weights at 64 px in fp32, real stores written by ``tlfx.extract``.
"""

from __future__ import annotations

import os
import pickle
import time
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks

import tlfx
from tlfx.errors import TlfxError
from tlfx.store import FeatureStore

CONFIG = {"image_size": 64, "precision": "fp32", "runtime": "torch"}  # what the store below is extracted with
PER_CLASS = 10


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """An image folder ``zero/``, ``one/``: digits upscaled to 32 px PNG (grey and RGBA), 80x64 JPEG (RGB)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("emb_imgs")
    for label, name in ((0, "zero"), (1, "one")):
        (root / name).mkdir()
        picked = np.flatnonzero(digits.target == label)[:PER_CLASS]
        for k, i in enumerate(picked):
            img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8), "L").resize((32, 32), Image.NEAREST)
            if k % 3 == 0:
                img.convert("RGB").resize((80, 64)).save(root / name / f"{i}.jpg", quality=90)
            elif k % 3 == 1:
                img.save(root / name / f"{i}.png")
            else:
                img.convert("RGBA").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def store(image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb_store") / "f.h5"
    return tlfx.extract("efficientnet_lite0", f"imagefolder:{image_dir}", str(out), workers=0, **CONFIG).path


@pytest.fixture(scope="module")
def files(store):
    """The image files in the store's row order, and their labels."""
    st = FeatureStore(store)
    root = st.attrs["data_root"]
    return [os.path.join(root, i) for i in st.ids], st.labels


@pytest.fixture(scope="module")
def embedder():
    return tlfx.Embedder("efficientnet_lite0", **CONFIG)


# ---------------------------------------------------------------------------------------------- Embedder
def test_embedder_equals_what_extract_writes(embedder, store, files):
    paths, _ = files
    X = embedder.fit(paths).transform(paths)
    expected = FeatureStore(store).features
    assert X.dtype == np.float32 and X.shape == expected.shape == (2 * PER_CLASS, 1280)
    np.testing.assert_allclose(X, expected, rtol=1e-5, atol=1e-5)
    # one row per input, in the order given, repeats included
    order = [3, 0, 3, 7]
    np.testing.assert_allclose(embedder.transform([paths[i] for i in order]), expected[order], rtol=1e-5, atol=1e-5)
    assert embedder.transform([]).shape == (0, 1280)
    assert list(embedder.get_feature_names_out()[:2]) == ["embedding0", "embedding1"]


def test_embedder_takes_pil_images_and_uint8_arrays(embedder, files):
    paths, _ = files
    by_path = embedder.transform(paths[:4])
    pil = [Image.open(p) for p in paths[:4]]  # grey, RGBA and RGB JPEG: converted to RGB the way files are
    np.testing.assert_allclose(embedder.transform(pil), by_path, rtol=1e-5, atol=1e-5)
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    np.testing.assert_allclose(embedder.transform(arrays), by_path, rtol=1e-5, atol=1e-5)
    same_size = [a for a in arrays if a.shape == arrays[1].shape]
    batch = np.stack(same_size)  # N x H x W x 3
    assert embedder.transform(batch).shape == (len(same_size), 1280)
    np.testing.assert_allclose(embedder.transform(same_size[0]), embedder.transform(batch[:1]), rtol=1e-5, atol=1e-5)
    grey = np.asarray(pil[1].convert("L"))  # H x W
    assert embedder.transform([grey]).shape == (1, 1280)
    assert embedder.transform(np.asarray(paths[:2], dtype=object)[:, None]).shape == (2, 1280)  # one column of paths


def test_embedder_unreadable_input_names_the_file(embedder, files, tmp_path):
    paths, _ = files
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(TlfxError, match=r"cannot read image '.*broken\.png'"):
        embedder.transform([paths[0], str(broken)])
    with pytest.raises(TlfxError, match=r"cannot read image '.*missing\.png': file not found"):
        embedder.transform([str(tmp_path / "missing.png")])
    with pytest.raises(TlfxError, match="wrap it in a list"):
        embedder.transform(paths[0])
    with pytest.raises(TlfxError, match="float64 array"):
        embedder.transform(np.zeros((2, 8, 8, 3)))
    with pytest.raises(TlfxError, match="item 1 is a int"):
        embedder.transform([paths[0], 3])
    with pytest.raises(TlfxError, match="unknown pooling 'mean'"):
        tlfx.Embedder(pooling="mean").fit(paths)


def test_embedder_clone_params_and_pickle(embedder, files):
    paths, _ = files
    X = embedder.transform(paths[:2])
    copy = clone(embedder)
    assert copy.get_params() == embedder.get_params() and not hasattr(copy, "_computer")
    assert "_computer" not in pickle.dumps(embedder).decode("latin-1")  # the network is not pickled
    restored = pickle.loads(pickle.dumps(embedder))
    np.testing.assert_array_equal(restored.transform(paths[:2]), X)
    copy.set_params(image_size=96)  # a new parameter rebuilds the network
    X96 = copy.transform(paths[:2])
    assert X96.shape == X.shape and not np.allclose(X96, X, atol=1e-3)


def test_embedder_in_pipeline_cross_val_score(files, store):
    paths, y = files
    # a linear kernel: an RBF SVM on 10 training images per fold is near chance, whatever makes the features
    pipe = make_pipeline(tlfx.Embedder("efficientnet_lite0", **CONFIG), tlfx.create_head("svm", kernel="linear"))
    scores = cross_val_score(pipe, paths, y, cv=2)
    assert len(scores) == 2 and scores.min() >= 0.8, scores
    # the same folds on the features tlfx extract wrote give the same scores
    on_store = cross_val_score(tlfx.create_head("svm", kernel="linear"), FeatureStore(store).features, y, cv=2)
    np.testing.assert_array_equal(scores, on_store)


def test_embedder_cache_reuses_store_rows(embedder, files, tmp_path):
    paths, _ = files
    data = tmp_path / "data"
    for name, src in (("a", paths[1]), ("b", paths[-1])):
        (data / name).mkdir(parents=True)
        Image.open(src).convert("RGB").save(data / name / "x.png")
    cache = tlfx.extract("efficientnet_lite0", f"imagefolder:{data}", str(tmp_path / "c.h5"), workers=0, **CONFIG).path
    st = FeatureStore(cache)
    held = [os.path.join(st.attrs["data_root"], i) for i in st.ids]
    new = tmp_path / "new.png"
    Image.open(paths[0]).convert("RGB").save(new)

    cached = tlfx.Embedder("efficientnet_lite0", **CONFIG, cache=cache)
    X = cached.transform([held[1], str(new), held[0]])
    np.testing.assert_array_equal(X[[2, 0]], st.features)  # bit-identical: the store's rows, read back
    fresh = embedder
    np.testing.assert_allclose(X[1], fresh.transform([str(new)])[0], rtol=1e-5, atol=1e-5)  # not in the store

    Image.open(paths[2]).convert("RGB").rotate(90).save(held[0])  # changed after the store was written
    later = time.time() + 10
    os.utime(held[0], (later, later))
    X0 = cached.transform([held[0]])
    assert not np.allclose(X0[0], st.features[0], atol=1e-3)
    np.testing.assert_allclose(X0, fresh.transform([held[0]]), rtol=1e-5, atol=1e-5)

    with pytest.raises(TlfxError, match=r"cache store .* another backbone configuration .*image_size"):
        tlfx.Embedder("efficientnet_lite0", image_size=96, precision="fp32", cache=cache).transform(held[:1])


# Which of scikit-learn's estimator checks apply. The Embedder's samples are images (paths, PIL images, uint8
# arrays), not rows of numbers, so every check that feeds it a float matrix from make_blobs and expects features
# back does not apply: check_transformer_general, check_transformers_unfitted_stateless, check_fit_score_takes_y,
# check_n_features_in, check_estimators_dtypes, check_estimators_nan_inf, check_fit2d_*, check_methods_*_invariance,
# check_transformer_preserve_dtypes and the set_output/pandas checks (they refuse a float array with a TlfxError
# naming it, as they should). Pickling, cloning and equality with `tlfx extract` are tested above on real images.
# What applies is the parameter contract, run here: plain __init__, get/set_params, clone, repr, tags, fit
# returning self without changing parameters or adding public attributes before fit.
APPLICABLE_CHECKS = (
    "check_parameters_default_constructible", "check_no_attributes_set_in_init", "check_get_params_invariance",
    "check_set_params", "check_do_not_raise_errors_in_init_or_set_params", "check_estimator_cloneable",
    "check_estimator_repr", "check_mixin_order", "check_valid_tag_types", "check_estimator_tags_renamed",
    "check_dont_overwrite_parameters", "check_estimators_overwrite_params", "check_estimators_fit_returns_self",
    "check_fit_check_is_fitted", "check_estimators_unfitted",
)


@pytest.mark.parametrize("check", APPLICABLE_CHECKS)
def test_embedder_sklearn_checks(check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        getattr(estimator_checks, check)("Embedder", tlfx.Embedder(**CONFIG))


# ----------------------------------------------------------------------------------- models as estimators
@pytest.fixture(scope="module")
def model(store, tmp_path_factory):
    return tlfx.fit(store, "logistic", out=str(tmp_path_factory.mktemp("emb_model") / "m.tlfx"))


def test_model_predict_score_on_arrays_and_stores(model, store, files):
    st = FeatureStore(store)
    X, y = st.features, st.labels
    acc = tlfx.evaluate(model, store)["accuracy"]
    loaded = tlfx.load_model(model.path)
    for m in (model, loaded):
        assert list(m.classes_) == [0, 1] and m.class_names == st.class_names
        proba = m.predict_proba(X)
        assert proba.shape == (len(X), 2) and np.allclose(proba.sum(1), 1)
        np.testing.assert_array_equal(m.predict(X), proba.argmax(1))
        np.testing.assert_array_equal(m.predict(store), m.predict(X))
        np.testing.assert_array_equal(m.predict_proba(st), proba)
        assert m.score(store) == pytest.approx(acc) == pytest.approx(m.score(X, y))
    # end to end from image files: the Embedder makes the features the model was trained on
    paths, _ = files
    feats = tlfx.Embedder("efficientnet_lite0", **CONFIG).transform(paths)
    np.testing.assert_array_equal(model.predict(feats), model.predict(X))


def test_model_refuses_other_features(model, files, tmp_path):
    paths, _ = files
    with pytest.raises(TlfxError, match=r"shape \(3, 10\).*\[n, 1280\]"):
        model.predict(np.zeros((3, 10), np.float32))
    with pytest.raises(TlfxError, match="needs the labels y"):
        model.score(np.zeros((3, 1280), np.float32))
    root = os.path.dirname(os.path.dirname(paths[0]))
    other = tlfx.extract("pixels", f"imagefolder:{root}", str(tmp_path / "px.h5"), image_size=16, workers=0).path
    with pytest.raises(TlfxError, match="another backbone configuration"):
        model.predict_proba(other)
    with pytest.raises(TlfxError, match="another backbone configuration"):
        model.score(other)
